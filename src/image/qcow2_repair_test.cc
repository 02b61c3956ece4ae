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
  void SetUp() override { reactor_ = testing::NewReactor(); }
  void Sh(const std::string& cmd) { testing::MustRun("cd " + dir_.path() + " && " + cmd); }
  int Rc(const std::string& cmd, std::string* out = nullptr) {
    return testing::Run("cd " + dir_.path() + " && " + cmd, out);
  }
  // qemu-io must succeed: it exits non-zero when a read does not match its pattern.
  void ExpectQemuIo(const std::string& args) {
    std::string out;
    EXPECT_EQ(Rc("qemu-io " + args + " 2>&1", &out), 0) << args << "\n" << out;
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
  ExpectQemuIo(
      "-c 'read -P 0x5a 0 512k' -c 'read -P 0x7c 512k 1M' -c 'read -P 0x6b 2M 64k' "
      "-c 'read -P 0x11 5M 300k' img.qcow2");
  // The snapshot still holds the old data.
  Sh("qemu-img convert -l snap -O raw img.qcow2 snap.raw");
  ExpectQemuIo("-f raw -c 'read -P 0x5a 0 1M' snap.raw");
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
  ExpectQemuIo("-c 'read -P 0x42 1M 3M' -c 'read -P 0 0 1M' img.qcow2");
}

TEST_F(RepairTest, RepairsAsQemuCheckRepairAllDoes) {
  // A dirty image whose L2 entry points past the end of the file: the repair on open is
  // check -r all, so the result is what qemu-img's repair of a twin leaves (one corruption
  // it cannot fix; the image still opens, as in QEMU).
  Sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 16M");
  Rc("qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 8M 64k' -c 'sigraise 9' img.qcow2 "
     ">/dev/null 2>&1");
  Sh("truncate -s 327680 img.qcow2");  // cuts the data cluster at 0x50000 off
  Sh("cp img.qcow2 twin.qcow2");
  Rc("qemu-img check -r all twin.qcow2 >/dev/null 2>&1");
  {
    auto img = OpenWritable();
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    BlockDevice dev(std::move(*img));
    ASSERT_TRUE(reactor_->BlockOn(dev.Close()).ok());
  }
  std::string ours, theirs;
  const int rc = Rc("qemu-img check img.qcow2 2>&1", &ours);
  EXPECT_EQ(rc, Rc("qemu-img check twin.qcow2 2>&1", &theirs));
  EXPECT_EQ(ours, theirs);
  EXPECT_EQ(rc, 2) << ours;
  ExpectQemuIo("-c 'read -P 0 0 64k' img.qcow2");  // the lost cluster reads as zeros
}

}  // namespace
}  // namespace qcow2kit
