// Tests of the I/O core on both engines: the same behaviour is required of io_uring and of the
// blocking fallback.
#include "qcow2kit/reactor.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "qcow2kit/buffer.h"
#include "qcow2kit/file.h"

namespace qcow2kit {
namespace {

class TempFile {
 public:
  explicit TempFile(size_t size) {
    char tmpl[] = "/tmp/qk_reactor_XXXXXX";
    int fd = ::mkstemp(tmpl);
    path_ = tmpl;
    std::vector<uint8_t> data(size);
    for (size_t i = 0; i < size; ++i) data[i] = static_cast<uint8_t>(i * 7 + (i >> 12));
    EXPECT_EQ(::write(fd, data.data(), size), static_cast<ssize_t>(size));
    ::close(fd);
    data_ = std::move(data);
  }
  ~TempFile() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }
  const std::vector<uint8_t>& data() const { return data_; }

 private:
  std::string path_;
  std::vector<uint8_t> data_;
};

class ReactorTest : public ::testing::TestWithParam<EngineKind> {
 protected:
  void SetUp() override {
    auto r = Reactor::Create(GetParam());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    reactor_ = std::move(*r);
  }
  std::unique_ptr<Reactor> reactor_;
};

Task<int> Add(int a, int b) {
  co_return a + b;
}
Task<int> Nested(int depth) {
  if (depth == 0) co_return 0;
  int below = co_await Nested(depth - 1);
  co_return below + co_await Add(1, 0);
}

TEST_P(ReactorTest, NestedTasksReturnValues) {
  EXPECT_EQ(reactor_->BlockOn(Nested(1000)), 1000);
}

Task<int64_t> SumLoop(int n) {
  int64_t sum = 0;
  for (int i = 0; i < n; ++i) sum += co_await Add(i, 1);
  co_return sum;
}

TEST_P(ReactorTest, LoopsOverSynchronousTasksUseNoStack) {
  // A million inline completions would overflow the stack if each nested a frame.
  EXPECT_EQ(reactor_->BlockOn(SumLoop(1000000)), int64_t(1000000) * 1000001 / 2);
}

Task<int64_t> ReadLoop(File* f, int n) {
  int64_t total = 0;
  std::byte b[512];
  for (int i = 0; i < n; ++i) {
    auto r = co_await f->ReadAt(b, (i % 8) * 512);
    if (!r.ok()) co_return -1;
    total += static_cast<int64_t>(*r);
  }
  co_return total;
}

TEST_P(ReactorTest, LoopsOverIoUseNoStack) {
  TempFile tf(4096);
  auto f = File::Open(tf.path(), false);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(reactor_->BlockOn(ReadLoop(f->get(), 200000)), int64_t(200000) * 512);
}

TEST_P(ReactorTest, EngineIsTheOneAskedFor) {
  EXPECT_STREQ(reactor_->engine().name(), GetParam() == EngineKind::kSync ? "sync" : "io_uring");
}

Task<int64_t> UringCmd(int fd, uint32_t cmd_op, const void* payload) {
  IoAwaiter io{};
  io.req.op = IoOp::kUringCmd;
  io.req.fd = fd;
  io.req.msg_flags = cmd_op;
  io.req.buf = const_cast<void*>(payload);
  const int64_t r = co_await io;
  co_return r;
}

// A driver command on a file whose driver has none (a regular file) completes with
// EOPNOTSUPP on both engines (the blocking one has no driver commands at all).
TEST_P(ReactorTest, DriverCommandsOnAPlainFileAreRefused) {
  TempFile tf(4096);
  auto f = File::Open(tf.path(), false);
  ASSERT_TRUE(f.ok());
  const uint8_t payload[kUringCmdBytes] = {1, 2, 3};
  EXPECT_EQ(reactor_->BlockOn(UringCmd((*f)->fd(), 0xc0107520u, payload)), -EOPNOTSUPP);
}

TEST_P(ReactorTest, ReadsAreCorrectAndShortAtEof) {
  TempFile tf(10000);
  auto f = File::Open(tf.path(), false);
  ASSERT_TRUE(f.ok());
  std::vector<std::byte> buf(4096);
  auto r = reactor_->BlockOn((*f)->ReadAt(buf, 8000));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 2000u);  // short read at end of file
  EXPECT_EQ(std::memcmp(buf.data(), tf.data().data() + 8000, 2000), 0);
  Status s = reactor_->BlockOn((*f)->ReadExact(buf, 8000));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("past end of file"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("0x1f40"), std::string::npos) << s.message();
  EXPECT_TRUE(reactor_->BlockOn((*f)->ReadZeroPadded(buf, 8000)).ok());
  EXPECT_EQ(buf[2500], std::byte{0});
}

TEST_P(ReactorTest, ErrorsArePropagatedAsStatus) {
  TempFile tf(4096);
  auto f = File::Open(tf.path(), false);
  ASSERT_TRUE(f.ok());
  std::vector<std::byte> buf(512);
  Status s = reactor_->BlockOn((*f)->WriteAt(buf, 0));  // read-only descriptor
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EBADF);
  EXPECT_NE(s.message().find("write failed"), std::string::npos) << s.message();
  auto missing = File::Open("/nonexistent/qk", false);
  EXPECT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ENOENT);
}

Task<void> ReadOne(File* f, uint64_t off, std::vector<uint64_t>* order,
                   const std::vector<uint8_t>* expect, int* bad) {
  std::byte b[512];
  auto r = co_await f->ReadAt(b, off);
  if (!r.ok() || *r != 512 || std::memcmp(b, expect->data() + off, 512) != 0) ++*bad;
  order->push_back(off);
}

TEST_P(ReactorTest, ThousandsOfTasksInFlight) {
  constexpr int kTasks = 5000;
  TempFile tf(kTasks * 512);
  auto f = File::Open(tf.path(), false);
  ASSERT_TRUE(f.ok());
  std::vector<uint64_t> order;
  int bad = 0;
  for (int i = 0; i < kTasks; ++i) {
    reactor_->Spawn(ReadOne(f->get(), uint64_t(i) * 512, &order, &tf.data(), &bad));
  }
  if (GetParam() != EngineKind::kSync) {
    EXPECT_GT(reactor_->live_tasks(), 0u);
  }
  reactor_->RunUntilIdle();
  EXPECT_EQ(bad, 0);
  ASSERT_EQ(order.size(), size_t(kTasks));
  std::sort(order.begin(), order.end());
  for (int i = 0; i < kTasks; ++i) EXPECT_EQ(order[i], uint64_t(i) * 512);
}

Task<void> WriteThenRead(File* f, uint64_t off, uint8_t pattern, int* bad) {
  std::vector<std::byte> w(4096, std::byte{pattern}), r(4096);
  if (!(co_await f->WriteAt(w, off)).ok()) ++*bad;
  if (!(co_await f->ReadExact(r, off)).ok() || r != w) ++*bad;
}

TEST_P(ReactorTest, CompletionOrderFollowsDependencies) {
  // Each task's read must observe its own earlier write, whatever order the engine completes
  // independent requests in.
  TempFile tf(64 * 4096);
  auto f = File::Open(tf.path(), true);
  ASSERT_TRUE(f.ok());
  int bad = 0;
  for (int i = 0; i < 64; ++i) reactor_->Spawn(WriteThenRead(f->get(), i * 4096, i, &bad));
  reactor_->RunUntilIdle();
  EXPECT_EQ(bad, 0);
  EXPECT_TRUE(reactor_->BlockOn((*f)->Sync()).ok());
}

TEST_P(ReactorTest, DirectIoHandlesUnalignedRequests) {
  TempFile tf(3 * 4096 + 100);
  auto f = File::Open(tf.path(), true, CacheMode::kNone);
  ASSERT_TRUE(f.ok());
  std::vector<std::byte> buf(5000);
  auto r = reactor_->BlockOn((*f)->ReadAt(buf, 1234));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, 5000u);
  EXPECT_EQ(std::memcmp(buf.data(), tf.data().data() + 1234, 5000), 0);
  std::vector<std::byte> w(100, std::byte{0xee});
  ASSERT_TRUE(reactor_->BlockOn((*f)->WriteAt(w, 3 * 4096 + 50)).ok());
  EXPECT_EQ(*(*f)->Size(), 3u * 4096 + 150);  // no padding left behind
  auto r2 = reactor_->BlockOn((*f)->ReadAt(buf, 3 * 4096));
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(*r2, 150u);
  EXPECT_EQ(buf[49], std::byte{tf.data()[3 * 4096 + 49]});
  EXPECT_EQ(buf[50], std::byte{0xee});
}

Task<void> WriteSector(File* f, uint64_t offset, uint8_t value, int* failed) {
  std::vector<std::byte> w(512, std::byte{value});
  Status s = co_await f->WriteAt(w, offset);
  if (!s.ok()) ++*failed;
}

// Partial-block writes under direct I/O are read-modify-writes: concurrent ones in the same
// block must not undo each other (an NBD client writing 512-byte sectors at queue depth 16).
TEST_P(ReactorTest, ConcurrentPartialBlockWritesAllLand) {
  TempFile tf(2 * 4096);
  auto f = File::Open(tf.path(), true, CacheMode::kNone);
  ASSERT_TRUE(f.ok());
  int failed = 0;
  for (int i = 0; i < 16; ++i) {
    reactor_->Spawn(WriteSector(f->get(), uint64_t(i) * 512, static_cast<uint8_t>(i + 1), &failed));
  }
  reactor_->RunUntilIdle();
  EXPECT_EQ(failed, 0);
  std::vector<std::byte> buf(2 * 4096);
  auto r = reactor_->BlockOn((*f)->ReadAt(buf, 0));
  ASSERT_TRUE(r.ok());
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(buf[i * 512], std::byte(i + 1)) << "sector " << i;
    EXPECT_EQ(buf[i * 512 + 511], std::byte(i + 1)) << "sector " << i;
  }
}

// A partial-block write at the end of a file whose size is not a multiple of the block (its
// padding reaches past the end), while a large aligned write from another thread grows the
// file further: two allocating writes to an image with 1 KiB clusters from two reactors. The
// padding must neither stay behind nor be cut back in a way that drops the other write
// (a truncate after the padded write waited for that direct write and then cut it away).
TEST_P(ReactorTest, PaddedWriteAtEndDoesNotCutAGrowingWrite) {
  int lost = 0;
  for (int round = 0; round < 40; ++round) {
    TempFile tf(4096 + 1024);
    auto f = File::Open(tf.path(), true, CacheMode::kNone);
    ASSERT_TRUE(f.ok());
    AlignedBuffer big(1 << 20);
    std::memset(big.data(), 0x5a, big.size());
    std::vector<std::byte> small(512, std::byte{0xc3});
    std::atomic<int> ready = 0;
    Status big_status, small_status;
    auto write_on_own_reactor = [&](std::span<const std::byte> data, uint64_t offset, Status* out) {
      auto r = Reactor::Create(GetParam());
      ready.fetch_add(1);
      while (ready.load() < 2) {
      }
      *out = (*r)->BlockOn((*f)->WriteAt(data, offset));
    };
    std::thread t1(write_on_own_reactor, big.span(), 8192, &big_status);
    std::thread t2(write_on_own_reactor, std::span<const std::byte>(small), 4096 + 512,
                   &small_status);
    t1.join();
    t2.join();
    ASSERT_TRUE(big_status.ok()) << big_status.ToString();
    ASSERT_TRUE(small_status.ok()) << small_status.ToString();
    ASSERT_EQ(*(*f)->Size(), 8192u + big.size()) << "round " << round;
    AlignedBuffer back(big.size());
    auto r = reactor_->BlockOn((*f)->ReadAt(back.span(), 8192));
    ASSERT_TRUE(r.ok());
    ASSERT_EQ(*r, big.size());
    lost += std::memcmp(back.data(), big.data(), big.size()) != 0;
    std::vector<std::byte> head(4096);
    r = reactor_->BlockOn((*f)->ReadAt(head, 4096));
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(head[511], std::byte{tf.data()[4096 + 511]});
    EXPECT_EQ(head[512], std::byte{0xc3});
    EXPECT_EQ(head[1023], std::byte{0xc3});
    EXPECT_EQ(head[1024], std::byte{0});  // the gap up to the big write reads as zeros
  }
  EXPECT_EQ(lost, 0) << "rounds whose growing write was cut away";
}

TEST_P(ReactorTest, ShutdownWaitsForInflightIo) {
  TempFile tf(256 * 512);
  auto f = File::Open(tf.path(), false);
  ASSERT_TRUE(f.ok());
  std::vector<uint64_t> order;
  int bad = 0;
  for (int i = 0; i < 256; ++i) {
    reactor_->Spawn(ReadOne(f->get(), uint64_t(i) * 512, &order, &tf.data(), &bad));
  }
  reactor_.reset();  // must drain, not abandon, the requests (ASan catches use-after-free)
  EXPECT_EQ(order.size(), 256u);
  EXPECT_EQ(bad, 0);
}

INSTANTIATE_TEST_SUITE_P(Engines, ReactorTest,
                         ::testing::Values(EngineKind::kUring, EngineKind::kSync),
                         [](const auto& info) {
                           return info.param == EngineKind::kSync ? "Sync" : "Uring";
                         });

TEST(EngineKind, ParsesQemuNames) {
  EXPECT_EQ(*ParseEngineKind("io_uring"), EngineKind::kUring);
  EXPECT_EQ(*ParseEngineKind("threads"), EngineKind::kSync);
  EXPECT_FALSE(ParseEngineKind("foo").ok());
  EXPECT_EQ(ParseEngineKind("foo").status().message(), "Invalid aio option: foo");
}

}  // namespace
}  // namespace qcow2kit
