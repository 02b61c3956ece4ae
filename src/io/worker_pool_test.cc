// WorkerPool: functions run on other threads, tasks resume on their own reactor, and a pool
// compresses for the convert engine (those tests run under ThreadSanitizer too).
#include "io/worker_pool.h"

#include <atomic>
#include <thread>

#include "gtest/gtest.h"
#include "image/create.h"
#include "qcow2kit/image.h"
#include "testing/test_util.h"
#include "tools/convert.h"

namespace qcow2kit {
namespace {

Task<void> RunJobs(WorkerPool* pool, int jobs, std::atomic<int>* ran, int* resumed_here,
                   std::thread::id reactor_thread) {
  for (int i = 0; i < jobs; ++i) {
    std::thread::id ran_on;
    co_await pool->Run([&] {
      ran_on = std::this_thread::get_id();
      ran->fetch_add(1);
    });
    EXPECT_NE(ran_on, reactor_thread);
    if (std::this_thread::get_id() == reactor_thread) ++*resumed_here;
  }
}

TEST(WorkerPoolTest, JobsRunOnPoolThreadsAndTasksResumeOnTheirReactor) {
  auto reactor = testing::NewReactor();
  auto pool = WorkerPool::Create(3);
  ASSERT_TRUE(pool.ok());
  EXPECT_EQ((*pool)->threads(), 3u);
  reactor->Spawn((*pool)->Serve());
  std::atomic<int> ran{0};
  int resumed_here = 0;
  for (int t = 0; t < 8; ++t) {
    reactor->Spawn(RunJobs(pool->get(), 50, &ran, &resumed_here, std::this_thread::get_id()));
  }
  // Stop() only once no task waits on the pool any more.
  while (resumed_here < 400) ASSERT_TRUE(reactor->RunOnce(true));
  (*pool)->Stop();
  reactor->RunUntilIdle();
  EXPECT_EQ(ran.load(), 400);
  EXPECT_EQ(resumed_here, 400);
}

// The convert engine compressing on two threads, out of order and in order: the target reads
// back as the source under qemu-img compare and passes qemu-img check.
TEST(WorkerPoolTest, ConvertCompressesOnThePool) {
  testing::ScratchDir dir;
  testing::MustRun("cd " + dir.path() +
                   " && head -c 3000000 /dev/urandom | base64 > src.raw"
                   " && truncate -s 6M src.raw && head -c 300000 /dev/urandom >> src.raw");
  for (bool in_order : {true, false}) {
    SCOPED_TRACE(in_order);
    auto reactor = testing::NewReactor();
    CreateOptions create;
    create.filename = dir / "out.qcow2";
    create.size = 6 * 1024 * 1024 + 300000;
    ASSERT_TRUE(reactor->BlockOn(CreateImage(create)).ok());
    OpenOptions ro;
    auto src = reactor->BlockOn(OpenImage(dir / "src.raw", ro));
    ASSERT_TRUE(src.ok()) << src.status().ToString();
    OpenOptions rw;
    rw.writable = true;
    auto dst = reactor->BlockOn(OpenImage(dir / "out.qcow2", rw));
    ASSERT_TRUE(dst.ok()) << dst.status().ToString();
    auto source = std::make_unique<BlockDevice>(std::move(*src));
    auto target = std::make_unique<BlockDevice>(std::move(*dst));
    auto pool = WorkerPool::Create(2);
    ASSERT_TRUE(pool.ok());
    reactor->Spawn((*pool)->Serve());
    tools::ConvertOptions o;
    o.compressed = true;
    o.in_order = in_order;
    o.target_reads_zeros = true;
    o.compress_pool = pool->get();
    BlockDevice* sources[] = {source.get()};
    Status s = reactor->BlockOn(tools::Convert(sources, *target, o));
    (*pool)->Stop();
    reactor->RunUntilIdle();
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_TRUE(reactor->BlockOn(target->Close()).ok());
    target.reset();  // drops the image locks
    source.reset();
    testing::MustRun("cd " + dir.path() +
                     " && qemu-img check -q out.qcow2 && qemu-img compare -q src.raw out.qcow2"
                     // base64 text shrinks to about 3/4: the clusters were compressed
                     " && [ $(stat -c %s out.qcow2) -lt 5500000 ]");
  }
}

}  // namespace
}  // namespace qcow2kit
