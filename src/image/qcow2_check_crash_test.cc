// Power failure during check -r all: a repair (a rebuild of the refcount structures; a
// rewrite of the snapshot table) is recorded with the power-fail simulator and cut at every
// point. At each cut the image must open, hold the same guest data and snapshot contents, and
// be in one of two states: the damage still there (the old structures in effect) or repaired
// (qemu-img check finds no corruption; leaks allowed). A second repair of any crash state
// leaves a clean image.
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "image/qcow2_image.h"
#include "io/powerfail_engine.h"
#include "nlohmann/json.hpp"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

struct QemuCheckResult {
  int exit_code = -1;
  uint64_t corruptions = 0, check_errors = 0;
};

QemuCheckResult QemuCheck(const std::string& path) {
  std::string out;
  QemuCheckResult r;
  r.exit_code = testing::Run("{ qemu-img check --output=json '" + path + "' 2>/dev/null; }", &out);
  auto j = nlohmann::json::parse(out, nullptr, false);
  if (j.is_object()) {
    r.corruptions = j.value("corruptions", 0);
    r.check_errors = j.value("check-errors", 0);
  }
  return r;
}

// The guest data and the contents of snapshot "snap", as qemu-img reads them.
std::string GuestSha(const std::string& path) {
  std::string out;
  testing::Run("{ for s in '' snapshot.name=snap; do qemu-img convert -U ${s:+-l $s} -O raw '" +
                   path + "' '" + path + ".raw' 2>/dev/null && sha256sum < '" + path +
                   ".raw' && rm -f '" + path + ".raw'; done; }",
               &out);
  return out;
}

Status RepairAll(Reactor* reactor, const std::string& path, CheckResult* result) {
  OpenOptions o;
  o.writable = true;
  o.check = true;
  o.format = "qcow2";
  o.allow_backing = false;
  auto img = reactor->BlockOn(OpenImage(path, o));
  if (!img.ok()) return img.status();
  auto* q = dynamic_cast<Qcow2Image*>(img->get());
  auto r = reactor->BlockOn(q->Check(kFixAll, nullptr));
  if (!r.ok()) return r.status();
  *result = *r;
  return reactor->BlockOn(q->Close());
}

// Records `check -r all` of the damaged `img`, then checks every cut of it (see the top).
void ExpectRepairSurvivesPowerFailure(const testing::ScratchDir& dir, const std::string& img,
                                      const std::string& sha, const QemuCheckResult& damaged) {
  // Record the repair.
  auto reactor = std::move(*Reactor::Create(EngineKind::kUring));
  auto* recorder = new PowerFailRecorder(reactor->ReplaceEngine(nullptr));
  reactor->ReplaceEngine(std::unique_ptr<Engine>(recorder));
  int fd = -1;
  {
    OpenOptions o;
    o.writable = true;
    o.check = true;
    auto opened = reactor->BlockOn(OpenImage(img, o));
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    auto* q = dynamic_cast<Qcow2Image*>(opened->get());
    fd = q->file(0)->fd();
    auto r = reactor->BlockOn(q->Check(kFixAll, nullptr));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->corruptions, 0u);
    EXPECT_GT(r->corruptions_fixed, 0u);
    ASSERT_TRUE(reactor->BlockOn(q->Close()).ok());
    ASSERT_TRUE(recorder->tracked(fd));
  }
  auto owned = reactor->ReplaceEngine(std::move(*MakeUringEngine(64)));
  const auto& events = recorder->events();
  ASSERT_GT(events.size(), 4u);
  const QemuCheckResult repaired = QemuCheck(img);
  EXPECT_EQ(repaired.exit_code, 0);
  EXPECT_EQ(GuestSha(img), sha);

  std::mt19937_64 rng(7);
  size_t before = 0, after = 0;
  for (size_t cut = 0; cut <= events.size(); ++cut) {
    for (int variant = 0; variant < 2; ++variant) {
      SCOPED_TRACE("cut " + std::to_string(cut) + " of " + std::to_string(events.size()) +
                   " variant " + std::to_string(variant));
      const std::string crash = dir / "crash.qcow2";
      CrashOptions options;
      options.torn_writes = variant == 1;
      ASSERT_TRUE(recorder->WriteCrashImage(fd, cut, rng, crash, options).ok());
      const QemuCheckResult c = QemuCheck(crash);
      ASSERT_EQ(c.check_errors, 0u);
      if (c.corruptions == 0) {
        ++after;
      } else {
        ASSERT_EQ(c.corruptions, damaged.corruptions) << "neither the old nor the new state";
        ++before;
      }
      ASSERT_EQ(GuestSha(crash), sha);
      // Whatever state the crash left, a repair finishes the job.
      CheckResult again;
      Status s = RepairAll(reactor.get(), crash, &again);
      ASSERT_TRUE(s.ok()) << s.ToString();
      const QemuCheckResult fixed = QemuCheck(crash);
      ASSERT_EQ(fixed.exit_code, 0);
      ASSERT_EQ(GuestSha(crash), sha);
    }
  }
  // Both sides of the header switch were seen.
  EXPECT_GT(before, 0u);
  EXPECT_GT(after, 0u);
}


TEST(CheckCrashTest, RefcountRebuildSurvivesPowerFailureAtEveryPoint) {
  testing::ScratchDir dir;
  const std::string img = dir / "img.qcow2";
  testing::MustRun("qemu-img create -q -f qcow2 -o cluster_size=4k '" + img + "' 16M");
  testing::MustRun("qemu-io -c 'write -P 0x11 0 300k' -c 'write -P 0x22 5M 64k' '" + img +
                   "' >/dev/null");
  testing::MustRun("qemu-img snapshot -c snap '" + img + "'");
  testing::MustRun("qemu-io -c 'write -P 0x33 100k 40k' -c 'write -P 0x44 9M 8k' '" + img +
                   "' >/dev/null");
  const std::string sha = GuestSha(img);
  // Damage that needs a rebuild: the refcount of cluster 5 (in use) zeroed in its block.
  testing::MustRun("python3 -c \"import struct;f=open('" + img +
                   "','r+b');h=f.read(64);rt=struct.unpack('>Q',h[48:56])[0];f.seek(rt);"
                   "rb=struct.unpack('>Q',f.read(8))[0];f.seek(rb+10);f.write(bytes(2))\"");
  const QemuCheckResult damaged = QemuCheck(img);
  ASSERT_EQ(damaged.exit_code, 2);
  ASSERT_GT(damaged.corruptions, 0u);

  ExpectRepairSurvivesPowerFailure(dir, img, sha, damaged);
}

TEST(CheckCrashTest, SnapshotTableRewriteSurvivesPowerFailureAtEveryPoint) {
  testing::ScratchDir dir;
  const std::string img = dir / "img.qcow2";
  testing::MustRun("qemu-img create -q -f qcow2 '" + img + "' 16M");
  testing::MustRun("qemu-io -c 'write -P 0x11 0 300k' '" + img + "' >/dev/null");
  testing::MustRun("qemu-img snapshot -c snap '" + img + "'");
  testing::MustRun("qemu-io -c 'write -P 0x33 100k 40k' '" + img + "' >/dev/null");
  const std::string sha = GuestSha(img);
  // Damage a repair fixes by writing a new table: the only entry cut to 8 bytes of extra
  // data (a version 3 entry needs 16), rewritten in place.
  testing::MustRun(
      "python3 -c \"import struct;f=open('" + img +
      "','r+b');h=f.read(72);t=struct.unpack('>Q',h[64:72])[0];f.seek(t);e=f.read(40);"
      "i,n=struct.unpack('>HH',e[12:16]);x=struct.unpack('>I',e[36:40])[0];ex=f.read(x);"
      "s=f.read(i+n);b=e[:36]+struct.pack('>I',8)+ex[:8]+s;f.seek(t);f.write(b+bytes(-len(b)%8))\"");
  const QemuCheckResult damaged = QemuCheck(img);
  ASSERT_EQ(damaged.exit_code, 2);
  ASSERT_EQ(damaged.corruptions, 1u);
  ASSERT_EQ(GuestSha(img), sha);
  ExpectRepairSurvivesPowerFailure(dir, img, sha, damaged);
}

}  // namespace
}  // namespace qcow2kit
