// Tests of PowerFailRecorder: what it logs from real engines, and that the crash images it
// builds contain everything a completed flush acknowledged, only recorded writes beyond that,
// and nothing else.
#include "io/powerfail_engine.h"

#include <unistd.h>

#include <cstring>
#include <deque>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "io/fault_engine.h"
#include "qcow2kit/file.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

using Kind = PowerFailEvent::Kind;

constexpr size_t kInitialSize = 16384;
constexpr uint8_t kInitialByte = 0xaa;

// One write of the scripted workload: `len` bytes of `value` at `offset`.
struct ScriptWrite {
  uint64_t offset;
  size_t len;
  uint8_t value;
};

std::vector<std::byte> Bytes(size_t n, uint8_t v) {
  return std::vector<std::byte>(n, std::byte{v});
}

class PowerFailRecorderTest : public ::testing::TestWithParam<EngineKind> {
 protected:
  void SetUp() override {
    auto r = Reactor::Create(GetParam());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    reactor_ = std::move(*r);
    rec_ = new PowerFailRecorder(reactor_->ReplaceEngine(nullptr));
    reactor_->ReplaceEngine(std::unique_ptr<Engine>(rec_));
    std::ofstream(dir_ / "f", std::ios::binary)
        << std::string(kInitialSize, static_cast<char>(kInitialByte));
    auto f = File::Open(dir_ / "f", true);
    ASSERT_TRUE(f.ok());
    file_ = std::move(*f);
  }

  void Write(const ScriptWrite& w) {
    auto buf = Bytes(w.len, w.value);
    ASSERT_TRUE(reactor_->BlockOn(file_->WriteAt(buf, w.offset)).ok());
  }
  void Sync() { ASSERT_TRUE(reactor_->BlockOn(file_->Sync()).ok()); }

  // The script: events W0 W1 F2 W3 W4 F5 W6 (W6 extends the file, W4 overlaps W0).
  const std::vector<ScriptWrite> kWrites = {
      {0, 4096, 1}, {4096, 100, 2}, {8192, 512, 3}, {0, 10, 4}, {20000, 1000, 5}};
  void RunScript() {
    Write(kWrites[0]);
    Write(kWrites[1]);
    Sync();
    Write(kWrites[2]);
    Write(kWrites[3]);
    Sync();
    Write(kWrites[4]);
  }
  // Index of each script write in the event log.
  const std::vector<size_t> kWriteEvent = {0, 1, 3, 4, 6};

  // The file after the first `n` script writes.
  std::vector<std::byte> StateAfter(size_t n) const {
    std::vector<std::byte> s(kInitialSize, std::byte{kInitialByte});
    for (size_t i = 0; i < n; ++i) {
      const auto& w = kWrites[i];
      if (w.offset + w.len > s.size()) s.resize(w.offset + w.len);
      std::fill_n(s.begin() + w.offset, w.len, std::byte{w.value});
    }
    return s;
  }

  testing::ScratchDir dir_;
  std::unique_ptr<Reactor> reactor_;
  PowerFailRecorder* rec_ = nullptr;  // owned by reactor_
  std::unique_ptr<File> file_;
};

TEST_P(PowerFailRecorderTest, LogsCompletedWritesAndFlushesInOrder) {
  RunScript();
  int fd = file_->fd();
  ASSERT_TRUE(rec_->tracked(fd));
  EXPECT_EQ(rec_->initial_content(fd), StateAfter(0));
  EXPECT_EQ(rec_->path(fd), dir_ / "f");
  const auto& ev = rec_->events();
  ASSERT_EQ(ev.size(), 7u);
  std::vector<Kind> kinds;
  for (const auto& e : ev) kinds.push_back(e.kind);
  EXPECT_EQ(kinds, (std::vector<Kind>{Kind::kWrite, Kind::kWrite, Kind::kFlush, Kind::kWrite,
                                      Kind::kWrite, Kind::kFlush, Kind::kWrite}));
  for (size_t i = 0; i < kWrites.size(); ++i) {
    const auto& e = ev[kWriteEvent[i]];
    EXPECT_EQ(e.fd, fd);
    EXPECT_EQ(e.offset, kWrites[i].offset);
    EXPECT_EQ(e.data, Bytes(kWrites[i].len, kWrites[i].value));
  }
  EXPECT_EQ(ev[2].op, IoOp::kFdatasync);
  EXPECT_EQ(ev[5].submitted_at, 5u);
  EXPECT_EQ(rec_->LastFlushBefore(fd, 2), std::nullopt);
  EXPECT_EQ(rec_->LastFlushBefore(fd, 3), 2u);
  EXPECT_EQ(rec_->LastFlushBefore(fd, 7), 5u);
  EXPECT_EQ(rec_->AcknowledgedWrites(fd, 2), std::vector<size_t>{});
  EXPECT_EQ(rec_->AcknowledgedWrites(fd, 5), (std::vector<size_t>{0, 1}));
  EXPECT_EQ(rec_->AcknowledgedWrites(fd, 7), (std::vector<size_t>{0, 1, 3, 4}));
}

TEST_P(PowerFailRecorderTest, CrashImagesKeepFlushedWritesAndOnlyRecordedOthers) {
  RunScript();
  int fd = file_->fd();
  // Script writes acknowledged by the last flush before each cut (0..7).
  const size_t acked[] = {0, 0, 0, 2, 2, 2, 4, 4};
  // Script writes submitted before each cut: completed ones and, as the log is sequential
  // here, the one whose completion is event `cut` (it was in flight when the power failed).
  const size_t completed[] = {1, 2, 2, 3, 4, 4, 5, 5};
  for (size_t cut = 0; cut <= 7; ++cut) {
    SCOPED_TRACE("cut " + std::to_string(cut));
    std::vector<std::byte> durable = StateAfter(acked[cut]);
    std::set<size_t> seen_kept, seen_dropped;
    for (uint64_t seed = 0; seed < 64; ++seed) {
      std::mt19937_64 rng(seed);
      CrashImage img = rec_->MakeCrashImage(fd, cut, rng);
      // Every acknowledged write is applied; every other applied one completed before the cut.
      std::set<size_t> applied(img.applied.begin(), img.applied.end());
      for (size_t i = 0; i < acked[cut]; ++i) ASSERT_TRUE(applied.count(kWriteEvent[i]));
      for (size_t i = acked[cut]; i < kWrites.size(); ++i) {
        bool kept = applied.count(kWriteEvent[i]) > 0;
        if (i >= completed[cut]) {
          ASSERT_FALSE(kept) << "write " << i << " had not been submitted";
        }
        if (i < completed[cut]) (kept ? seen_kept : seen_dropped).insert(i);
      }
      ASSERT_EQ(applied.size(), img.applied.size());
      // Byte by byte: the acknowledged state, or the value of an unacknowledged write that
      // covers the byte and completed before the cut. The length grows only by such writes.
      ASSERT_GE(img.content.size(), durable.size());
      for (size_t p = 0; p < img.content.size(); ++p) {
        std::byte want = p < durable.size() ? durable[p] : std::byte{0};
        if (img.content[p] == want) continue;
        bool explained = false;
        for (size_t i = acked[cut]; i < completed[cut]; ++i) {
          const auto& w = kWrites[i];
          explained |=
              p >= w.offset && p < w.offset + w.len && img.content[p] == std::byte{w.value};
        }
        ASSERT_TRUE(explained) << "byte " << p << " seed " << seed;
      }
      // Whole writes survive or vanish (no tearing by default): check one byte of each.
      for (size_t i = acked[cut]; i < completed[cut]; ++i) {
        const auto& w = kWrites[i];
        size_t last = w.offset + w.len - 1;
        bool kept = applied.count(kWriteEvent[i]) > 0;
        bool overwritten_later = i == 0 && applied.count(kWriteEvent[3]) && last < 10;
        if (kept && !overwritten_later) {
          ASSERT_EQ(img.content[last], std::byte{w.value});
        }
      }
    }
    // With 64 seeds each unacknowledged completed write is both kept and dropped sometimes.
    for (size_t i = acked[cut]; i < completed[cut]; ++i) {
      EXPECT_TRUE(seen_kept.count(i)) << "write " << i;
      EXPECT_TRUE(seen_dropped.count(i)) << "write " << i;
    }
  }
}

TEST_P(PowerFailRecorderTest, AllOrNothingOfTheUnflushedWrites) {
  RunScript();
  int fd = file_->fd();
  std::mt19937_64 rng(1);
  CrashImage none = rec_->MakeCrashImage(fd, 7, rng, {.keep_probability = 0});
  EXPECT_EQ(none.content, StateAfter(4));
  EXPECT_EQ(none.content.size(), kInitialSize);  // the extending write was lost
  CrashImage all = rec_->MakeCrashImage(fd, 7, rng, {.keep_probability = 1});
  EXPECT_EQ(all.content, StateAfter(5));
  EXPECT_EQ(all.content.size(), 21000u);
  EXPECT_EQ(all.content[17000], std::byte{0});  // the gap before the extending write
  auto on_disk = testing::ReadWholeFile(dir_ / "f");
  ASSERT_EQ(on_disk.size(), all.content.size());
  EXPECT_EQ(0, std::memcmp(on_disk.data(), all.content.data(), on_disk.size()));
  CrashImage at_zero = rec_->MakeCrashImage(fd, 0, rng, {.keep_probability = 1});
  EXPECT_EQ(at_zero.content, StateAfter(1));  // the first write was in flight
  CrashImage settled =
      rec_->MakeCrashImage(fd, 0, rng, {.keep_probability = 1, .include_in_flight = false});
  EXPECT_EQ(settled.content, StateAfter(0));
}

TEST_P(PowerFailRecorderTest, WriteCrashImageWritesTheSameImage) {
  RunScript();
  for (size_t cut : {3u, 5u, 7u}) {
    std::mt19937_64 a(cut), b(cut);
    CrashImage img = rec_->MakeCrashImage(file_->fd(), cut, a);
    ASSERT_TRUE(rec_->WriteCrashImage(file_->fd(), cut, b, dir_ / "crash").ok());
    auto written = testing::ReadWholeFile(dir_ / "crash");
    ASSERT_EQ(written.size(), img.content.size());
    EXPECT_EQ(0, std::memcmp(written.data(), img.content.data(), written.size()));
  }
  std::mt19937_64 rng(0);
  EXPECT_FALSE(rec_->WriteCrashImage(file_->fd(), 7, rng, "/nonexistent/dir/x").ok());
}

TEST_P(PowerFailRecorderTest, TornWritesKeepWholeSectorsOnly) {
  Write({100, 3000, 7});  // sectors [100,512) [512,1024) ... [3072,3100)
  int fd = file_->fd();
  bool saw_partial = false;
  for (uint64_t seed = 0; seed < 32; ++seed) {
    std::mt19937_64 rng(seed);
    CrashImage img = rec_->MakeCrashImage(
        fd, 1, rng, {.keep_probability = 1, .torn_writes = true, .torn_probability = 1});
    ASSERT_EQ(img.torn.size(), 1u);
    int new_sectors = 0;
    for (uint64_t s = 0; s < 7; ++s) {
      uint64_t from = std::max<uint64_t>(100, s * 512),
               to = std::min<uint64_t>(3100, s * 512 + 512);
      std::byte first = img.content[from];
      for (uint64_t p = from; p < to; ++p) ASSERT_EQ(img.content[p], first) << p;
      ASSERT_TRUE(first == std::byte{7} || first == std::byte{kInitialByte});
      new_sectors += first == std::byte{7};
    }
    EXPECT_EQ(img.content[99], std::byte{kInitialByte});
    EXPECT_EQ(img.content[3100], std::byte{kInitialByte});
    saw_partial |= new_sectors > 0 && new_sectors < 7;
  }
  EXPECT_TRUE(saw_partial);
}

TEST_P(PowerFailRecorderTest, LengthChangesBehindTheEngineAreLogged) {
  Write({0, 10, 1});
  ASSERT_EQ(::ftruncate(file_->fd(), 8192), 0);
  Sync();  // notices the new length before the flush
  const auto& ev = rec_->events();
  ASSERT_EQ(ev.size(), 3u);
  EXPECT_EQ(ev[1].kind, Kind::kResize);
  EXPECT_EQ(ev[1].length, 8192u);
  std::mt19937_64 rng(0);
  EXPECT_EQ(rec_->MakeCrashImage(file_->fd(), 3, rng).content.size(), 8192u);
  EXPECT_EQ(rec_->MakeCrashImage(file_->fd(), 1, rng, {.keep_probability = 0}).content.size(),
            kInitialSize);
  EXPECT_EQ(rec_->MakeCrashImage(file_->fd(), 3, rng).content[5], std::byte{1});
}

TEST_P(PowerFailRecorderTest, TracksWritableFilesFromTheirFirstRequest) {
  std::ofstream(dir_ / "g", std::ios::binary) << "hello world";
  auto ro = File::Open(dir_ / "g", false);
  auto rw = File::Open(dir_ / "g", true);
  ASSERT_TRUE(ro.ok() && rw.ok());
  std::vector<std::byte> buf(5);
  ASSERT_TRUE(reactor_->BlockOn((*ro)->ReadAt(buf, 0)).ok());
  EXPECT_FALSE(rec_->tracked((*ro)->fd()));
  auto w = Bytes(5, 'J');
  ASSERT_TRUE(reactor_->BlockOn((*rw)->WriteAt(w, 0)).ok());
  ASSERT_TRUE(rec_->tracked((*rw)->fd()));
  const auto& initial = rec_->initial_content((*rw)->fd());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(initial.data()), initial.size()),
            "hello world");  // captured before the write
  EXPECT_FALSE(rec_->Track((*rw)->fd(), "again").ok());
}

TEST_P(PowerFailRecorderTest, FailedRequestsAreNotLogged) {
  // Recorder over fault injection: a failed write never happened.
  auto* faults = new FaultInjectionEngine(reactor_->ReplaceEngine(nullptr));
  auto* rec = new PowerFailRecorder(std::unique_ptr<Engine>(faults));
  reactor_->ReplaceEngine(std::unique_ptr<Engine>(rec));  // drops the old recorder
  faults->FailOnce(IoOp::kWrite, EIO);
  faults->FailOnce(IoOp::kFdatasync, EIO);
  auto buf = Bytes(10, 3);
  EXPECT_EQ(reactor_->BlockOn(file_->WriteAt(buf, 0)).code(), EIO);
  EXPECT_EQ(reactor_->BlockOn(file_->Sync()).code(), EIO);
  EXPECT_TRUE(reactor_->BlockOn(file_->WriteAt(buf, 100)).ok());
  ASSERT_EQ(rec->events().size(), 1u);
  EXPECT_EQ(rec->events()[0].offset, 100u);
  EXPECT_EQ(rec->LastFlushBefore(file_->fd(), 1), std::nullopt);
}

Task<void> WriteBlock(File* f, uint64_t off, uint8_t v, int* bad) {
  auto buf = Bytes(512, v);
  Status s = co_await f->WriteAt(buf, off);
  if (!s.ok()) ++*bad;
}

TEST_P(PowerFailRecorderTest, ConcurrentRequestsAreAllRecorded) {
  int bad = 0;
  for (int i = 0; i < 200; ++i) reactor_->Spawn(WriteBlock(file_.get(), i * 512, i, &bad));
  reactor_->RunUntilIdle();
  Sync();
  EXPECT_EQ(bad, 0);
  ASSERT_EQ(rec_->events().size(), 201u);
  std::mt19937_64 rng(0);
  CrashImage img = rec_->MakeCrashImage(file_->fd(), 201, rng, {.keep_probability = 0});
  auto on_disk = testing::ReadWholeFile(dir_ / "f");
  ASSERT_EQ(img.content.size(), on_disk.size());
  EXPECT_EQ(0, std::memcmp(img.content.data(), on_disk.data(), on_disk.size()));
}

INSTANTIATE_TEST_SUITE_P(Engines, PowerFailRecorderTest,
                         ::testing::Values(EngineKind::kUring, EngineKind::kSync),
                         [](const auto& info) {
                           return info.param == EngineKind::kSync ? "Sync" : "Uring";
                         });

// An engine the test completes by hand, in any order, to make requests overlap.
class ManualEngine final : public Engine {
 public:
  const char* name() const override { return "manual"; }
  bool Submit(IoRequest* req) override {
    queue_.push_back(req);
    return false;
  }
  size_t Poll(bool) override { return 0; }
  size_t in_flight() const override { return queue_.size(); }
  void Cancel(IoRequest*) override {}
  // Performs and completes the queued request at position `i`.
  void Complete(size_t i) {
    IoRequest* req = queue_[i];
    queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(i));
    ssize_t r = 0;
    if (req->op == IoOp::kWrite) {
      r = ::pwrite(req->fd, req->buf, req->len, static_cast<off_t>(req->offset));
    } else if (req->op == IoOp::kRead) {
      r = ::pread(req->fd, req->buf, req->len, static_cast<off_t>(req->offset));
    } else {
      r = ::fdatasync(req->fd);
    }
    req->result = r < 0 ? -errno : r;
    req->waiter.resume();
  }

 private:
  std::deque<IoRequest*> queue_;
};

Task<void> SyncFile(File* f, int* bad) {
  Status s = co_await f->Sync();
  if (!s.ok()) ++*bad;
}

TEST(PowerFailRecorderOverlap, FlushCoversOnlyWritesCompletedBeforeItWasSubmitted) {
  testing::ScratchDir dir;
  std::ofstream(dir / "f", std::ios::binary) << std::string(4096, '\0');
  auto* manual = new ManualEngine;
  auto* rec = new PowerFailRecorder(std::unique_ptr<Engine>(manual));
  Reactor reactor((std::unique_ptr<Engine>(rec)));
  auto f = File::Open(dir / "f", true);
  ASSERT_TRUE(f.ok());
  int bad = 0;
  reactor.Spawn(WriteBlock(f->get(), 0, 1, &bad));     // A
  reactor.Spawn(WriteBlock(f->get(), 512, 2, &bad));   // B
  manual->Complete(1);                                 // B completes: event 0
  reactor.Spawn(SyncFile(f->get(), &bad));             // F submitted after B, before A
  reactor.Spawn(WriteBlock(f->get(), 1024, 3, &bad));  // C submitted with F
  manual->Complete(2);                                 // C completes while F runs: event 1
  manual->Complete(1);                                 // F completes: event 2
  manual->Complete(0);                                 // A completes: event 3
  reactor.RunUntilIdle();
  EXPECT_EQ(bad, 0);
  int fd = (*f)->fd();
  const auto& ev = rec->events();
  ASSERT_EQ(ev.size(), 4u);
  EXPECT_EQ(ev[0].offset, 512u);
  EXPECT_EQ(ev[1].offset, 1024u);
  EXPECT_EQ(ev[1].submitted_at, 1u);
  EXPECT_EQ(ev[2].kind, Kind::kFlush);
  EXPECT_EQ(ev[2].submitted_at, 1u);
  EXPECT_EQ(ev[3].offset, 0u);
  EXPECT_EQ(ev[3].submitted_at, 0u);
  EXPECT_EQ(rec->LastFlushBefore(fd, 3), 2u);
  EXPECT_EQ(rec->DurableBefore(fd, 3), 1u);
  // Neither C (done while F ran) nor A (done after F) is covered by F.
  EXPECT_EQ(rec->AcknowledgedWrites(fd, 4), std::vector<size_t>{0});

  // At cut 3 (after F): B must be there; C completed but is not acknowledged, so it may or
  // may not be; A was in flight since before the cut and may be too.
  bool a_kept = false, c_kept = false, c_dropped = false;
  for (uint64_t seed = 0; seed < 64; ++seed) {
    std::mt19937_64 rng(seed);
    CrashImage img = rec->MakeCrashImage(fd, 3, rng);
    ASSERT_EQ(img.content[512], std::byte{2});
    a_kept |= img.content[0] == std::byte{1};
    (img.content[1024] == std::byte{3} ? c_kept : c_dropped) = true;
    std::mt19937_64 rng2(seed);
    CrashImage settled = rec->MakeCrashImage(fd, 3, rng2, {.include_in_flight = false});
    ASSERT_EQ(settled.content[0], std::byte{0});
  }
  EXPECT_TRUE(a_kept && c_kept && c_dropped);
  // At cut 0 only A and B (submitted before any event) can be present, never C.
  bool a_at_zero = false;
  for (uint64_t seed = 0; seed < 16; ++seed) {
    std::mt19937_64 rng(seed);
    CrashImage img = rec->MakeCrashImage(fd, 0, rng);
    ASSERT_EQ(img.content[1024], std::byte{0});
    a_at_zero |= img.content[0] == std::byte{1};
  }
  EXPECT_TRUE(a_at_zero);
}

}  // namespace
}  // namespace qcow2kit
