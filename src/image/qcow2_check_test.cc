// Check and repair through the library: counts and diagnostics as qemu-img reports them
// (tests/test_check.py compares the whole matrix with qemu-img), and regressions found by
// fuzzing.
#include "image/qcow2_check.h"

#include <sys/stat.h>

#include <algorithm>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "image/qcow2_image.h"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

class CheckTest : public ::testing::Test {
 protected:
  void SetUp() override { reactor_ = testing::NewReactor(); }
  void Sh(const std::string& cmd) { testing::MustRun("cd " + dir_.path() + " && " + cmd); }
  // A python3 one-liner on the image's bytes (f: the open file, struct imported).
  void Poke(const std::string& code) {
    Sh("python3 -c \"import struct;f=open('img.qcow2','r+b');" + code + "\"");
  }

  Result<CheckResult> Check(unsigned fix, std::vector<std::string>* lines) {
    OpenOptions o;
    o.writable = fix != kFixNothing;
    o.check = true;
    auto img = reactor_->BlockOn(OpenImage(dir_ / "img.qcow2", o));
    if (!img.ok()) return img.status();
    auto* q = dynamic_cast<Qcow2Image*>(img->get());
    auto r = reactor_->BlockOn(
        q->Check(fix, [lines](const std::string& line) { lines->push_back(line); }));
    Status closed = reactor_->BlockOn(q->Close());
    if (!closed.ok()) return closed;
    return r;
  }

  uint64_t FileSize() {
    struct stat st {};
    ::stat((dir_ / "img.qcow2").c_str(), &st);
    return static_cast<uint64_t>(st.st_size);
  }

  testing::ScratchDir dir_;
  std::unique_ptr<Reactor> reactor_;
};

TEST_F(CheckTest, ReportsAndRepairsALeak) {
  Sh("qemu-img create -q -f qcow2 img.qcow2 64M");
  Sh("qemu-io -c 'write -P 1 0 128k' -c 'write -P 2 1M 64k' img.qcow2 >/dev/null");
  // The L2 entry of guest cluster 0 cleared: its data cluster (5) is leaked.
  Poke(
      "h=f.read(48);l1=struct.unpack('>Q',h[40:48])[0];f.seek(l1);"
      "l2=struct.unpack('>Q',f.read(8))[0]&0xfffffffffe00;f.seek(l2);f.write(bytes(8))");
  std::vector<std::string> lines;
  auto r = Check(kFixNothing, &lines);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->leaks, 1u);
  EXPECT_EQ(r->corruptions, 0u);
  EXPECT_EQ(r->allocated_clusters, 2u);
  EXPECT_EQ(r->total_clusters, 1024u);
  EXPECT_EQ(r->image_end_offset, 524288u);
  EXPECT_EQ(lines, std::vector<std::string>{"Leaked cluster 5 refcount=1 reference=0"});
  lines.clear();
  r = Check(kFixLeaks, &lines);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->leaks_fixed, 1u);
  lines.clear();
  r = Check(kFixNothing, &lines);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->leaks, 0u);
  EXPECT_TRUE(lines.empty());
  Sh("qemu-img check img.qcow2 >/dev/null");
}

TEST_F(CheckTest, ARefcountBlockFarPastTheEndIsReplacedNotReached) {
  // Found by fuzz_repair: QEMU grows the file to reach a refcount block the table says lies
  // terabytes past its end (a sparse file that every later pass then walks); we rebuild.
  Sh("qemu-img create -q -f qcow2 -o cluster_size=4096 img.qcow2 16M");
  Sh("qemu-io -c 'write -P 1 0 64k' img.qcow2 >/dev/null");
  Poke(
      "h=f.read(56);rt=struct.unpack('>Q',h[48:56])[0];f.seek(rt+8);"
      "f.write(struct.pack('>Q',0x60000000000))");
  std::vector<std::string> lines;
  auto r = Check(kFixAll, &lines);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->corruptions, 0u);
  EXPECT_LT(FileSize(), 1u << 20);
  EXPECT_NE(std::find(lines.begin(), lines.end(), "Rebuilding refcount structure"), lines.end());
  Sh("qemu-img check img.qcow2 >/dev/null");
  Sh("qemu-io -c 'read -P 1 0 64k' img.qcow2 >/dev/null");
}

TEST_F(CheckTest, AReferenceFarPastTheEndIsACorruptionNotAnAllocation) {
  Sh("qemu-img create -q -f qcow2 img.qcow2 64M");
  Sh("qemu-io -c 'write -P 1 0 64k' img.qcow2 >/dev/null");
  // The data cluster's L2 entry pointing 2^55 bytes away.
  Poke(
      "h=f.read(48);l1=struct.unpack('>Q',h[40:48])[0];f.seek(l1);"
      "l2=struct.unpack('>Q',f.read(8))[0]&0xfffffffffe00;f.seek(l2);"
      "f.write(struct.pack('>Q',(1<<63)|(1<<55)))");
  std::vector<std::string> lines;
  auto r = Check(kFixNothing, &lines);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_GE(r->corruptions, 1u);
  ASSERT_FALSE(lines.empty());
  EXPECT_EQ(lines[0],
            "ERROR: counting reference for region exceeding the end of the file by one cluster "
            "or more: offset 0x80000000000000 size 0x10000");
}

}  // namespace
}  // namespace qcow2kit
