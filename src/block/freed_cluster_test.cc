// I/O epochs (docs/architecture.md): a host cluster that loses its last reference is not
// handed out again while I/O issued under its old mapping is in flight. Each test holds a
// read or write back at the engine (DelayEngine, on io_uring), frees the cluster it goes to,
// has the allocator look for space, then lets the held request reach the file: a read must
// return the data it was issued for, a write must not land in a cluster that now holds other
// data, and the freed cluster must be reused once the request is done (it is released, not
// leaked). qemu-img check and qemu-img's reading of the image judge the result.
#include <algorithm>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "io/delay_engine.h"
#include "qcow2kit/block.h"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

constexpr uint64_t kCluster = 65536;

// A request run as a task, and what became of it.
struct Pending {
  std::vector<std::byte> buf;
  Status status;
  bool done = false;
};

Task<void> ReadInto(BlockDevice* dev, uint64_t offset, Pending* p) {
  Status s = co_await dev->Read(offset, p->buf);
  p->status = s;
  p->done = true;
}

Task<void> WriteFrom(BlockDevice* dev, uint64_t offset, Pending* p) {
  Status s = co_await dev->Write(offset, p->buf);
  p->status = s;
  p->done = true;
}

// Discards guest cluster 0, makes the release due (the first flush makes the removal durable,
// the second applies due releases), then writes p->buf to guest cluster 8, which the
// allocator places in the first free cluster.
Task<void> FreeAndAllocate(BlockDevice* dev, Pending* p) {
  Status s = co_await dev->Discard(0, kCluster);
  if (s.ok()) s = co_await dev->Flush();
  if (s.ok()) s = co_await dev->Flush();
  if (s.ok()) s = co_await dev->Write(8 * kCluster, p->buf);
  p->status = s;
  p->done = true;
}

std::vector<std::byte> Filled(size_t n, uint8_t v) {
  return std::vector<std::byte>(n, std::byte{v});
}

bool AllAre(const std::vector<std::byte>& buf, size_t from, size_t to, uint8_t v) {
  return std::all_of(buf.begin() + from, buf.begin() + to,
                     [&](std::byte b) { return b == std::byte{v}; });
}

class FreedClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    reactor_ = testing::NewReactor();
    delay_ = new DelayEngine(reactor_->ReplaceEngine(nullptr));
    reactor_->ReplaceEngine(std::unique_ptr<Engine>(delay_));
  }
  // Also after a failed assertion: the tasks finish before their Pending state goes.
  void TearDown() override {
    delay_->ReleaseAll();
    reactor_->RunUntilIdle();
  }

  void Sh(const std::string& cmd) { testing::MustRun("cd " + dir_.path() + " && " + cmd); }

  std::unique_ptr<BlockDevice> Open() {
    OpenOptions o;
    o.writable = true;
    auto img = reactor_->BlockOn(OpenImage(dir_ / "img.qcow2", o));
    EXPECT_TRUE(img.ok()) << img.status().ToString();
    if (!img.ok()) return nullptr;
    return std::make_unique<BlockDevice>(std::move(*img));
  }

  // The mapping of the cluster at guest `offset`.
  Extent MappingOf(BlockDevice* dev, uint64_t offset) {
    std::vector<Extent> extents;
    Status s = reactor_->BlockOn(dev->top().Fetch(offset, kCluster, &extents));
    EXPECT_TRUE(s.ok()) << s.ToString();
    return extents.empty() ? Extent{} : extents.front();
  }

  // Holds the next read or write of the image file that meets the host bytes of `e`.
  void HoldIoTo(BlockDevice* dev, IoOp op, const Extent& e) {
    const uint64_t length = e.kind == ExtentKind::kCompressed ? e.compressed_length : kCluster;
    delay_->HoldNext({.op = op,
                      .fd = dev->top().file(0)->fd(),
                      .lo = e.host_offset,
                      .hi = e.host_offset + length});
  }

  // Drives the reactor until `until()` or until nothing is left to run but what waits for a
  // held request: no other request in flight and no coroutine resumed for many loop turns
  // (turns, not time: a coroutine that is not waiting for I/O runs within a few).
  template <typename Until>
  bool DriveWhileUnblocked(Until until) {
    for (int idle_turns = 0; !until() && idle_turns < 1000;) {
      const bool io = delay_->passed_in_flight() > 0;
      reactor_->RunOnce(io);  // blocks only for requests that will complete
      idle_turns = io ? 0 : idle_turns + 1;
    }
    return until();
  }

  void DriveUntil(const bool* done) {
    while (!*done) reactor_->RunOnce(true);
  }

  // Closes the device, then: qemu-img check finds nothing wrong, and qemu-img reads the
  // guest as qcow2kit does.
  void CloseAndJudge(std::unique_ptr<BlockDevice> dev) {
    ASSERT_TRUE(reactor_->BlockOn(dev->Close()).ok());
    dev.reset();
    std::string out;
    EXPECT_EQ(testing::Run("cd " + dir_.path() + " && qemu-img check img.qcow2", &out), 0) << out;
    Sh("qemu-img convert -O raw img.qcow2 qemu.raw");
    auto theirs = testing::ReadWholeFile(dir_ / "qemu.raw");
    auto reopened = Open();
    ASSERT_TRUE(reopened);
    std::vector<std::byte> ours(reopened->size());
    ASSERT_TRUE(reactor_->BlockOn(reopened->Read(0, ours)).ok());
    ASSERT_EQ(theirs.size(), ours.size());
    EXPECT_TRUE(std::equal(ours.begin(), ours.end(), theirs.begin(), [](std::byte a, uint8_t b) {
      return a == std::byte{b};
    })) << "qemu-img and qcow2kit read the image differently";
    ASSERT_TRUE(reactor_->BlockOn(reopened->Close()).ok());
  }

  // A read of guest cluster 0 is held while its host cluster is freed and 0xbb written to
  // guest cluster 8: the read must return `old_value`, cluster 8 must not go to the held
  // read's cluster, and once the read is done that cluster is reused.
  void ReadSurvivesFree(uint8_t old_value, bool compressed);

  testing::ScratchDir dir_;
  std::unique_ptr<Reactor> reactor_;
  DelayEngine* delay_ = nullptr;  // owned by reactor_
  Pending held_, other_;
};

void FreedClusterTest::ReadSurvivesFree(uint8_t old_value, bool compressed) {
  auto dev = Open();
  ASSERT_TRUE(dev);
  const Extent old = MappingOf(dev.get(), 0);
  ASSERT_EQ(old.kind, compressed ? ExtentKind::kCompressed : ExtentKind::kData);

  held_.buf.resize(kCluster);
  HoldIoTo(dev.get(), IoOp::kRead, old);
  reactor_->Spawn(ReadInto(dev.get(), 0, &held_));
  ASSERT_TRUE(DriveWhileUnblocked([&] { return delay_->held() > 0; }))
      << "the read was never issued";

  // While the read is held: free its cluster and allocate.
  other_.buf = Filled(kCluster, 0xbb);
  reactor_->Spawn(FreeAndAllocate(dev.get(), &other_));
  ASSERT_TRUE(DriveWhileUnblocked([&] { return other_.done; }))
      << "freeing and allocating waited for the held read";
  ASSERT_TRUE(other_.status.ok()) << other_.status.ToString();
  const uint64_t old_cluster = old.host_offset / kCluster * kCluster;
  const Extent placed = MappingOf(dev.get(), 8 * kCluster);
  ASSERT_EQ(placed.kind, ExtentKind::kData);
  EXPECT_NE(placed.host_offset, old_cluster)
      << "a cluster with a read in flight was handed out again";

  delay_->ReleaseAll();
  DriveUntil(&held_.done);
  ASSERT_TRUE(held_.status.ok()) << held_.status.ToString();
  EXPECT_TRUE(AllAre(held_.buf, 0, kCluster, old_value)) << "the held read returned other data";

  // Now nothing is in flight: the release goes through and the cluster is reused.
  ASSERT_TRUE(reactor_->BlockOn(dev->Flush()).ok());
  ASSERT_TRUE(reactor_->BlockOn(dev->Flush()).ok());
  ASSERT_TRUE(reactor_->BlockOn(dev->Write(9 * kCluster, Filled(kCluster, 0xcc))).ok());
  EXPECT_EQ(MappingOf(dev.get(), 9 * kCluster).host_offset, old_cluster)
      << "the freed cluster was not released after the read";
  CloseAndJudge(std::move(dev));
}

TEST_F(FreedClusterTest, ReadOfADiscardedClusterReturnsTheOldData) {
  Sh("qemu-img create -q -f qcow2 img.qcow2 1M");
  Sh("qemu-io -c 'write -P 0xaa 0 64k' img.qcow2 >/dev/null");
  ReadSurvivesFree(0xaa, false);
}

TEST_F(FreedClusterTest, ReadOfADiscardedCompressedClusterReturnsTheOldData) {
  Sh("qemu-img create -q -f qcow2 img.qcow2 1M");
  Sh("qemu-io -c 'write -c -P 0xaa 0 64k' img.qcow2 >/dev/null");
  ReadSurvivesFree(0xaa, true);
}

// A write in place is held while its cluster is discarded and another guest cluster is
// allocated: wherever the discard is ordered, the held write must not reach the new data.
TEST_F(FreedClusterTest, HeldWriteDoesNotLandInAReusedCluster) {
  Sh("qemu-img create -q -f qcow2 img.qcow2 1M");
  Sh("qemu-io -c 'write -P 0xaa 0 64k' img.qcow2 >/dev/null");
  auto dev = Open();
  ASSERT_TRUE(dev);
  const Extent old = MappingOf(dev.get(), 0);
  ASSERT_EQ(old.kind, ExtentKind::kData);

  held_.buf = Filled(4096, 0xdd);
  HoldIoTo(dev.get(), IoOp::kWrite, old);
  reactor_->Spawn(WriteFrom(dev.get(), 0, &held_));
  ASSERT_TRUE(DriveWhileUnblocked([&] { return delay_->held() > 0; }))
      << "the write was never issued";

  // The discard may wait for the held write (a range lock) or go ahead; either is correct.
  other_.buf = Filled(kCluster, 0xbb);
  reactor_->Spawn(FreeAndAllocate(dev.get(), &other_));
  if (DriveWhileUnblocked([&] { return other_.done; })) {
    ASSERT_TRUE(other_.status.ok()) << other_.status.ToString();
    EXPECT_NE(MappingOf(dev.get(), 8 * kCluster).host_offset, old.host_offset)
        << "a cluster with a write in flight was handed out again";
  }
  delay_->ReleaseAll();
  DriveUntil(&held_.done);
  DriveUntil(&other_.done);
  ASSERT_TRUE(held_.status.ok()) << held_.status.ToString();
  ASSERT_TRUE(other_.status.ok()) << other_.status.ToString();

  std::vector<std::byte> got(kCluster);
  ASSERT_TRUE(reactor_->BlockOn(dev->Read(8 * kCluster, got)).ok());
  EXPECT_TRUE(AllAre(got, 0, kCluster, 0xbb)) << "the held write reached the new cluster";
  ASSERT_TRUE(reactor_->BlockOn(dev->Read(0, got)).ok());
  const bool discarded = AllAre(got, 0, kCluster, 0);
  const bool written = AllAre(got, 0, 4096, 0xdd) && AllAre(got, 4096, kCluster, 0xaa);
  EXPECT_TRUE(discarded || written) << "guest cluster 0 is neither discarded nor written";
  CloseAndJudge(std::move(dev));
}

}  // namespace
}  // namespace qcow2kit
