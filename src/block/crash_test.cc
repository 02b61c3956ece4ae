// Power-fail and fault-injection tests of the write path (DESIGN.md, crash consistency).
//
// Each workload is a deterministic pseudo-random sequence of writes (allocating, partial with
// copy-on-write, in place, some with FUA), write-zeroes, discards and flushes on an image made
// by qemu-img, run with a PowerFailRecorder as the reactor's engine; on io_uring several
// operations are in flight at once, flushes and FUA writes among them (the guest-side model
// is in src/testing/crash_model.h). Then, for random cuts of the recorded I/O, a crash image
// is built (writes acknowledged by a completed flush kept, an arbitrary subset of the others,
// sometimes torn at sector granularity) and must
//   1. pass `qemu-img check` without corruption (leaked clusters are allowed),
//   2. read the same through qcow2kit and through `qemu-img convert`, and
//   3. hold every byte of every durable operation (one that returned before a flush was
//      issued that returned before the cut, or a FUA write that returned before the cut);
//      other bytes may hold any value an operation issued before the cut gave them later.
// The fault test runs the same workloads with EIO (once) and ENOSPC (from then on) injected
// at the Nth write or fdatasync: the failing call returns the error, no fault goes unreported,
// the file left behind has no corruption and still holds what was flushed.
//
// Environment: QCOW2KIT_CRASH_CUTS (cuts across all workloads, default 200),
// QCOW2KIT_FAULT_POINTS (injections per workload, default 24), QCOW2KIT_CRASH_OPS (operations
// per workload), QCOW2KIT_CRASH_SEED (varies workloads and cuts; default 1), QCOW2KIT_CRASH_CUT
// (check only that cut, to reproduce a failure). A failing cut prints how to reproduce it and keeps
// its files under /tmp.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "io/fault_engine.h"
#include "io/powerfail_engine.h"
#include "nlohmann/json.hpp"
#include "qcow2kit/block.h"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/crash_model.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

using testing::AlignDown;
using testing::AlignUp;
using testing::ApplyOp;
using testing::CheckGuestBytes;
using testing::Describe;
using testing::DurabilityModel;
using testing::FillPattern;
using testing::GuestOp;
using testing::MakeOps;
using testing::Mix;
using testing::MustRun;
using testing::ScratchDir;

uint64_t EnvOr(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 0) : fallback;
}

// ---- Workloads -------------------------------------------------------------------------

// An image made by qemu-img and how to exercise it.
struct Workload {
  std::string name;
  EngineKind engine;
  uint64_t cluster_size;
  std::vector<std::string> setup;  // shell commands making img.qcow2 in an empty directory
  int ops;
  uint64_t cache_bytes = 0;     // L2 and refcount cache sizes (0: the defaults)
  uint64_t grow_to = 0;         // first operation: resize the image to this size (0: none)
  bool lazy_refcounts = false;  // crash images are repaired by a read-write open first
  size_t index = 0;             // position in the list, to share out the cuts
};
void PrintTo(const Workload& w, std::ostream* os) {
  *os << w.name;
}

std::vector<Workload> Workloads() {
  const std::string fill =
      "qemu-io -c 'write -P 0x11 0 200k' -c 'write -P 0x22 1M 64k' -c 'write -z 1536k 128k' "
      "img.qcow2 >/dev/null";
  std::vector<Workload> w = {
      {"Clusters64k",
       EngineKind::kUring,
       65536,
       {"qemu-img create -q -f qcow2 img.qcow2 4M", fill,
        "qemu-io -c 'write -c -P 0x33 2M 128k' img.qcow2 >/dev/null"},
       100},
      {"Clusters512",
       EngineKind::kSync,
       512,
       {"qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 2M", fill},
       120},
      {"Refcount1",
       EngineKind::kUring,
       4096,
       {"qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=1 img.qcow2 3M", fill},
       100},
      // 64 refcounts per 512-byte block and 64 blocks per table cluster: the refcount table
      // has to grow once the file passes 2 MiB, which the first allocations do.
      {"Refcount64Clusters512",
       EngineKind::kSync,
       512,
       {"qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 img.qcow2 3M",
        "qemu-io -c 'write -P 0x44 0 1980k' img.qcow2 >/dev/null"},
       120},
      // The same on io_uring: refcount table growth and new refcount blocks while flushes,
      // FUA writes and allocations of neighbouring clusters are in flight.
      {"Refcount64Clusters512Uring",
       EngineKind::kUring,
       512,
       {"qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 img.qcow2 3M",
        "qemu-io -c 'write -P 0x44 0 1980k' img.qcow2 >/dev/null"},
       120},
      {"BackingFile",
       EngineKind::kUring,
       65536,
       {"qemu-img create -q -f qcow2 base.qcow2 4M",
        "qemu-io -c 'write -P 0x55 0 4M' base.qcow2 >/dev/null",
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2",
        "qemu-io -c 'write -P 0x66 64k 100k' img.qcow2 >/dev/null"},
       100},
      {"ExtendedL2",
       EngineKind::kUring,
       65536,
       {"qemu-img create -q -f qcow2 -o cluster_size=64k base.qcow2 4M",
        "qemu-io -c 'write -P 0x77 0 4M' base.qcow2 >/dev/null",
        "qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 img.qcow2",
        "qemu-io -c 'write -P 0x88 6k 10k' -c 'write -z 200k 8k' img.qcow2 >/dev/null"},
       100},
      {"ExternalDataFile",
       EngineKind::kSync,
       65536,
       {"qemu-img create -q -f qcow2 -o data_file=img.data img.qcow2 4M", fill},
       100},
  };
  w.push_back({"CompatV2",
               EngineKind::kSync,
               65536,
               {"qemu-img create -q -f qcow2 -o compat=0.10 img.qcow2 4M", fill},
               100});
  // Growth to three times the size: the L1 table of 512-byte clusters (32 KiB per entry)
  // moves, and the operations then run over the grown range.
  w.push_back({"GrowL1Clusters512",
               EngineKind::kSync,
               512,
               {"qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 2M", fill},
               100,
               0,
               6u << 20});
  // Lazy refcounts: crash images are dirty; the read-write open that repairs them must leave
  // them consistent (not merely leak-free) with the flushed data intact.
  w.push_back(
      {"LazyRefcounts",
       EngineKind::kUring,
       4096,
       {"qemu-img create -q -f qcow2 -o cluster_size=4k,lazy_refcounts=on img.qcow2 3M", fill},
       100});
  w.back().lazy_refcounts = true;
  // Metadata caches of two slices: clean slices are evicted and read back all the time.
  w.push_back({"SmallCaches",
               EngineKind::kUring,
               4096,
               {"qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 3M", fill},
               100,
               2048});
  for (size_t i = 0; i < w.size(); ++i) w[i].index = i;
  return w;
}

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::vector<uint8_t> out;
  std::error_code ec;
  auto size = std::filesystem::file_size(path, ec);
  if (ec) return out;
  out.resize(size);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return {};
  out.resize(std::fread(out.data(), 1, out.size(), f));
  std::fclose(f);
  return out;
}

// ---- Running a workload ----------------------------------------------------------------

// Runs `op` on `dev`. Discards are read back to learn their effect (and the model updated
// with it); other operations are applied to `model` only when they succeed. No operation
// overlapping `op` may be in flight (the model of its range is exact).
Task<Status> RunOpAsync(BlockDevice* dev, GuestOp* op, std::vector<uint8_t>* model) {
  switch (op->kind) {
    case GuestOp::Kind::kWrite: {
      std::vector<std::byte> buf(op->length);
      FillPattern(op->tag, op->offset, op->length, reinterpret_cast<uint8_t*>(buf.data()));
      Status s;
      if (op->compressed) {
        s = co_await dev->WriteCompressed(op->offset, buf);
        // An external data file holds no compressed clusters: a plain write then.
        if (s.code() == ENOTSUP) s = co_await dev->Write(op->offset, buf);
        if (s.ok() && op->fua) s = co_await dev->Flush();
      } else {
        s = co_await dev->Write(op->offset, buf, op->fua);
      }
      if (s.ok()) ApplyOp(*op, model);
      co_return s;
    }
    case GuestOp::Kind::kZeroes: {
      Status s = co_await dev->WriteZeroes(op->offset, op->length, op->may_unmap, op->fua);
      if (s.ok()) ApplyOp(*op, model);
      co_return s;
    }
    case GuestOp::Kind::kDiscard: {
      const uint64_t cs = dev->top().cluster_size();
      const uint64_t end = op->offset + op->length;
      const uint64_t a = AlignUp(op->offset, cs);
      const uint64_t b = end == dev->size() ? end : AlignDown(end, cs);
      // Until read back, the whole clusters may be zero (or, if the call fails, still old).
      op->effect_offset = a;
      op->effect.assign(a < b ? b - a : 0, 0);
      Status s = co_await dev->Discard(op->offset, op->length);
      if (!s.ok() || a >= b) co_return s;
      std::vector<std::byte> got(b - a);
      Status r = co_await dev->Read(a, got);
      if (!r.ok()) co_return r.WithContext("reading back a discard");
      for (uint64_t p = a; p < b; ++p) {
        uint8_t v = static_cast<uint8_t>(got[p - a]);
        if (v != 0 && v != (*model)[p]) {
          co_return Status::Corrupt("discarded guest byte " + std::to_string(p) +
                                    " reads neither zero nor its old value");
        }
      }
      op->effect.assign(reinterpret_cast<uint8_t*>(got.data()),
                        reinterpret_cast<uint8_t*>(got.data()) + got.size());
      ApplyOp(*op, model);
      co_return Status::Ok();
    }
    case GuestOp::Kind::kFlush: {
      Status s = co_await dev->Flush();
      co_return s;
    }
    case GuestOp::Kind::kClose: {
      Status s = co_await dev->Close();
      co_return s;
    }
    case GuestOp::Kind::kGrow: {
      Status s = co_await dev->Resize(op->length);
      if (s.ok()) ApplyOp(*op, model);
      co_return s;
    }
  }
  co_return Status::Ok();
}

Status RunOp(Reactor* reactor, BlockDevice* dev, GuestOp* op, std::vector<uint8_t>* model) {
  return reactor->BlockOn(RunOpAsync(dev, op, model));
}

// With io_uring, the power-fail test keeps up to this many operations in flight.
constexpr size_t kConcurrency = 4;

// A deliberately broken write path, to show that the power-fail test notices it.
enum class Sabotage {
  kNone,
  kDropSyncs,             // fdatasync and fsync are acknowledged without being done
  kFlushIgnoresInFlight,  // a flush issued while other requests are in flight returns at once
};

// What running a workload through the pipeline did.
struct PipelineStats {
  uint64_t overlapped = 0;      // operations issued while others were in flight
  uint64_t racing_flushes = 0;  // flushes among them
  uint64_t fua = 0;             // FUA writes and write-zeroes
};

// Runs a workload's operations in order with up to `window` in flight: an operation waits
// for the in-flight ones whose guest range it overlaps (so that the model stays exact), a
// grow or close waits for all, and flushes and FUA writes race whatever is in flight, as
// NBD clients' requests do. Each operation gets its events and sequence numbers.
class Pipeline {
 public:
  Pipeline(Reactor* reactor, BlockDevice* dev, const PowerFailRecorder* recorder,
           std::vector<uint8_t>* model, Sabotage sabotage)
      : reactor_(reactor), dev_(dev), recorder_(recorder), model_(model), sabotage_(sabotage) {}

  Status Run(std::vector<GuestOp>* ops, size_t window, PipelineStats* stats) {
    for (GuestOp& op : *ops) {
      while (MustWait(op, window)) reactor_->RunOnce(true);
      if (!error_.ok()) break;
      op.issue_seq = ++seq_;
      op.start_event = recorder_->events().size();
      if (!in_flight_.empty()) {
        ++stats->overlapped;
        stats->racing_flushes += op.is_flush();
      }
      stats->fua += op.fua;
      in_flight_.push_back(&op);
      reactor_->Spawn(RunOne(&op));
    }
    reactor_->RunUntilIdle();
    return error_;
  }

 private:
  bool MustWait(const GuestOp& op, size_t window) const {
    if (in_flight_.size() >= window) return true;
    const bool alone = op.kind == GuestOp::Kind::kGrow || op.kind == GuestOp::Kind::kClose;
    if (alone) return !in_flight_.empty();
    return std::any_of(in_flight_.begin(), in_flight_.end(),
                       [&](const GuestOp* o) { return testing::Overlap(*o, op); });
  }

  Task<void> RunOne(GuestOp* op) {
    Status s;
    if (op->kind == GuestOp::Kind::kFlush && sabotage_ == Sabotage::kFlushIgnoresInFlight &&
        in_flight_.size() > 1) {
      s = Status::Ok();
    } else {
      s = co_await RunOpAsync(dev_, op, model_);
    }
    op->done_seq = ++seq_;
    op->end_event = recorder_->events().size();
    in_flight_.erase(std::find(in_flight_.begin(), in_flight_.end(), op));
    if (!s.ok() && error_.ok()) error_ = s.WithContext(Describe(*op));
  }

  Reactor* reactor_;
  BlockDevice* dev_;
  const PowerFailRecorder* recorder_;
  std::vector<uint8_t>* model_;
  Sabotage sabotage_;
  uint64_t seq_ = 0;
  std::vector<GuestOp*> in_flight_;
  Status error_;
};

// Reads `path` with `qemu-img convert` into raw bytes (from the image's directory, as
// QemuCheck does), the second opinion on what a crash image holds.
Result<std::vector<uint8_t>> QemuReadGuest(const std::string& path) {
  const auto slash = path.rfind('/');
  const std::string dir = path.substr(0, slash), name = path.substr(slash + 1);
  std::string out;
  int rc = testing::Run(
      "cd '" + dir + "' && qemu-img convert -U -O raw '" + name + "' '" + name + ".raw'", &out);
  if (rc != 0)
    return Status::Error(EIO, "qemu-img convert failed (exit " + std::to_string(rc) + "): " + out);
  auto bytes = ReadFile(path + ".raw");
  std::filesystem::remove(path + ".raw");
  return bytes;
}

// "" if qemu-img reads `path` as `ours`, else where the two first differ.
std::string CompareWithQemu(const std::string& path, const std::vector<uint8_t>& ours) {
  auto theirs = QemuReadGuest(path);
  if (!theirs.ok()) return theirs.status().ToString();
  if (theirs->size() != ours.size()) {
    return "qemu-img reads " + std::to_string(theirs->size()) + " guest bytes, qcow2kit " +
           std::to_string(ours.size());
  }
  auto [a, b] = std::mismatch(ours.begin(), ours.end(), theirs->begin());
  if (a == ours.end()) return "";
  char m[160];
  std::snprintf(m, sizeof m,
                "qemu-img and qcow2kit read the image differently: guest byte %#zx "
                "is %u for qemu-img, %u for qcow2kit",
                size_t(a - ours.begin()), *b, *a);
  return m;
}

// Runs `qemu-img check` on `path`: "" if it found no corruption (leaks are allowed), else what
// it reported.
std::string QemuCheck(const std::string& path) {
  // From the image's directory: qemu-img 7.2 resolves a relative data file name against the
  // working directory.
  const auto slash = path.rfind('/');
  const std::string dir = path.substr(0, slash), name = path.substr(slash + 1);
  std::string out;
  int rc = testing::Run("{ cd '" + dir + "' && qemu-img check --output=json '" + name + "' 2>'" +
                            name + ".check.err'; }",
                        &out);
  auto report = [&](const std::string& why) {
    auto err = ReadFile(path + ".check.err");
    return why + " (exit " + std::to_string(rc) + "): " + out + std::string(err.begin(), err.end());
  };
  if (rc != 0 && rc != 3) return report("qemu-img check failed");
  auto j = nlohmann::json::parse(out, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return report("unparsable qemu-img check output");
  if (j.contains("corruptions")) return report("qemu-img check found corruptions");
  if (j.value("check-errors", 0) != 0) return report("qemu-img check had errors");
  return "";
}

// Opens `path` read-write and closes it again, which repairs a dirty image: "" or the error.
std::string RepairByOpening(Reactor* reactor, const std::string& path) {
  OpenOptions o;
  o.writable = true;
  auto img = reactor->BlockOn(OpenImage(path, o));
  if (!img.ok()) return "read-write open (repair) failed: " + img.status().ToString();
  BlockDevice dev(std::move(*img));
  Status s = reactor->BlockOn(dev.Close());
  return s.ok() ? "" : "close after repair failed: " + s.ToString();
}

// Opens `path` read-only with qcow2kit and reads the whole guest.
Result<std::vector<uint8_t>> ReadGuest(Reactor* reactor, const std::string& path) {
  auto img = reactor->BlockOn(OpenImage(path, {}));
  if (!img.ok()) return img.status().WithContext("open");
  BlockDevice dev(std::move(*img));
  std::vector<uint8_t> out(dev.size());
  Status s = reactor->BlockOn(dev.Read(0, std::as_writable_bytes(std::span(out))));
  if (!s.ok()) return s.WithContext("read");
  return out;
}

// A workload that names io_uring runs on io_uring or the test aborts: falling back to the
// blocking engine would hide the reordering the power-fail recorder exists to exercise.
std::unique_ptr<Engine> MakeEngine(EngineKind kind) {
  if (kind == EngineKind::kSync) return MakeSyncEngine();
  auto e = MakeUringEngine(256);
  if (!e.ok()) {
    std::fprintf(stderr, "crash test: no io_uring: %s\n", e.status().ToString().c_str());
    std::abort();
  }
  return std::move(*e);
}

// Totals over the workloads run in this process, printed at the end.
struct Totals {
  uint64_t cuts = 0, torn = 0, with_unflushed = 0, corruptions = 0;
  uint64_t injections = 0, errors = 0, fault_corruptions = 0;
};
Totals totals;

class TotalsPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    if (totals.cuts > 0) {
      std::printf(
          "crash test: %llu cuts checked (%llu torn, %llu with unflushed data read "
          "back), %llu corruptions\n",
          static_cast<unsigned long long>(totals.cuts),
          static_cast<unsigned long long>(totals.torn),
          static_cast<unsigned long long>(totals.with_unflushed),
          static_cast<unsigned long long>(totals.corruptions));
    }
    if (totals.injections > 0) {
      std::printf("fault test: %llu injections, %llu errors returned, %llu corruptions\n",
                  static_cast<unsigned long long>(totals.injections),
                  static_cast<unsigned long long>(totals.errors),
                  static_cast<unsigned long long>(totals.fault_corruptions));
    }
  }
};
::testing::Environment* const kTotalsPrinter =
    ::testing::AddGlobalTestEnvironment(new TotalsPrinter);

// A scratch directory on tmpfs when there is one: the workloads sync a lot, and the files
// only need to outlive the test.
class FastScratchDir {
 public:
  FastScratchDir() {
    char tmpl[] = "/dev/shm/qk_crash_XXXXXX";
    if (::mkdtemp(tmpl)) {
      path_ = tmpl;
    } else {
      fallback_ = std::make_unique<ScratchDir>();
      path_ = fallback_->path();
    }
  }
  ~FastScratchDir() {
    std::error_code ec;
    if (!fallback_) std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::unique_ptr<ScratchDir> fallback_;
  std::string path_;
};

// A workload's pristine image, its guest content and its operations.
class CrashTest : public ::testing::TestWithParam<Workload> {
 protected:
  void SetUp() override {
    const Workload& w = GetParam();
    seed_ = Mix(EnvOr("QCOW2KIT_CRASH_SEED", 1) * 1000003 + w.index);
    MustRun("mkdir -p " + pristine());
    for (const auto& cmd : w.setup) MustRun("cd " + pristine() + " && " + cmd);
    MustRun("cd " + pristine() + " && qemu-img convert -O raw img.qcow2 ../initial.raw");
    initial_ = ReadFile(dir_ / "initial.raw");
    ASSERT_GT(initial_.size(), 0u);
    const int ops = static_cast<int>(EnvOr("QCOW2KIT_CRASH_OPS", w.ops));
    if (w.grow_to > 0) {
      GuestOp grow;
      grow.kind = GuestOp::Kind::kGrow;
      grow.length = w.grow_to;
      ops_ = MakeOps(w.grow_to, w.cluster_size, ops, seed_);
      ops_.insert(ops_.begin(), grow);
      for (size_t i = 0; i < ops_.size(); ++i) ops_[i].index = i;
    } else {
      ops_ = MakeOps(initial_.size(), w.cluster_size, ops, seed_);
    }
  }

  std::string pristine() const { return dir_ / "pristine"; }
  // A fresh copy of the pristine files in `name`.
  std::string FreshCopy(const std::string& name) {
    namespace fs = std::filesystem;
    std::string d = dir_ / name;
    std::error_code ec;
    fs::remove_all(d, ec);
    fs::copy(pristine(), d, fs::copy_options::recursive, ec);
    EXPECT_FALSE(ec) << "copy to " << d << ": " << ec.message();
    return d;
  }
  OpenOptions Writable() const {
    OpenOptions o;
    o.writable = true;
    o.l2_cache_bytes = o.refcount_cache_bytes = GetParam().cache_bytes;
    if (GetParam().cache_bytes) o.l2_slice_bytes = 1024;
    return o;
  }

  FastScratchDir dir_;
  uint64_t seed_ = 0;
  std::vector<uint8_t> initial_;
  std::vector<GuestOp> ops_;
};

// ---- The power-fail test ---------------------------------------------------------------

// Acknowledges fdatasync / fsync without doing them, out of the recorder's sight: a write path
// whose flushes do not flush. The self-check runs a workload through it to show that the
// crash test notices.
class SyncDroppingEngine final : public Engine {
 public:
  explicit SyncDroppingEngine(std::unique_ptr<Engine> inner) : inner_(std::move(inner)) {}
  const char* name() const override { return inner_->name(); }
  bool Submit(IoRequest* req) override {
    if (req->op != IoOp::kFdatasync && req->op != IoOp::kFsync) return inner_->Submit(req);
    req->result = 0;
    return true;
  }
  size_t Poll(bool wait) override { return inner_->Poll(wait); }
  size_t in_flight() const override { return inner_->in_flight(); }
  void Cancel(IoRequest* req) override { inner_->Cancel(req); }

 private:
  std::unique_ptr<Engine> inner_;
};

// A point to crash at: the events completed, and which of the random crash images there.
struct Cut {
  size_t events = 0;
  uint32_t variant = 0;
  bool operator<(const Cut& o) const {
    return events != o.events ? events < o.events : variant < o.variant;
  }
};

// The cuts to check: the end, the moments just before and after the last sync of some
// flushes and FUA writes (where ordering mistakes show), and random points; a point drawn again
// gets another crash image, so any number of cuts can be asked for.
std::vector<Cut> ChooseCuts(size_t events, const std::vector<GuestOp>& ops, size_t k,
                            std::mt19937_64& rng) {
  std::set<Cut> cuts = {{events, 0}};
  auto add = [&](size_t c) {
    Cut cut{c, 0};
    while (cuts.count(cut)) ++cut.variant;
    cuts.insert(cut);
  };
  std::vector<size_t> flush_ends;
  for (const auto& op : ops) {
    if ((op.is_flush() || op.fua) && op.end_event > 0) flush_ends.push_back(op.end_event);
  }
  for (size_t i = 0; i < k / 8 && !flush_ends.empty(); ++i) {
    size_t e = flush_ends[rng() % flush_ends.size()];
    add(e);
    add(e - 1);
  }
  while (cuts.size() < k) add(rng() % (events + 1));
  return {cuts.begin(), cuts.end()};
}

// What checking the cuts of one workload found.
struct CrashStats {
  size_t events = 0;
  PipelineStats pipeline;
  uint64_t checked = 0, torn = 0, with_unflushed = 0;
  uint64_t check_failures = 0;        // qemu-img check found corruption
  uint64_t read_failures = 0;         // qcow2kit could not read the image back
  uint64_t oracle_failures = 0;       // qemu-img reads it differently
  uint64_t data_failures = 0;         // durable data lost or unexplained bytes
  std::vector<std::string> problems;  // the first few, with how to reproduce them
  uint64_t failures() const {
    return check_failures + read_failures + oracle_failures + data_failures;
  }
};

class PowerFailCrashTest : public CrashTest {
 protected:
  // Records the workload (through `sabotage`) and checks `k` cuts.
  void RecordAndCrash(size_t k, Sabotage sabotage, CrashStats* stats);
};

void PowerFailCrashTest::RecordAndCrash(size_t k, Sabotage sabotage, CrashStats* stats) {
  const Workload& w = GetParam();
  // Record the workload.
  std::string work = FreshCopy("work");
  auto reactor = std::make_unique<Reactor>(MakeEngine(w.engine));
  auto* recorder = new PowerFailRecorder(reactor->ReplaceEngine(nullptr));
  std::unique_ptr<Engine> top(recorder);
  if (sabotage == Sabotage::kDropSyncs) top = std::make_unique<SyncDroppingEngine>(std::move(top));
  reactor->ReplaceEngine(std::move(top));
  auto img = reactor->BlockOn(OpenImage(work + "/img.qcow2", Writable()));
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  auto dev = std::make_unique<BlockDevice>(std::move(*img));
  ASSERT_EQ(dev->top().cluster_size(), w.cluster_size);
  const int image_fd = dev->top().file(0)->fd();
  const int data_fd = dev->top().file(1) ? dev->top().file(1)->fd() : -1;
  std::vector<uint8_t> model = initial_;
  Pipeline pipeline(reactor.get(), dev.get(), recorder, &model, sabotage);
  const size_t window = w.engine == EngineKind::kUring ? kConcurrency : 1;
  Status run = pipeline.Run(&ops_, window, &stats->pipeline);
  ASSERT_TRUE(run.ok()) << run.ToString();
  dev.reset();
  // The recorder leaves the reactor before the descriptors it tracks are reused.
  std::unique_ptr<Engine> owned = reactor->ReplaceEngine(MakeEngine(w.engine));
  const size_t events = stats->events = recorder->events().size();
  ASSERT_TRUE(recorder->tracked(image_fd));
  ASSERT_EQ(recorder->LastFlushBefore(image_fd, events).has_value(),
            sabotage != Sabotage::kDropSyncs);

  // Sanity: replaying every event gives the files as they are, so no write bypassed the
  // engine, and the image is clean after Close.
  for (int fd : {image_fd, data_fd}) {
    if (fd < 0 || !recorder->tracked(fd)) continue;
    std::mt19937_64 rng(0);
    CrashImage all = recorder->MakeCrashImage(fd, events, rng, {.keep_probability = 1});
    auto actual = ReadFile(recorder->path(fd));
    ASSERT_EQ(all.content.size(), actual.size()) << recorder->path(fd);
    ASSERT_EQ(0, std::memcmp(all.content.data(), actual.data(), actual.size()))
        << recorder->path(fd) << " differs from its recording";
  }
  ASSERT_EQ(QemuCheck(work + "/img.qcow2"), "");

  // Crash at each cut.
  std::mt19937_64 cut_rng(seed_);
  std::vector<Cut> cuts = ChooseCuts(events, ops_, k, cut_rng);
  if (const char* only = std::getenv("QCOW2KIT_CRASH_CUT")) {
    cuts = {{std::strtoull(only, nullptr, 0), 0}};
  }
  std::string crash = FreshCopy("crash");
  DurabilityModel durable(initial_, ops_);
  for (const Cut& cut : cuts) {
    durable.AdvanceTo(cut.events);
    const uint64_t image_seed =
        Mix(seed_ ^ (cut.events * 0x100000001b3ull) ^ (uint64_t{cut.variant} << 48));
    CrashOptions options;
    options.torn_writes = Mix(image_seed) & 1;
    std::mt19937_64 rng(image_seed);
    Status s = recorder->WriteCrashImage(image_fd, cut.events, rng, crash + "/img.qcow2", options);
    ASSERT_TRUE(s.ok()) << s.ToString();
    if (data_fd >= 0 && recorder->tracked(data_fd)) {
      s = recorder->WriteCrashImage(data_fd, cut.events, rng, crash + "/img.data", options);
      ASSERT_TRUE(s.ok()) << s.ToString();
    }

    uint64_t unflushed = 0;
    std::string problem =
        w.lazy_refcounts ? RepairByOpening(reactor.get(), crash + "/img.qcow2") : "";
    if (problem.empty()) problem = QemuCheck(crash + "/img.qcow2");
    if (!problem.empty()) {
      ++stats->check_failures;
    } else if (auto got = ReadGuest(reactor.get(), crash + "/img.qcow2"); !got.ok()) {
      ++stats->read_failures;
      problem = "qcow2kit cannot read the crash image: " + got.status().ToString();
    } else if (problem = CompareWithQemu(crash + "/img.qcow2", *got); !problem.empty()) {
      ++stats->oracle_failures;
    } else {
      problem = durable.Check(*got, &unflushed);
      stats->data_failures += !problem.empty();
    }
    ++stats->checked;
    stats->torn += options.torn_writes;
    stats->with_unflushed += unflushed > 0;
    if (!problem.empty() && stats->problems.size() < 5) {
      std::string keep = "/tmp/qk_crash_" + w.name + "_cut" + std::to_string(cut.events);
      if (sabotage != Sabotage::kNone) {
        keep = "(not kept)";
      } else {
        testing::Run("rm -rf " + keep + " && cp -a " + crash + " " + keep);
      }
      stats->problems.push_back(
          w.name + ": crash after event " + std::to_string(cut.events) + " of " +
          std::to_string(events) + (options.torn_writes ? " (torn writes)" : "") + ", last flush " +
          (durable.last_flush() ? Describe(*durable.last_flush()) : "none") + ":\n  " + problem +
          "\n  files kept in " + keep +
          "; QCOW2KIT_CRASH_SEED=" + std::to_string(EnvOr("QCOW2KIT_CRASH_SEED", 1)) +
          " QCOW2KIT_CRASH_CUT=" + std::to_string(cut.events) + " checks it again (variant " +
          std::to_string(cut.variant) + ")");
    }
  }
}

TEST_P(PowerFailCrashTest, PowerFailAtRandomPointsLosesNothingFlushed) {
  const Workload& w = GetParam();
  const uint64_t total_cuts = EnvOr("QCOW2KIT_CRASH_CUTS", 200);
  const size_t n = Workloads().size();
  const size_t k = std::max<size_t>(1, total_cuts / n + (w.index < total_cuts % n ? 1 : 0));
  CrashStats stats;
  RecordAndCrash(k, Sabotage::kNone, &stats);
  for (const auto& p : stats.problems) ADD_FAILURE() << p;
  std::printf(
      "crash test [%s]: %llu cuts checked of %zu events; of %zu operations %llu issued while "
      "others were in flight (%llu flushes), %llu FUA (%llu torn, %llu with unflushed data "
      "read back), %llu corruptions\n",
      w.name.c_str(), static_cast<unsigned long long>(stats.checked), stats.events, ops_.size(),
      static_cast<unsigned long long>(stats.pipeline.overlapped),
      static_cast<unsigned long long>(stats.pipeline.racing_flushes),
      static_cast<unsigned long long>(stats.pipeline.fua),
      static_cast<unsigned long long>(stats.torn),
      static_cast<unsigned long long>(stats.with_unflushed),
      static_cast<unsigned long long>(stats.failures()));
  totals.cuts += stats.checked;
  totals.torn += stats.torn;
  totals.with_unflushed += stats.with_unflushed;
  totals.corruptions += stats.failures();
  EXPECT_EQ(stats.failures(), 0u);
  EXPECT_GE(stats.checked, std::min<uint64_t>(k, 1));
}

// The test must be able to fail: with flushes that do not flush, crash images lose flushed
// data and break the metadata order, and the checks above notice.
using SelfCheckCrashTest = PowerFailCrashTest;

void PrintSelfCheck(const char* what, const std::string& workload, const CrashStats& stats) {
  std::printf(
      "crash test self-check [%s, %s]: of %llu cuts, %llu failed qemu-img check, %llu lost "
      "durable data, %llu unreadable\n",
      workload.c_str(), what, static_cast<unsigned long long>(stats.checked),
      static_cast<unsigned long long>(stats.check_failures),
      static_cast<unsigned long long>(stats.data_failures),
      static_cast<unsigned long long>(stats.read_failures));
  if (!stats.problems.empty()) std::printf("  first: %s\n", stats.problems[0].c_str());
}

TEST_P(SelfCheckCrashTest, NoticesAWritePathThatDoesNotSync) {
  CrashStats stats;
  RecordAndCrash(40, Sabotage::kDropSyncs, &stats);
  PrintSelfCheck("no syncs", GetParam().name, stats);
  EXPECT_GT(stats.data_failures, 0u);
  EXPECT_GT(stats.check_failures, 0u);
}

// A flush racing writes must still cover every write that returned before it was issued;
// one that returns at once when anything else is in flight loses such writes.
TEST_P(SelfCheckCrashTest, NoticesAFlushThatIgnoresWritesInFlight) {
  CrashStats stats;
  RecordAndCrash(60, Sabotage::kFlushIgnoresInFlight, &stats);
  PrintSelfCheck("flush returns while writes are in flight", GetParam().name, stats);
  EXPECT_GT(stats.pipeline.racing_flushes, 0u);
  EXPECT_GT(stats.data_failures, 0u);
}

// ---- The fault-injection test ----------------------------------------------------------

// What one run of the workload under an injected fault did.
struct FaultRun {
  std::vector<GuestOp> ops;  // the workload's operations, as run
  bool fired = false;
  Status first_error;  // the first call that failed (open, an operation or close)
  std::string failed_call;
  const GuestOp* failed_op = nullptr;  // the failing operation, if it changes data
  std::vector<uint8_t> flushed;        // guest content at the last successful flush
  std::vector<const GuestOp*> since;   // operations after that flush, up to the failing one
  bool closed = false;                 // Close succeeded: all that succeeded is durable
  std::vector<uint8_t> model;          // guest content after every successful operation
};

using FaultCrashTest = CrashTest;

TEST_P(FaultCrashTest, InjectedFaultsReturnErrorsAndLeaveNoCorruption) {
  const Workload& w = GetParam();
  // A clean run counts the requests to choose the injection points from.
  uint64_t writes = 0, syncs = 0;
  {
    std::string work = FreshCopy("work");
    Reactor reactor(MakeEngine(w.engine));
    auto* faults = new FaultInjectionEngine(reactor.ReplaceEngine(nullptr));
    reactor.ReplaceEngine(std::unique_ptr<Engine>(faults));
    auto img = reactor.BlockOn(OpenImage(work + "/img.qcow2", Writable()));
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    BlockDevice dev(std::move(*img));
    std::vector<uint8_t> model = initial_;
    for (auto op : ops_) {
      Status s = RunOp(&reactor, &dev, &op, &model);
      ASSERT_TRUE(s.ok()) << Describe(op) << ": " << s.ToString();
    }
    writes = faults->seen(IoOp::kWrite);
    syncs = faults->seen(IoOp::kFdatasync);
  }
  ASSERT_GT(writes, 0u);
  ASSERT_GT(syncs, 0u);

  struct Point {
    IoOp op;
    int error;
    uint64_t nth;
  };
  const uint64_t per_kind = std::max<uint64_t>(1, EnvOr("QCOW2KIT_FAULT_POINTS", 24) / 4);
  std::mt19937_64 rng(seed_ ^ 0xfa17);
  std::vector<Point> points;
  for (IoOp op : {IoOp::kWrite, IoOp::kFdatasync}) {
    uint64_t count = op == IoOp::kWrite ? writes : syncs;
    for (int error : {EIO, ENOSPC}) {
      // Spread over the run, with the first request always among them.
      for (uint64_t i = 0; i < per_kind; ++i) {
        uint64_t lo = i * count / per_kind, hi = (i + 1) * count / per_kind;
        uint64_t nth = i == 0 ? 1 : 1 + lo + rng() % std::max<uint64_t>(1, hi - lo);
        points.push_back({op, error, std::min(nth, count)});
      }
    }
  }

  uint64_t errors = 0, corruptions = 0;
  for (const Point& pt : points) {
    const std::string what = std::string(pt.op == IoOp::kWrite ? "write" : "fdatasync") + " #" +
                             std::to_string(pt.nth) + " fails with " +
                             (pt.error == EIO ? "EIO (once)" : "ENOSPC (from then on)");
    SCOPED_TRACE(w.name + ": " + what);
    std::string work = FreshCopy("work");
    FaultRun run;
    run.ops = ops_;
    run.flushed = initial_;
    run.model = initial_;
    {
      Reactor reactor(MakeEngine(w.engine));
      auto* faults = new FaultInjectionEngine(reactor.ReplaceEngine(nullptr));
      reactor.ReplaceEngine(std::unique_ptr<Engine>(faults));
      const auto mode = pt.error == EIO ? FaultRule::Mode::kNth : FaultRule::Mode::kFromNth;
      const size_t rule =
          faults->AddRule({.op = pt.op, .nth = pt.nth, .error = pt.error, .mode = mode});
      auto img = reactor.BlockOn(OpenImage(work + "/img.qcow2", Writable()));
      std::unique_ptr<BlockDevice> dev;
      if (!img.ok()) {
        run.first_error = img.status();
        run.failed_call = "open";
      } else {
        dev = std::make_unique<BlockDevice>(std::move(*img));
      }
      for (size_t i = 0; dev && i < run.ops.size(); ++i) {
        GuestOp& op = run.ops[i];
        Status s = RunOp(&reactor, dev.get(), &op, &run.model);
        if (op.changes_data()) run.since.push_back(&op);
        if (!s.ok()) {
          run.first_error = s;
          run.failed_call = Describe(op);
          if (op.changes_data()) run.failed_op = &op;
          break;
        }
        if (op.is_flush()) {
          run.flushed = run.model;
          run.since.clear();
          run.closed = op.kind == GuestOp::Kind::kClose;
        }
      }
      if (dev && !run.first_error.ok()) {
        // After a transient error (EIO once) the device may recover; with the disk still full
        // (ENOSPC) closing fails unless nothing is left to write. Either way it must not crash,
        // and if it says it closed, everything that succeeded must be durable.
        if (pt.error == EIO) faults->ClearRules();
        run.closed = reactor.BlockOn(dev->Close()).ok();
      }
      run.fired = faults->fired(rule) > 0;
      dev.reset();
    }
    if (!run.fired) continue;
    if (run.first_error.ok()) {
      ADD_FAILURE() << "the injected error was not reported by any call";
      ++corruptions;
      continue;
    }
    ++errors;
    EXPECT_EQ(run.first_error.code(), pt.error)
        << run.failed_call << " returned " << run.first_error.ToString();

    Reactor reader(MakeEngine(w.engine));
    std::string problem = w.lazy_refcounts ? RepairByOpening(&reader, work + "/img.qcow2") : "";
    if (problem.empty()) problem = QemuCheck(work + "/img.qcow2");
    if (problem.empty()) {
      auto got = ReadGuest(&reader, work + "/img.qcow2");
      uint64_t unflushed = 0;
      if (!got.ok()) {
        problem = "qcow2kit cannot read the image: " + got.status().ToString();
      } else if (run.closed) {
        // Closed after all: every successful operation is durable; only the one that failed
        // may have left its range half written.
        std::vector<const GuestOp*> failed;
        if (run.failed_op) failed.push_back(run.failed_op);
        problem = CheckGuestBytes(*got, run.model, {}, failed, &unflushed);
      } else {
        problem = CheckGuestBytes(*got, run.flushed, {}, run.since, &unflushed);
      }
    }
    if (!problem.empty()) {
      ++corruptions;
      std::string keep = "/tmp/qk_fault_" + w.name + "_" + std::to_string(pt.nth);
      testing::Run("rm -rf " + keep + " && cp -a " + work + " " + keep);
      ADD_FAILURE() << "after " << run.failed_call << " returned " << run.first_error.ToString()
                    << (run.closed ? " (then closed)" : "") << ":\n  " << problem
                    << "\n  files kept in " << keep;
    }
  }
  std::printf(
      "fault test [%s]: %zu injections (%llu writes, %llu syncs in a clean run), "
      "%llu errors returned, %llu corruptions\n",
      w.name.c_str(), points.size(), static_cast<unsigned long long>(writes),
      static_cast<unsigned long long>(syncs), static_cast<unsigned long long>(errors),
      static_cast<unsigned long long>(corruptions));
  totals.injections += points.size();
  totals.errors += errors;
  totals.fault_corruptions += corruptions;
  EXPECT_EQ(corruptions, 0u);
  EXPECT_GT(errors, 0u);
}

INSTANTIATE_TEST_SUITE_P(Workloads, PowerFailCrashTest, ::testing::ValuesIn(Workloads()),
                         [](const auto& info) { return info.param.name; });
INSTANTIATE_TEST_SUITE_P(Workloads, SelfCheckCrashTest, ::testing::Values(Workloads()[0]),
                         [](const auto& info) { return info.param.name; });
INSTANTIATE_TEST_SUITE_P(Workloads, FaultCrashTest, ::testing::ValuesIn(Workloads()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace qcow2kit
