// PowerFailRecorder: an Engine wrapper for crash-consistency tests. It passes every request
// through to the inner engine and logs, for each tracked file, every completed write (offset
// and a copy of the bytes) and every completed flush (fdatasync / fsync), in completion order.
// From that log it builds the file a power failure at any point could have left behind.
//
// The log is one timeline across all tracked files; a cut `c` (0 <= c <= events().size())
// means: events [0, c) had completed when the power failed. What survives on a file:
//   - its content when tracking started,
//   - every write that completed before a flush of that file was submitted, where the flush
//     completed before the cut (those are acknowledged durable),
//   - an arbitrary subset of the other writes that were submitted before the cut (completed
//     or still in flight), applied in completion order, optionally torn at 512-byte sectors.
//
// Files are tracked by descriptor number: take the recorder out of the reactor
// (Reactor::ReplaceEngine) before tracked files are closed and other files may reuse their
// numbers.
//
// File lengths: writes past the end extend the file. ftruncate() does not go through the
// engine, so it cannot be intercepted; length changes are noticed with fstat() when the next
// request on the file is submitted (or when NoteLengthChange() is called) and logged as resize
// events, which survive like writes do.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "qcow2kit/reactor.h"
#include "qcow2kit/status.h"

namespace qcow2kit {

struct PowerFailEvent {
  enum class Kind : uint8_t { kWrite, kFlush, kResize };
  Kind kind = Kind::kWrite;
  int fd = -1;
  uint64_t offset = 0;          // kWrite
  std::vector<std::byte> data;  // kWrite: the bytes the file received
  uint64_t length = 0;          // kResize: the new file length
  IoOp op = IoOp::kWrite;       // the request (kFdatasync or kFsync for flushes)
  // Events logged when the request was submitted: a flush covers the writes with an index
  // below this, and a write with submitted_at <= c may have reached the disk at cut c.
  size_t submitted_at = 0;

  uint64_t end() const { return offset + data.size(); }
};

// How the unacknowledged writes of a crash image are chosen.
struct CrashOptions {
  double keep_probability = 0.5;   // each unacknowledged write (or resize) survives with this
  bool include_in_flight = true;   // writes submitted before the cut but completed after it
  bool torn_writes = false;        // a surviving write may keep only some of its sectors
  double torn_probability = 0.25;  // with torn_writes: chance a surviving write is torn
};

// One generated crash state of a file.
struct CrashImage {
  std::vector<std::byte> content;  // the whole file; its size is the file length
  size_t durable_before = 0;       // events below this index are acknowledged by a flush
  std::vector<size_t> applied;     // indices of the write/resize events applied, in order
  std::vector<size_t> torn;        // the subset of `applied` applied only in part
};

class PowerFailRecorder final : public Engine {
 public:
  explicit PowerFailRecorder(std::unique_ptr<Engine> inner);
  ~PowerFailRecorder() override;

  const char* name() const override { return inner_->name(); }
  bool Submit(IoRequest* req) override;
  size_t Poll(bool wait) override { return inner_->Poll(wait); }
  size_t in_flight() const override { return inner_->in_flight(); }
  // Only untracked descriptors (sockets) are cancelled; tracked files are never waited on.
  void Cancel(IoRequest* req) override { inner_->Cancel(req); }

  // Starts tracking `fd` (named `path` in messages): snapshots its current content as the
  // initial state. Fails if it is already tracked or cannot be read.
  Status Track(int fd, std::string path);
  // With auto-tracking (the default), a descriptor open for writing is tracked when its first
  // request arrives, before that request runs, so files opened inside the library are
  // recorded from their pristine state.
  void set_auto_track(bool on) { auto_track_ = on; }
  bool tracked(int fd) const { return files_.count(fd) > 0; }
  // Checks `fd`'s length now and logs a resize event if it changed behind the engine's back.
  void NoteLengthChange(int fd);

  const std::vector<PowerFailEvent>& events() const { return events_; }
  const std::vector<std::byte>& initial_content(int fd) const;
  const std::string& path(int fd) const;

  // Index of the last flush of `fd` that completed before cut `cut`, if any.
  std::optional<size_t> LastFlushBefore(int fd, size_t cut) const;
  // Events of `fd` with an index below this are acknowledged durable at cut `cut`: the
  // largest submitted_at of the flushes of `fd` completed before the cut (0 without one).
  size_t DurableBefore(int fd, size_t cut) const;
  // Indices of the writes of `fd` acknowledged durable at cut `cut`, in order.
  std::vector<size_t> AcknowledgedWrites(int fd, size_t cut) const;

  // Builds the state of `fd`'s file after a power failure at `cut`, choosing the surviving
  // unacknowledged writes with `rng`.
  CrashImage MakeCrashImage(int fd, size_t cut, std::mt19937_64& rng,
                            const CrashOptions& options = {}) const;
  // MakeCrashImage, written to `out_path` (created or replaced).
  Status WriteCrashImage(int fd, size_t cut, std::mt19937_64& rng, const std::string& out_path,
                         const CrashOptions& options = {}) const;

 private:
  struct TrackedFile {
    std::string path;
    std::vector<std::byte> initial;
    uint64_t length = 0;  // expected length after the logged events
    size_t writes_in_flight = 0;
  };
  struct Pending;
  struct Relay;
  static Relay Forward(PowerFailRecorder* self, Pending* p);

  TrackedFile* Lookup(int fd);
  void Complete(Pending* p);

  std::unique_ptr<Engine> inner_;
  bool auto_track_ = true;
  std::map<int, TrackedFile> files_;
  std::map<int, bool> seen_fds_;  // descriptors auto-tracking already looked at
  std::vector<PowerFailEvent> events_;
};

}  // namespace qcow2kit
