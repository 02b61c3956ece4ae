// Resize against qemu-img: growth past the L1 table's reach, each preallocation mode,
// shrinking (the file is truncated), grown ranges reading zeros (never stale or backing data),
// and the refusals. Every image must pass qemu-img check afterwards.
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "qcow2kit/block.h"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

class ResizeTest : public ::testing::Test {
 protected:
  void SetUp() override { reactor_ = testing::NewReactor(); }

  void Sh(const std::string& cmd) { testing::MustRun("cd " + dir_.path() + " && " + cmd); }
  std::string Out(const std::string& cmd) {
    std::string out;
    int rc = testing::Run("cd " + dir_.path() + " && " + cmd, &out);
    EXPECT_EQ(rc, 0) << cmd << "\n" << out;
    return out;
  }

  std::unique_ptr<BlockDevice> Open(const std::string& name) {
    OpenOptions o;
    o.writable = true;
    auto img = reactor_->BlockOn(OpenImage(dir_ / name, o));
    EXPECT_TRUE(img.ok()) << img.status().ToString();
    if (!img.ok()) return nullptr;
    return std::make_unique<BlockDevice>(std::move(*img));
  }

  Status Resize(const std::string& name, uint64_t size, Preallocation p = Preallocation::kOff) {
    auto dev = Open(name);
    if (!dev) return Status::Invalid("open failed");
    Status s = reactor_->BlockOn(dev->Resize(size, p));
    Status c = reactor_->BlockOn(dev->Close());
    return s.ok() ? c : s;
  }

  void ExpectClean(const std::string& name) {
    std::string out;
    int rc = testing::Run("cd " + dir_.path() + " && qemu-img check " + name, &out);
    EXPECT_EQ(rc, 0) << out;
  }

  uint64_t FileSize(const std::string& name) { return std::stoull(Out("stat -c %s " + name)); }

  testing::ScratchDir dir_;
  std::unique_ptr<Reactor> reactor_;
};

TEST_F(ResizeTest, GrowsPastTheL1TableAndWritesAtTheFarEnd) {
  Sh("qemu-img create -q -f qcow2 img.qcow2 1G");
  Sh("qemu-io -c 'write -P 0x11 0 1M' img.qcow2 >/dev/null");
  const uint64_t size = 2ull << 40;
  ASSERT_TRUE(Resize("img.qcow2", size).ok());
  {
    auto dev = Open("img.qcow2");
    ASSERT_EQ(dev->size(), size);
    std::vector<std::byte> data(65536, std::byte{0x22});
    ASSERT_TRUE(reactor_->BlockOn(dev->Write(size - 65536, data)).ok());
    ASSERT_TRUE(reactor_->BlockOn(dev->Close()).ok());
  }
  ExpectClean("img.qcow2");
  Sh("qemu-io -c 'read -P 0x11 0 1M' -c 'read -P 0x22 2199023190016 64k' -c 'read -P 0 1G 1M' "
     "img.qcow2 >/dev/null");
  EXPECT_NE(Out("qemu-img info --output=json img.qcow2").find("\"virtual-size\": 2199023255552"),
            std::string::npos);
}

TEST_F(ResizeTest, PreallocationModesMatchQemu) {
  for (const char* mode : {"metadata", "falloc", "full"}) {
    SCOPED_TRACE(mode);
    const Preallocation p = std::string(mode) == "metadata" ? Preallocation::kMetadata
                            : std::string(mode) == "falloc" ? Preallocation::kFalloc
                                                            : Preallocation::kFull;
    Sh("rm -f ours.qcow2 theirs.qcow2");
    Sh("qemu-img create -q -f qcow2 ours.qcow2 4M && cp ours.qcow2 theirs.qcow2");
    ASSERT_TRUE(Resize("ours.qcow2", 20 << 20, p).ok());
    Sh(std::string("qemu-img resize -q --preallocation=") + mode + " theirs.qcow2 20M");
    ExpectClean("ours.qcow2");
    Sh("qemu-img compare ours.qcow2 theirs.qcow2 >/dev/null");
    // Same map (data where qemu-img preallocated) and about the same disk usage.
    EXPECT_EQ(Out("qemu-img map --output=json ours.qcow2 | sed 's/\"offset\": [0-9]*//'"),
              Out("qemu-img map --output=json theirs.qcow2 | sed 's/\"offset\": [0-9]*//'"));
    const uint64_t ours = std::stoull(Out("du -k ours.qcow2 | cut -f1"));
    const uint64_t theirs = std::stoull(Out("du -k theirs.qcow2 | cut -f1"));
    EXPECT_LE(ours, theirs + 1024);
    EXPECT_GE(ours + 1024, theirs);
  }
}

TEST_F(ResizeTest, ShrinkDropsTheTailAndTruncatesTheFile) {
  Sh("qemu-img create -q -f qcow2 img.qcow2 16M");
  Sh("qemu-io -c 'write -P 0x33 0 16M' img.qcow2 >/dev/null");
  ASSERT_TRUE(Resize("img.qcow2", 1000 * 1024).ok());
  ExpectClean("img.qcow2");
  EXPECT_LT(FileSize("img.qcow2"), 2u << 20);
  Sh("qemu-io -c 'read -P 0x33 0 1000k' img.qcow2 >/dev/null");
  // Growing again: the rest of the old last cluster and everything after reads zeros, unlike
  // qemu-img 7.2, which shows the stale bytes.
  ASSERT_TRUE(Resize("img.qcow2", 16 << 20).ok());
  ExpectClean("img.qcow2");
  Sh("qemu-io -c 'read -P 0x33 0 1000k' -c 'read -P 0 1000k 15384k' img.qcow2 "
     ">/dev/null");
}

TEST_F(ResizeTest, ShrinkKeepsSnapshotData) {
  Sh("qemu-img create -q -f qcow2 img.qcow2 16M");
  Sh("qemu-io -c 'write -P 0x55 0 16M' img.qcow2 >/dev/null");
  Sh("qemu-img snapshot -c snap img.qcow2");
  ASSERT_TRUE(Resize("img.qcow2", 1 << 20).ok());
  ExpectClean("img.qcow2");
  ASSERT_TRUE(Resize("img.qcow2", 16 << 20).ok());
  ExpectClean("img.qcow2");
  Sh("qemu-io -c 'read -P 0x55 0 1M' -c 'read -P 0 1M 15M' img.qcow2 "
     ">/dev/null");
  Sh("qemu-img convert -l snap -O raw img.qcow2 snap.raw");
  Sh("qemu-io -f raw -c 'read -P 0x55 0 16M' snap.raw >/dev/null");
}

TEST_F(ResizeTest, GrownRangeHidesALongerBackingFile) {
  Sh("qemu-img create -q -f qcow2 base.qcow2 8M");
  Sh("qemu-io -c 'write -P 0x44 0 8M' base.qcow2 >/dev/null");
  Sh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ours.qcow2 4M");
  Sh("cp ours.qcow2 theirs.qcow2");
  ASSERT_TRUE(Resize("ours.qcow2", 12 << 20).ok());
  Sh("qemu-img resize -q theirs.qcow2 12M");
  ExpectClean("ours.qcow2");
  Sh("qemu-img compare ours.qcow2 theirs.qcow2 >/dev/null");
  EXPECT_EQ(Out("qemu-img map --output=json ours.qcow2 | sed 's/\"offset\": [0-9]*//'"),
            Out("qemu-img map --output=json theirs.qcow2 | sed 's/\"offset\": [0-9]*//'"));
}

TEST_F(ResizeTest, SmallClustersGrowTheL1TableManyTimes) {
  Sh("qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 1M");
  for (uint64_t size = 2 << 20; size <= (32 << 20); size *= 2) {
    auto dev = Open("img.qcow2");
    ASSERT_TRUE(reactor_->BlockOn(dev->Resize(size)).ok());
    std::vector<std::byte> data(4096, std::byte(size >> 20));
    ASSERT_TRUE(reactor_->BlockOn(dev->Write(size - 4096, data)).ok());
    ASSERT_TRUE(reactor_->BlockOn(dev->Close()).ok());
  }
  ExpectClean("img.qcow2");
  Sh("qemu-io -c 'read -P 2 2044k 4k' -c 'read -P 32 32764k 4k' img.qcow2 "
     ">/dev/null");
}

TEST_F(ResizeTest, PreallocationAfterARefcountTableGrowthKeepsIt) {
  // 512-byte clusters: preallocating 64 MiB grows the refcount table, which is written past
  // the end of the file; truncating the file to the preallocated end must not cut it off.
  for (Preallocation p : {Preallocation::kMetadata, Preallocation::kFalloc}) {
    Sh("rm -f img.qcow2 && qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 64M");
    Sh("qemu-io -c 'write -P 0x21 1M 64k' img.qcow2 >/dev/null");
    ASSERT_TRUE(Resize("img.qcow2", 128 << 20, p).ok());
    ExpectClean("img.qcow2");
    Sh("qemu-io -c 'read -P 0x21 1M 64k' -c 'read -P 0 64M 64M' img.qcow2 >/dev/null");
  }
}

TEST_F(ResizeTest, GrowsL1WhenTheFirstFreeRunIsTooShort) {
  // After the refcount table moved, the clusters it left form a short free run at the start:
  // the bigger L1 table must go past it, not fail (and not leak it).
  Sh("qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 64M");
  auto dev = Open("img.qcow2");
  ASSERT_TRUE(dev);
  std::vector<std::byte> data(24 << 20, std::byte{0x41});
  ASSERT_TRUE(reactor_->BlockOn(dev->Write(0, data)).ok());
  ASSERT_TRUE(reactor_->BlockOn(dev->Close()).ok());
  dev.reset();
  ASSERT_TRUE(Resize("img.qcow2", 128 << 20).ok());
  std::string out;
  EXPECT_EQ(testing::Run("cd " + dir_.path() + " && qemu-img check img.qcow2", &out), 0) << out;
  EXPECT_EQ(out.find("Leaked"), std::string::npos) << out;
  Sh("qemu-io -c 'read -P 0x41 0 24M' img.qcow2 >/dev/null");
}

TEST_F(ResizeTest, RefusesWhatQemuRefuses) {
  Sh("qemu-img create -q -f qcow2 img.qcow2 4M");
  Status s = Resize("img.qcow2", 1 << 20, Preallocation::kFalloc);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.ToString().find("Preallocation can't be used for shrinking"), std::string::npos);
  s = Resize("img.qcow2", (4 << 20) + 100);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.ToString().find("multiple of 512"), std::string::npos);
  Sh("qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 4M && qemu-img snapshot -c s v2.qcow2");
  s = Resize("v2.qcow2", 8 << 20);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.ToString().find("v2 image which has snapshots"), std::string::npos);
  ExpectClean("img.qcow2");
  ExpectClean("v2.qcow2");
}

TEST_F(ResizeTest, RawImagesGrowAndShrink) {
  Sh("head -c 1M /dev/urandom > img.raw");
  ASSERT_TRUE(Resize("img.raw", 3 << 20).ok());
  EXPECT_EQ(FileSize("img.raw"), 3u << 20);
  ASSERT_TRUE(Resize("img.raw", 512 * 1024).ok());
  EXPECT_EQ(FileSize("img.raw"), 512u * 1024);
}

}  // namespace
}  // namespace qcow2kit
