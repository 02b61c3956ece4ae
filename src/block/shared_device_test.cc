// SharedDevice under real threads: the owner's reactor and three more, each with its own
// port, run rounds of concurrent writes, FUA writes, write-zeroes, discards and flushes in
// their own part of one image, and read it all back against a flat model after each round.
// Discards free clusters that the other threads' allocating writes then take, so the
// mapping-lifetime pins matter. At the end qemu-img check finds no errors or leaks and
// compare finds no difference. Also built and run under ThreadSanitizer (build-tsan).
#include "qcow2kit/shared_device.h"

#include <cstring>
#include <functional>
#include <latch>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "io/wakeup.h"
#include "qcow2kit/buffer.h"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

using Port = SharedDevice::Port;

struct Op {
  enum Kind { kWrite, kFuaWrite, kZeroes, kUnmapZeroes, kDiscard, kFlush } kind;
  uint64_t offset = 0;
  uint64_t length = 0;
  AlignedBuffer data;  // aligned, as a block device's requests are (ublk, the kernel's pages)
};

struct Join {
  size_t remaining = 0;
  Wakeup done;
};

Task<void> RunOp(Port* port, const Op* op, Status* out, Join* join) {
  switch (op->kind) {
    case Op::kWrite:
    case Op::kFuaWrite: {
      Status s = co_await port->Write(op->offset, op->data.span(), op->kind == Op::kFuaWrite);
      *out = s;
      break;
    }
    case Op::kZeroes:
    case Op::kUnmapZeroes: {
      Status s = co_await port->WriteZeroes(op->offset, op->length, op->kind == Op::kUnmapZeroes);
      *out = s;
      break;
    }
    case Op::kDiscard: {
      Status s = co_await port->Discard(op->offset, op->length);
      *out = s;
      break;
    }
    case Op::kFlush: {
      Status s = co_await port->Flush();
      *out = s;
      break;
    }
  }
  if (--join->remaining == 0) join->done.Notify();
}

// One thread's share of the work: `rounds` rounds over guest [base, base + span) of `model`.
struct Worker {
  uint64_t base = 0;
  uint64_t span = 0;
  uint64_t cluster = 0;
  uint64_t seed = 0;
  int rounds = 0;
  bool rewrite_only = false;  // only aligned writes and flushes (of allocated clusters)
  std::vector<std::byte>* model = nullptr;  // the whole image; this worker touches its part
  std::string error;
  Port::Stats stats;
};

Task<void> Work(Port* port, Worker* w) {
  std::mt19937_64 rng(w->seed);
  const uint64_t lengths[] = {512, 4096, 6144, 65536, 100352};
  for (int round = 0; round < w->rounds && w->error.empty(); ++round) {
    std::vector<Op> ops;
    for (int tries = 0; tries < 100 && ops.size() < 12; ++tries) {
      Op op;
      const int pick = static_cast<int>(rng() % 12) / (w->rewrite_only ? 2 : 1);
      op.kind = pick < 6    ? Op::kWrite
                : pick < 7  ? Op::kFuaWrite
                : pick < 8  ? Op::kZeroes
                : pick < 9  ? Op::kUnmapZeroes
                : pick < 11 ? Op::kDiscard
                            : Op::kFlush;
      if (op.kind == Op::kDiscard) {
        // Whole clusters, so that the model knows the outcome (partial ones stay).
        const uint64_t clusters = w->span / w->cluster;
        const uint64_t n = 1 + rng() % 4;
        const uint64_t first = rng() % (clusters - n + 1);
        op.offset = w->base + first * w->cluster;
        op.length = n * w->cluster;
      } else if (op.kind != Op::kFlush) {
        const uint64_t align = w->rewrite_only ? 4096 : 512;
        op.length = w->rewrite_only ? 4096 << (rng() % 5) : lengths[rng() % 5];
        op.offset = w->base + rng() % ((w->span - op.length) / align) * align;
      }
      bool overlaps = false;
      for (const Op& other : ops) {
        overlaps |= op.offset < other.offset + other.length && other.offset < op.offset + op.length;
      }
      if (overlaps) continue;
      if (op.kind == Op::kWrite || op.kind == Op::kFuaWrite) {
        op.data.Resize(op.length);
        std::memset(op.data.data(), 1 + (w->seed * 7 + round * 13 + ops.size()) % 250, op.length);
      }
      ops.push_back(std::move(op));
    }
    std::vector<Status> results(ops.size());
    Join join{ops.size(), {}};
    for (size_t i = 0; i < ops.size(); ++i) {
      Reactor::Current()->Spawn(RunOp(port, &ops[i], &results[i], &join));
    }
    while (join.remaining > 0) co_await join.done.Wait();
    for (size_t i = 0; i < ops.size(); ++i) {
      if (!results[i].ok()) {
        w->error = "op failed: " + results[i].ToString();
        co_return;
      }
      const Op& op = ops[i];
      auto at = w->model->begin() + static_cast<std::ptrdiff_t>(op.offset);
      if (op.kind == Op::kWrite || op.kind == Op::kFuaWrite) {
        std::copy(op.data.span().begin(), op.data.span().end(), at);
      } else if (op.kind != Op::kFlush) {
        std::fill(at, at + static_cast<std::ptrdiff_t>(op.length), std::byte{0});
      }
    }
    // Read the whole part back in pieces of assorted sizes and alignments.
    std::vector<std::byte> got;
    for (uint64_t pos = w->base; pos < w->base + w->span;) {
      const uint64_t n = std::min<uint64_t>(w->base + w->span - pos, lengths[rng() % 5] * 3);
      got.resize(n);
      Status s = co_await port->Read(pos, got);
      if (!s.ok()) {
        w->error = "read failed: " + s.ToString();
        co_return;
      }
      for (uint64_t i = 0; i < n; ++i) {
        if (got[i] != (*w->model)[pos + i]) {
          // Name the differing run and the round's requests: enough to replay the failure.
          uint64_t bad_end = pos + i;
          while (bad_end < pos + n && got[bad_end - pos] != (*w->model)[bad_end]) ++bad_end;
          w->error = "guest [" + std::to_string(pos + i) + ", " + std::to_string(bad_end) +
                     ") differs after round " + std::to_string(round) + " (read " +
                     std::to_string(int(got[i])) + ", expected " +
                     std::to_string(int((*w->model)[pos + i])) + "); the round's requests:";
          for (const Op& op : ops) {
            w->error += " kind " + std::to_string(int(op.kind)) + " at " +
                        std::to_string(op.offset) + "+" + std::to_string(op.length) + ";";
          }
          co_return;
        }
      }
      pos += n;
    }
  }
  w->stats = port->stats();
}

// Serves one worker on a new thread with its own reactor and port.
void RunWorkerThread(SharedDevice* shared, Worker* w, std::latch* attached) {
  auto reactor = testing::NewReactor();
  auto port = shared->Attach();
  attached->count_down();
  if (!port.ok()) {
    w->error = port.status().ToString();
    return;
  }
  reactor->BlockOn(Work(port->get(), w));
  (*port)->Detach();
  reactor->RunUntilIdle();
}

struct SharedCase {
  std::string name;
  std::vector<std::string> setup;  // makes img.qcow2 in the scratch dir
};
void PrintTo(const SharedCase& c, std::ostream* os) {
  *os << c.name;
}

// Runs kThreads workers (the owner's reactor and three more) over img.qcow2 in `dir`, checks
// the image with qemu-img against the model afterwards and returns the ports' statistics.
Port::Stats RunThreads(const testing::ScratchDir& dir, bool rewrite_only) {
  Port::Stats total;
  testing::MustRun("cd " + dir.path() + " && qemu-img convert -O raw img.qcow2 model.raw");
  auto bytes = testing::ReadWholeFile(dir / "model.raw");
  std::vector<std::byte> model(reinterpret_cast<std::byte*>(bytes.data()),
                               reinterpret_cast<std::byte*>(bytes.data()) + bytes.size());

  auto reactor = testing::NewReactor();
  OpenOptions o;
  o.writable = true;
  o.cache = CacheMode::kNone;  // direct I/O where the filesystem has it: the alignment rules
  auto img = reactor->BlockOn(OpenImage(dir / "img.qcow2", o));
  EXPECT_TRUE(img.ok()) << img.status().ToString();
  if (!img.ok()) return total;
  auto dev = std::make_unique<BlockDevice>(std::move(*img));
  auto shared = SharedDevice::Create(dev.get());
  EXPECT_TRUE(shared.ok()) << shared.status().ToString();
  if (!shared.ok()) return total;

  constexpr int kThreads = 4;  // the owner's and three more
  const uint64_t part = model.size() / kThreads;
  std::vector<Worker> workers(kThreads);
  for (int i = 0; i < kThreads; ++i) {
    workers[i].base = part * i;
    workers[i].span = part;
    workers[i].cluster = dev->top().cluster_size();
    workers[i].seed = static_cast<uint64_t>(i + 1);
    workers[i].rounds = 12;
    workers[i].rewrite_only = rewrite_only;
    workers[i].model = &model;
  }
  std::latch attached(kThreads - 1);
  std::vector<std::thread> threads;
  for (int i = 1; i < kThreads; ++i) {
    threads.emplace_back(RunWorkerThread, shared->get(), &workers[i], &attached);
  }
  attached.wait();
  auto own_port = (*shared)->Attach();
  EXPECT_TRUE(own_port.ok());
  if (!own_port.ok()) std::abort();  // the threads wait for this port's owner
  bool own_done = false;
  reactor->Spawn([](Port* port, Worker* w, bool* done) -> Task<void> {
    co_await Work(port, w);
    port->Detach();
    *done = true;
  }(own_port->get(), &workers[0], &own_done));
  while (!own_done || (*shared)->ports() > 0) reactor->RunOnce(true);
  for (auto& t : threads) t.join();
  (*shared)->Stop();
  reactor->RunUntilIdle();
  own_port->reset();
  shared->reset();

  for (const Worker& w : workers) {
    EXPECT_EQ(w.error, "");
    total.fast_reads += w.stats.fast_reads;
    total.fast_writes += w.stats.fast_writes;
    total.owner_ops += w.stats.owner_ops;
    total.refreshes += w.stats.refreshes;
  }
  Status s = reactor->BlockOn(dev->Close());
  EXPECT_TRUE(s.ok()) << s.ToString();
  dev.reset();  // closes the files, dropping the image locks qemu-img below would meet
  testing::ExpectImageMatchesModel(dir, model.data(), model.size());
  return total;
}

class SharedDeviceTest : public ::testing::TestWithParam<SharedCase> {};

TEST_P(SharedDeviceTest, ThreadsKeepEveryWrite) {
  testing::ScratchDir dir;
  for (const auto& cmd : GetParam().setup) testing::MustRun("cd " + dir.path() + " && " + cmd);
  const Port::Stats stats = RunThreads(dir, /*rewrite_only=*/false);
  EXPECT_GT(stats.fast_reads, 0u) << "no read went out on a port's own ring";
  EXPECT_GT(stats.owner_ops, 0u);
}

// Overwrites of allocated clusters change no mapping: once each port has looked a range up,
// they go out on its own ring, and only flushes (and lookups) reach the owner.
TEST(SharedDeviceRewriteTest, OverwritesStayOnThePortsRing) {
  testing::ScratchDir dir;
  testing::MustRun("cd " + dir.path() +
                   " && qemu-img create -q -f qcow2 -o preallocation=falloc img.qcow2 8M");
  const Port::Stats stats = RunThreads(dir, /*rewrite_only=*/true);
  EXPECT_GT(stats.fast_writes, 0u);
  EXPECT_GT(stats.fast_reads, 0u);
  // Owner calls: the flushes and FUA writes' flushes (a sixth and a twelfth of the
  // requests) and nothing else. Lookups: a few per port and range, not one per request.
  EXPECT_LT(stats.owner_ops, stats.fast_writes);
  EXPECT_LT(stats.refreshes, stats.fast_writes + stats.fast_reads);
}

// Opens dir/img.qcow2 writable and serves `fn` with one port on the owner's reactor; then
// detaches, stops and closes the image, returning how the close went.
Status WithOwnPort(const testing::ScratchDir& dir, std::function<Task<void>(Port*)> fn) {
  auto reactor = testing::NewReactor();
  OpenOptions o;
  o.writable = true;
  auto img = reactor->BlockOn(OpenImage(dir / "img.qcow2", o));
  if (!img.ok()) return img.status();
  BlockDevice dev(std::move(*img));
  auto shared = SharedDevice::Create(&dev);
  if (!shared.ok()) return shared.status();
  auto port = (*shared)->Attach();
  if (!port.ok()) return port.status();
  reactor->BlockOn(fn(port->get()));
  (*port)->Detach();
  while ((*shared)->ports() > 0) reactor->RunOnce(true);
  (*shared)->Stop();
  reactor->RunUntilIdle();
  return reactor->BlockOn(dev.Close());
}

// Empty requests complete at once and take no pin (a pin counted for an empty request once
// wrapped the port's record of retired pins).
TEST(SharedDeviceEdgeTest, EmptyRequestsComplete) {
  testing::ScratchDir dir;
  testing::MustRun("cd " + dir.path() + " && qemu-img create -q -f qcow2 img.qcow2 4M");
  Status closed = WithOwnPort(dir, [](Port* port) -> Task<void> {
    AlignedBuffer none;
    Status r = co_await port->Read(4096, none.span());
    EXPECT_TRUE(r.ok()) << r.ToString();
    Status w = co_await port->Write(4096, none.span(), /*fua=*/true);
    EXPECT_TRUE(w.ok()) << w.ToString();
    EXPECT_EQ(port->stats().fast_reads + port->stats().fast_writes, 0u);
  });
  EXPECT_TRUE(closed.ok()) << closed.ToString();
}

// A port that checked a cluster for writing stops writing to it once another write finds the
// image damaged: as without ports, every write of a corrupt image is refused.
TEST(SharedDeviceEdgeTest, CorruptImageRefusesCachedWrites) {
  testing::ScratchDir dir;
  testing::MustRun("cd " + dir.path() + " && qemu-img create -q -f qcow2 img.qcow2 4M && " +
                   "qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 1M 64k' img.qcow2 >/dev/null");
  // The L2 entry of guest 1 MiB pointed at the first refcount block.
  testing::MustRun("cd " + dir.path() +
                   " && python3 -c \"import struct;f=open('img.qcow2','r+b');h=f.read(56);"
                   "l1=struct.unpack('>Q',h[40:48])[0];rt=struct.unpack('>Q',h[48:56])[0];"
                   "f.seek(rt);rb=struct.unpack('>Q',f.read(8))[0];f.seek(l1);"
                   "l2=struct.unpack('>Q',f.read(8))[0]&0xfffffffffe00;f.seek(l2+16*8);"
                   "f.write(struct.pack('>Q',rb|(1<<63)))\"");
  (void)WithOwnPort(dir, [](Port* port) -> Task<void> {
    AlignedBuffer data(4096);
    std::memset(data.data(), 0x33, data.size());
    for (int i = 0; i < 2; ++i) {
      Status s = co_await port->Write(0, data.span());
      EXPECT_TRUE(s.ok()) << s.ToString();
    }
    EXPECT_EQ(port->stats().fast_writes, 2u) << "the writes did not go out on the port's ring";
    Status damaged = co_await port->Write(1 << 20, data.span());
    EXPECT_EQ(damaged.code(), EIO) << damaged.ToString();
    Status after = co_await port->Write(0, data.span());
    EXPECT_EQ(after.code(), EIO) << "a cached write went through on a corrupt image";
    EXPECT_EQ(port->stats().fast_writes, 2u);
  });
}

std::vector<SharedCase> Cases() {
  const std::string fill =
      "qemu-io -c 'write -P 0x5c 0 1M' -c 'write -P 0x6d 3M 1M' -c 'write -z 5M 256k' "
      "-c 'write -P 0x7e 6M 64k' img.qcow2 >/dev/null";
  return {
      {"Default64k", {"qemu-img create -q -f qcow2 img.qcow2 8M", fill}},
      {"Clusters4k", {"qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 8M", fill}},
      {"Clusters1k", {"qemu-img create -q -f qcow2 -o cluster_size=1k img.qcow2 8M", fill}},
      {"ExtendedL2WithBacking",
       {"qemu-img create -q -f qcow2 base.qcow2 8M",
        "qemu-io -c 'write -P 0x33 0 8M' base.qcow2 >/dev/null",
        "qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 img.qcow2", fill}},
      {"DataFile", {"qemu-img create -q -f qcow2 -o data_file=img.data img.qcow2 8M", fill}},
      {"Compressed",
       {"qemu-img create -q -f qcow2 src.qcow2 8M",
        "qemu-io -c 'write -P 0x41 0 8M' src.qcow2 >/dev/null",
        "qemu-img convert -c -O qcow2 src.qcow2 img.qcow2"}},
  };
}

INSTANTIATE_TEST_SUITE_P(Images, SharedDeviceTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace qcow2kit
