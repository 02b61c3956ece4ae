// SharedDevice: one BlockDevice served to several reactors (threads), as DESIGN.md's
// Concurrency section lays it out. The reactor that creates it is the owner: it keeps the
// device (metadata caches, allocator, writeback) and runs everything that changes mappings.
// Every reactor that serves requests, the owner's included, attaches a Port.
//
// A port keeps its own cache of fetched mappings. Reads of data, zero and unallocated
// extents and overwrites of mapped, writable clusters go out on the port's own ring with no
// lock and no thread hop. Everything else (allocating writes, write-zeroes, discard, flush,
// compressed or backing data, unaligned direct I/O) is a message to the owner, which runs it
// on the BlockDevice and answers with a fresh mapping of the range.
//
// Invalidation: the owner logs the guest range of every mapping change as it ends, under a
// version number it publishes; a port that sees the version move drops the cached extents
// the new log entries overlap (one atomic load per request when nothing changed). A lookup
// that overlaps a change in flight is not cached.
//
// The mapping-lifetime rule holds across threads through pins: the owner holds a
// FormatDriver::BeginIo() for each port, taken before the lookups whose extents the port
// caches under it, and ends it once the port has dropped those extents and its I/O under them
// is done. Freed clusters thus stay quarantined while a port's older I/O may reach them. A port
// moves to a new pin after a number of changes (the owner nudges idle ones), so that
// quarantined clusters do not wait for long.
//
// Writes checked against the image's metadata (GuardDataWrite) when they were looked up stay
// checked until the driver's guard generation moves (new L2 tables or refcount blocks, the
// image found corrupt); the owner then logs a change of the whole device.
//
// Mapping-changing operations must all come through ports (not the BlockDevice directly)
// while ports are attached.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <unordered_map>
#include <vector>

#include "qcow2kit/block.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

class Inbox;

class SharedDevice {
 public:
  class Port;

  // On the owner reactor, which from then on runs the owner's message loop: keep it turning
  // until ports() is 0, then Stop() it. `dev` must outlive this object.
  static Result<std::unique_ptr<SharedDevice>> Create(BlockDevice* dev);
  ~SharedDevice();
  SharedDevice(const SharedDevice&) = delete;
  SharedDevice& operator=(const SharedDevice&) = delete;

  // On the reactor (thread) that will use the port; the port's message loop is spawned there.
  Result<std::unique_ptr<Port>> Attach();
  // Ports attached and not yet fully detached (any thread).
  int ports() const { return ports_.load(std::memory_order_acquire); }
  // Owner thread, once ports() is 0: ends the owner's message loop.
  void Stop();
  BlockDevice& device() const { return *dev_; }

 private:
  struct PortRecord {
    uint64_t current = 0;          // key of the pin lookups for the port are made under (0: none)
    uint64_t current_version = 0;  // the mapping version when it was taken
    uint64_t nudged = 0;           // the pin the port was last told to move off
    std::map<uint64_t, uint64_t> pins;  // pin key -> BeginIo epoch held for the port
  };
  // A guest range [lo, hi) of a mapping change or a lookup.
  struct Range {
    uint64_t lo, hi;
    bool Overlaps(const Range& o) const { return lo < o.hi && o.lo < hi; }
  };
  struct ActiveFetch {
    Range range;
    bool spoiled = false;  // a change of an overlapping range began meanwhile
  };
  struct LoggedChange {
    uint64_t version;
    Range range;
  };
  struct Refresh;
  struct ChangeResult;

  explicit SharedDevice(BlockDevice* dev);
  // Owner thread: brackets an operation that may change the mapping of `range`.
  void BeginChange(const Range& range);
  void EndChange(const Range& range);
  // Owner thread, after anything that may place metadata or find the image corrupt: if the
  // driver's guard generation moved, logs a change of the whole device, so that no port keeps
  // writing through extents checked against the old metadata.
  void NoteGuardChanges();
  Task<Status> FlushOnOwner();
  // Owner thread: the mapping of [offset, offset + length) for `port`, under a pin;
  // `for_write` also runs the metadata-overlap check on its writable data extents.
  Task<Refresh> FetchFor(Port* port, uint64_t offset, uint64_t length, bool for_write);
  // Owner thread: runs `op` as a change of `range`, then looks up `refresh` (if not empty).
  Task<ChangeResult> RunChange(Port* port, Range range, Range refresh,
                               const std::function<Task<Status>(BlockDevice*)>* op);
  void Release(Port* port, uint64_t pin);
  void Detach(Port* port);

  BlockDevice* dev_;
  std::unique_ptr<Inbox> inbox_;
  const std::thread::id owner_thread_ = std::this_thread::get_id();
  std::atomic<int> ports_ = 0;
  std::atomic<uint64_t> published_ = 0;  // version of the newest entry of log_
  std::mutex log_mu_;
  std::deque<LoggedChange> log_;  // guarded by log_mu_: the latest changes, oldest first
  // Owner thread only:
  uint64_t version_ = 0;
  uint64_t guard_generation_ = 0;
  uint64_t next_pin_ = 1;
  std::vector<Range> changes_;         // in flight
  std::vector<ActiveFetch*> fetches_;  // in flight
  std::unordered_map<Port*, PortRecord> records_;
};

// One reactor's handle on a SharedDevice. Used only on the thread that attached it.
class SharedDevice::Port {
 public:
  ~Port();
  uint64_t size() const { return shared_->dev_->size(); }

  // As BlockDevice's operations of the same names.
  Task<Status> Read(uint64_t offset, std::span<std::byte> buf);
  Task<Status> Write(uint64_t offset, std::span<const std::byte> buf, bool fua = false);
  Task<Status> WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap, bool fua = false);
  Task<Status> Discard(uint64_t offset, uint64_t length);
  Task<Status> Flush();

  // Once none of this port's requests is in flight: leaves the device. The port's reactor
  // then runs until idle (the port's message loop ends) before the port is destroyed.
  void Detach();

  // What took which path (for tests and statistics).
  struct Stats {
    uint64_t fast_reads = 0;   // served from the cache on this port's ring
    uint64_t fast_writes = 0;  // overwrites in place on this port's ring
    uint64_t owner_ops = 0;    // requests run by the owner
    uint64_t refreshes = 0;    // mapping lookups asked of the owner
  };
  const Stats& stats() const { return stats_; }

 private:
  friend class SharedDevice;
  struct Pin {
    uint64_t version = 0;    // the owner's mapping version when it was taken
    uint64_t in_flight = 0;  // fast-path I/Os counted under it
    bool retired = false;    // its cached extents are gone; released once in_flight is 0
  };
  struct Piece;
  struct CachedExtent {
    Extent extent;
    uint64_t pin = 0;      // the pin the lookup was made under
    bool guarded = false;  // checked for writing (FetchFor's for_write)
  };
  enum class Plan { kFast, kMiss, kOwner };
  template <typename T>
  struct OwnerCall;

  Port(SharedDevice* shared, std::unique_ptr<Inbox> inbox, bool on_owner);
  // Runs `op` on the owner's reactor and resumes here with its result.
  template <typename T>
  Task<T> OnOwner(const std::function<Task<T>()>* op);
  // Runs `fn` on the owner's thread, inline if this is it.
  void ToOwner(std::function<void()> fn);
  // Applies the owner's change log since cache_version_; moves to a new pin if it is old.
  void Revalidate();
  // Drops cached extents of log entries after `version` that overlap `range`.
  void ReplayLog(uint64_t version, const Range& range);
  // Removes [lo, hi) from the cache, splitting extents that straddle its ends.
  void Trim(uint64_t lo, uint64_t hi);
  // Drops the whole cache and retires every pin.
  void Rotate();
  void MaybeRelease(uint64_t pin);
  void Accept(const Refresh& r);
  Task<void> RefreshRange(uint64_t offset, uint64_t length, bool for_write);
  // Splits [offset, offset + length) into cached pieces: kFast if all of it may go out on
  // this port's ring (`pin` is then the pin to count the I/O under), kMiss if the cache does
  // not know enough, kOwner if the owner must run it.
  Plan PlanRange(uint64_t offset, uint64_t length, bool write, bool aligned_buffer,
                 std::vector<Piece>* out, uint64_t* pin);
  Task<Status> FastRead(uint64_t offset, std::span<std::byte> buf, const std::vector<Piece>& pieces,
                        uint64_t pin);
  Task<Status> FastWrite(uint64_t offset, std::span<const std::byte> buf,
                         const std::vector<Piece>& pieces, uint64_t pin);
  // Runs a mapping-changing operation of [offset, offset + length) on the owner; with
  // `refresh`, the range's new mapping comes back with the result.
  Task<Status> ChangeOnOwner(uint64_t offset, uint64_t length, bool refresh,
                             const std::function<Task<Status>(BlockDevice*)>* op);

  SharedDevice* shared_;
  std::unique_ptr<Inbox> inbox_;
  const bool on_owner_;
  const bool has_backing_;                  // unallocated ranges read the backing layer
  const bool direct_writes_need_owner_;     // clusters smaller than a direct-I/O block
  uint64_t cache_version_ = 0;              // the change log is applied up to here
  std::map<uint64_t, CachedExtent> cache_;  // by guest offset, never overlapping
  std::map<uint64_t, Pin> pins_;            // by key
  uint64_t current_pin_ = 0;                // the newest live pin (0: none)
  uint64_t retired_below_ = 0;              // pins with smaller keys are retired
  Stats stats_;
};

}  // namespace qcow2kit
