// A dirty lazy-refcounts image (QEMU killed mid-session, or our own writes cut short) is
// repaired on read-write open: afterwards qemu-img check finds no errors and no leaks, the
// data is intact and the dirty bit is gone.
#include <string>

#include "gtest/gtest.h"
#include "image/qcow2_image.h"
#include "qcow2kit/block.h"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

class RepairTest : public ::testing::Test {
 protected:
  void SetUp() override { reactor_ = std::move(*Reactor::Create()); }
  void Sh(const std::string& cmd) { testing::MustRun("cd " + dir_.path() + " && " + cmd); }
  int Rc(const std::string& cmd, std::string* out = nullptr) {
    return testing::Run("cd " + dir_.path() + " && " + cmd, out);
  }

  Result<std::unique_ptr<FormatDriver>> OpenWritable() {
    OpenOptions o;
    o.writable = true;
    return reactor_->BlockOn(OpenImage(dir_ / "img.qcow2", o));
  }

  testing::ScratchDir dir_;
  std::unique_ptr<Reactor> reactor_;
};

TEST_F(RepairTest, RepairsAnImageQemuLeftDirty) {
  Sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=4k img.qcow2 8M");
  Sh("qemu-io -c 'write -P 0x5a 0 1M' -c 'write -c -P 0x6b 2M 64k' img.qcow2 >/dev/null");
  Sh("qemu-img snapshot -c snap img.qcow2");
  // Overwrites under the snapshot (copy-on-write), then dies without closing.
  Rc("qemu-io -c 'write -P 0x7c 512k 1M' -c 'write -P 0x11 5M 300k' -c 'sigraise 9' "
     "img.qcow2 >/dev/null 2>&1");
  std::string out;
  ASSERT_NE(Rc("qemu-img check img.qcow2", &out), 0) << "not dirty after all:\n" << out;
  {
    auto img = OpenWritable();
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    auto* q = dynamic_cast<Qcow2Image*>(img->get());
    ASSERT_NE(q, nullptr);
    EXPECT_GT(q->repaired_refcounts(), 0u);
    EXPECT_FALSE(q->header().dirty());
    BlockDevice dev(std::move(*img));
    ASSERT_TRUE(reactor_->BlockOn(dev.Close()).ok());
  }
  EXPECT_EQ(Rc("qemu-img check img.qcow2", &out), 0) << out;
  EXPECT_EQ(out.find("Leaked"), std::string::npos) << out;
  Sh("qemu-io -c 'read -P 0x5a 0 512k' -c 'read -P 0x7c 512k 1M' -c 'read -P 0x6b 2M 64k' "
     "-c 'read -P 0x11 5M 300k' img.qcow2 | grep -q verification && exit 1 || true");
  // The snapshot still holds the old data.
  Sh("qemu-img convert -l snap -O raw img.qcow2 snap.raw");
  Sh("qemu-io -f raw -c 'read -P 0x5a 0 1M' snap.raw | grep -q verification && exit 1 || true");
}

TEST_F(RepairTest, RepairsOurOwnDirtyImage) {
  Sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 16M");
  {
    auto img = OpenWritable();
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    BlockDevice dev(std::move(*img));
    std::vector<std::byte> data(3 << 20, std::byte{0x42});
    ASSERT_TRUE(reactor_->BlockOn(dev.Write(1 << 20, data)).ok());
    ASSERT_TRUE(reactor_->BlockOn(dev.Flush()).ok());
    // Dropped without Close: like a crash after the flush.
  }
  std::string out;
  ASSERT_NE(Rc("qemu-img check img.qcow2", &out), 0) << out;
  {
    auto img = OpenWritable();
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    BlockDevice dev(std::move(*img));
    ASSERT_TRUE(reactor_->BlockOn(dev.Close()).ok());
  }
  EXPECT_EQ(Rc("qemu-img check img.qcow2", &out), 0) << out;
  Sh("qemu-io -c 'read -P 0x42 1M 3M' -c 'read -P 0 0 1M' img.qcow2 "
     "| grep -q verification && exit 1 || true");
}

TEST_F(RepairTest, RefusesWhatItCannotRepairInPlace) {
  // A dirty image whose L2 entry points past the end of the file.
  Sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 16M");
  Rc("qemu-io -c 'write -P 1 0 64k' -c 'sigraise 9' img.qcow2 >/dev/null 2>&1");
  Sh("truncate -s 327680 img.qcow2");  // cuts the data cluster at 0x50000 off
  auto img = OpenWritable();
  ASSERT_FALSE(img.ok());
  EXPECT_NE(img.status().ToString().find("qemu-img check -r all"), std::string::npos)
      << img.status().ToString();
}

}  // namespace
}  // namespace qcow2kit
