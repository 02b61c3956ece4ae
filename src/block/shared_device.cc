#include "qcow2kit/shared_device.h"

#include <algorithm>
#include <coroutine>
#include <cstring>
#include <optional>
#include <utility>

#include "block/align.h"
#include "io/inbox.h"
#include "qcow2kit/buffer.h"
#include "qcow2kit/reactor.h"

namespace qcow2kit {
namespace {

// A port forgets its whole cache past this many extents (a cache of mappings, not a copy of
// the image's tables: a refresh costs one message).
constexpr size_t kMaxCachedExtents = 1 << 16;
// Changes the owner remembers for ports that are behind; one further behind drops its cache.
constexpr size_t kLogEntries = 4096;
// A port moves to a new pin after this many changes, letting clusters freed meanwhile go.
constexpr uint64_t kRotateAfter = 64;
// Lookups cover the request's aligned window of this size (one message maps its neighbours).
constexpr uint64_t kLookupWindow = 256 << 10;

bool Aligned(uint64_t v) {
  return v % kIoAlignment == 0;
}

// The part [lo, hi) of `e` (which covers it).
Extent Slice(const Extent& e, uint64_t lo, uint64_t hi) {
  Extent s = e;
  s.guest_offset = lo;
  s.length = hi - lo;
  if (e.has_host() && e.kind != ExtentKind::kCompressed) s.host_offset += lo - e.guest_offset;
  return s;
}

}  // namespace

// The owner's answer to a mapping lookup for one port.
struct SharedDevice::Refresh {
  uint64_t version = 0;  // the owner's mapping version when the lookup ended
  // The extents describe the mapping (no change of an overlapping range ran meanwhile).
  bool usable = false;
  bool guarded = false;  // writable data extents passed the metadata-overlap check
  Range range{0, 0};     // what was looked up; the extents are clipped to it
  uint64_t pin = 0;      // the pin it was made under
  uint64_t pin_version = 0;
  std::vector<Extent> extents;
};

struct SharedDevice::ChangeResult {
  Status status;
  Refresh refresh;
};

// A run of one request that the cache maps to one kind of place.
struct SharedDevice::Port::Piece {
  uint64_t guest_offset;
  uint64_t length;
  ExtentKind kind;
  uint8_t file_index;
  uint64_t host;
};

// The awaitable behind OnOwner: posts `op` to the owner's inbox; the owner runs it as a task
// there and posts the resumption back to the port's reactor.
template <typename T>
struct SharedDevice::Port::OwnerCall {
  Port* port;
  const std::function<Task<T>()>* op;  // the caller's, alive until it resumes
  std::optional<T> result;

  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) {
    Inbox* reply = port->inbox_.get();
    port->shared_->inbox_->Post(
        [this, h, reply] { Reactor::Current()->Spawn(RunThenReply(this, h, reply)); });
  }
  T await_resume() { return std::move(*result); }

  static Task<void> RunThenReply(OwnerCall* call, std::coroutine_handle<> h, Inbox* reply) {
    T r = co_await (*call->op)();
    call->result.emplace(std::move(r));
    // `call` lives in the waiting frame: not touched once the reply is posted.
    reply->Post([h] { Reactor::Current()->Post(h); });
  }
};

// ---- The owner ----

Result<std::unique_ptr<SharedDevice>> SharedDevice::Create(BlockDevice* dev) {
  auto inbox = Inbox::Create();
  if (!inbox.ok()) return inbox.status();
  auto shared = std::unique_ptr<SharedDevice>(new SharedDevice(dev));
  shared->inbox_ = std::move(*inbox);
  Reactor::Current()->Spawn(shared->inbox_->Serve());
  return shared;
}

SharedDevice::SharedDevice(BlockDevice* dev)
    : dev_(dev), guard_generation_(dev->top().guard_generation()) {}
SharedDevice::~SharedDevice() = default;

void SharedDevice::Stop() {
  inbox_->Stop();
}

Result<std::unique_ptr<SharedDevice::Port>> SharedDevice::Attach() {
  auto inbox = Inbox::Create();
  if (!inbox.ok()) return inbox.status();
  // The owner's reactor is the one whose thread created the owner's inbox server; a port
  // created there calls the owner inline.
  const bool on_owner = owner_thread_ == std::this_thread::get_id();
  auto port = std::unique_ptr<Port>(new Port(this, std::move(*inbox), on_owner));
  ports_.fetch_add(1, std::memory_order_acq_rel);
  Reactor::Current()->Spawn(port->inbox_->Serve());
  return port;
}

void SharedDevice::BeginChange(const Range& range) {
  changes_.push_back(range);
  for (ActiveFetch* f : fetches_) f->spoiled |= f->range.Overlaps(range);
}

void SharedDevice::EndChange(const Range& range) {
  changes_.erase(std::find_if(changes_.begin(), changes_.end(), [&](const Range& r) {
    return r.lo == range.lo && r.hi == range.hi;
  }));
  ++version_;
  {
    std::lock_guard lock(log_mu_);
    if (log_.size() == kLogEntries) log_.pop_front();
    log_.push_back({version_, range});
  }
  published_.store(version_, std::memory_order_release);
  // Ports whose pin is old move to a new one when they next look; tell idle ones now, so
  // that clusters freed meanwhile do not stay quarantined.
  for (auto& [port, rec] : records_) {
    if (rec.current == 0 || rec.nudged == rec.current ||
        rec.current_version + kRotateAfter > version_) {
      continue;
    }
    rec.nudged = rec.current;
    Port* p = port;
    p->inbox_->Post([p] { p->Revalidate(); });
  }
}

void SharedDevice::NoteGuardChanges() {
  const uint64_t now = dev_->top().guard_generation();
  if (now == guard_generation_) return;
  guard_generation_ = now;
  const Range all{0, dev_->size()};
  BeginChange(all);  // spoils the lookups in flight too
  EndChange(all);
}

Task<Status> SharedDevice::FlushOnOwner() {
  Status s = co_await dev_->Flush();
  NoteGuardChanges();
  co_return s;
}

Task<SharedDevice::Refresh> SharedDevice::FetchFor(Port* port, uint64_t offset, uint64_t length,
                                                   bool for_write) {
  Refresh r;
  const uint64_t size = dev_->size();
  r.range = {std::min(offset, size), std::min(offset + length, size)};
  FormatDriver& top = dev_->top();
  // Pin before looking: whatever the lookup shows stays allocated until the port lets go.
  PortRecord& rec = records_[port];
  if (rec.current == 0) {
    rec.current = next_pin_++;
    rec.current_version = version_;
    rec.pins.emplace(rec.current, top.BeginIo());
  }
  r.pin = rec.current;
  r.pin_version = rec.current_version;
  ActiveFetch fetch{r.range};
  for (const Range& c : changes_) fetch.spoiled |= c.Overlaps(r.range);
  if (r.range.lo == r.range.hi || fetch.spoiled) {
    r.version = version_;
    co_return r;
  }
  fetches_.push_back(&fetch);
  Status s = co_await top.Fetch(r.range.lo, r.range.hi - r.range.lo, &r.extents);
  r.usable = s.ok();
  if (r.usable && for_write) {
    r.guarded = true;
    for (Extent& e : r.extents) {
      if (e.guest_offset >= r.range.hi || e.kind != ExtentKind::kData || !e.writable) continue;
      const uint64_t lo = std::max(e.guest_offset, r.range.lo);
      const uint64_t hi = std::min(e.end(), r.range.hi);
      Status g =
          co_await top.GuardDataWrite(e.file_index, e.host_offset + (lo - e.guest_offset), hi - lo);
      // Damage: the write goes to the owner, which refuses it with the driver's error.
      if (!g.ok()) e.writable = false;
    }
  }
  // The guard may have found the image corrupt: the writes other ports checked go too.
  if (for_write) NoteGuardChanges();
  fetches_.erase(std::find(fetches_.begin(), fetches_.end(), &fetch));
  if (fetch.spoiled) r.usable = false;
  r.version = version_;
  co_return r;
}

void SharedDevice::Release(Port* port, uint64_t pin) {
  auto rec = records_.find(port);
  if (rec == records_.end()) return;
  auto it = rec->second.pins.find(pin);
  if (it == rec->second.pins.end()) return;
  dev_->top().EndIo(it->second);
  rec->second.pins.erase(it);
  if (rec->second.current == pin) rec->second.current = 0;
}

void SharedDevice::Detach(Port* port) {
  if (auto rec = records_.find(port); rec != records_.end()) {
    for (const auto& [key, epoch] : rec->second.pins) dev_->top().EndIo(epoch);
    records_.erase(rec);
  }
  // The port may be destroyed as soon as its loop ends: nothing of it is touched after this.
  port->inbox_->Stop();
  ports_.fetch_sub(1, std::memory_order_acq_rel);
}

Task<SharedDevice::ChangeResult> SharedDevice::RunChange(
    Port* port, Range range, Range refresh, const std::function<Task<Status>(BlockDevice*)>* op) {
  BeginChange(range);
  Status s = co_await (*op)(dev_);
  EndChange(range);
  NoteGuardChanges();
  ChangeResult out{std::move(s), {}};
  if (refresh.lo < refresh.hi) {
    out.refresh = co_await FetchFor(port, refresh.lo, refresh.hi - refresh.lo, /*for_write=*/true);
  }
  co_return out;
}

// ---- A port ----
//
// (GCC 12 destroys a temporary built inside a co_await expression twice: every function
// handed to OnOwner / ChangeOnOwner is a named local of the caller, passed by pointer, which
// lives until the call resumes it.)

SharedDevice::Port::Port(SharedDevice* shared, std::unique_ptr<Inbox> inbox, bool on_owner)
    : shared_(shared),
      inbox_(std::move(inbox)),
      on_owner_(on_owner),
      has_backing_(shared->dev_->top().backing() != nullptr),
      direct_writes_need_owner_(shared->dev_->top().cluster_size() < kIoAlignment) {}

SharedDevice::Port::~Port() = default;

template <typename T>
Task<T> SharedDevice::Port::OnOwner(const std::function<Task<T>()>* op) {
  if (on_owner_) {
    T r = co_await (*op)();
    co_return r;
  }
  OwnerCall<T> call{this, op, {}};
  T r = co_await call;
  co_return r;
}

void SharedDevice::Port::ToOwner(std::function<void()> fn) {
  if (on_owner_) {
    fn();
  } else {
    shared_->inbox_->Post(std::move(fn));
  }
}

void SharedDevice::Port::Detach() {
  SharedDevice* shared = shared_;
  Port* self = this;
  shared_->inbox_->Post([shared, self] { shared->Detach(self); });
}

void SharedDevice::Port::Revalidate() {
  const uint64_t published = shared_->published_.load(std::memory_order_acquire);
  if (published != cache_version_) {
    std::lock_guard lock(shared_->log_mu_);
    const auto& log = shared_->log_;
    if (log.empty() || log.front().version > cache_version_ + 1) {
      cache_.clear();  // too far behind to know what changed
      if (!log.empty()) cache_version_ = log.back().version;
    } else {
      for (auto it = log.rbegin(); it != log.rend() && it->version > cache_version_; ++it) {
        Trim(it->range.lo, it->range.hi);
      }
      cache_version_ = log.back().version;
    }
  }
  if (current_pin_ != 0 && pins_[current_pin_].version + kRotateAfter <= cache_version_) Rotate();
}

void SharedDevice::Port::ReplayLog(uint64_t version, const Range& range) {
  std::lock_guard lock(shared_->log_mu_);
  const auto& log = shared_->log_;
  if (!log.empty() && log.front().version > version + 1) {
    Trim(range.lo, range.hi);
    return;
  }
  for (auto it = log.rbegin(); it != log.rend() && it->version > version; ++it) {
    if (it->version > cache_version_ || !it->range.Overlaps(range)) continue;
    Trim(std::max(it->range.lo, range.lo), std::min(it->range.hi, range.hi));
  }
}

void SharedDevice::Port::Trim(uint64_t lo, uint64_t hi) {
  auto it = cache_.lower_bound(lo);
  if (it != cache_.begin()) {
    auto prev = std::prev(it);
    if (prev->second.extent.end() > lo) it = prev;
  }
  while (it != cache_.end() && it->first < hi) {
    const CachedExtent c = it->second;
    it = cache_.erase(it);
    const Extent& e = c.extent;
    if (e.guest_offset < lo) {
      cache_.emplace(e.guest_offset, CachedExtent{Slice(e, e.guest_offset, lo), c.pin, c.guarded});
    }
    if (e.end() > hi) {
      cache_.emplace(hi, CachedExtent{Slice(e, hi, e.end()), c.pin, c.guarded});
      break;  // extents do not overlap: nothing further starts before hi
    }
  }
}

void SharedDevice::Port::Rotate() {
  cache_.clear();
  current_pin_ = 0;
  if (pins_.empty()) return;
  retired_below_ = pins_.rbegin()->first + 1;
  for (auto it = pins_.begin(); it != pins_.end();) {
    const uint64_t key = it->first;
    it->second.retired = true;
    ++it;  // MaybeRelease may erase the pin
    MaybeRelease(key);
  }
}

void SharedDevice::Port::MaybeRelease(uint64_t pin) {
  auto it = pins_.find(pin);
  if (it == pins_.end() || !it->second.retired || it->second.in_flight > 0) return;
  pins_.erase(it);
  SharedDevice* shared = shared_;
  Port* self = this;
  ToOwner([shared, self, pin] { shared->Release(self, pin); });
}

void SharedDevice::Port::Accept(const Refresh& r) {
  Revalidate();
  // A pin this port has moved off: the answer's extents may be older than what its
  // quarantine covers.
  if (r.pin < retired_below_) return;
  if (!pins_.contains(r.pin)) {
    pins_[r.pin] = Pin{.version = r.pin_version};
    current_pin_ = std::max(current_pin_, r.pin);
  }
  if (!r.usable) return;
  if (cache_.size() + r.extents.size() > kMaxCachedExtents) cache_.clear();
  for (const Extent& e : r.extents) {
    const uint64_t lo = std::max(e.guest_offset, r.range.lo);
    const uint64_t hi = std::min(e.end(), r.range.hi);
    if (lo >= hi) continue;
    Trim(lo, hi);
    cache_.emplace(lo, CachedExtent{Slice(e, lo, hi), r.pin, r.guarded});
  }
  // Changes this port has already applied that ended after the lookup.
  if (r.version < cache_version_) ReplayLog(r.version, r.range);
  // A pin first seen here may already be old enough to move off (its nudge went before).
  if (current_pin_ != 0 && pins_[current_pin_].version + kRotateAfter <= cache_version_) {
    Rotate();
  }
}

Task<void> SharedDevice::Port::RefreshRange(uint64_t offset, uint64_t length, bool for_write) {
  ++stats_.refreshes;
  SharedDevice* shared = shared_;
  Port* self = this;
  // Reads look up the whole window around them; writes only their own clusters, which the
  // owner checks for overlap with metadata (and marks the image corrupt if they do).
  const uint64_t unit = for_write ? shared_->dev_->top().cluster_size() : kLookupWindow;
  const uint64_t lo = AlignDown(offset, unit);
  const uint64_t hi = AlignUp(offset + length, unit);
  std::function<Task<Refresh>()> fetch = [shared, self, lo, hi, for_write] {
    return shared->FetchFor(self, lo, hi - lo, for_write);
  };
  Refresh r = co_await OnOwner(&fetch);
  Accept(r);
}

SharedDevice::Port::Plan SharedDevice::Port::PlanRange(uint64_t offset, uint64_t length, bool write,
                                                       bool aligned_buffer, std::vector<Piece>* out,
                                                       uint64_t* pin) {
  Revalidate();
  out->clear();
  *pin = UINT64_MAX;
  const FormatDriver& top = shared_->dev_->top();
  const uint64_t end = offset + length;
  for (uint64_t pos = offset; pos < end;) {
    auto it = cache_.upper_bound(pos);
    if (it == cache_.begin()) return Plan::kMiss;
    --it;
    const CachedExtent& c = it->second;
    const Extent& e = c.extent;
    if (e.end() <= pos) return Plan::kMiss;
    const uint64_t n = std::min(end, e.end()) - pos;
    const uint64_t host = e.has_host() ? e.host_offset + (pos - e.guest_offset) : 0;
    if (write) {
      if (e.kind != ExtentKind::kData || !e.writable) return Plan::kOwner;
      if (!c.guarded) return Plan::kMiss;  // looked up for a read: check it for writing
      // Unaligned direct writes read-modify-write through the file's bounce buffer, which
      // only the owner may use.
      if (top.file(e.file_index)->direct() &&
          (direct_writes_need_owner_ || !aligned_buffer || !Aligned(host) || !Aligned(n))) {
        return Plan::kOwner;
      }
    } else if (e.kind == ExtentKind::kCompressed ||
               (e.kind == ExtentKind::kUnallocated && has_backing_)) {
      return Plan::kOwner;
    }
    // Count the I/O under the oldest pin involved: it was taken before every lookup here.
    *pin = std::min(*pin, c.pin);
    const ExtentKind kind = e.kind == ExtentKind::kData ? ExtentKind::kData : ExtentKind::kZero;
    Piece* last = out->empty() ? nullptr : &out->back();
    if (last && last->kind == kind &&
        (kind == ExtentKind::kZero ||
         (last->file_index == e.file_index && last->host + last->length == host))) {
      last->length += n;
    } else {
      out->push_back(Piece{pos, n, kind, e.file_index, host});
    }
    pos += n;
  }
  return Plan::kFast;
}

Task<Status> SharedDevice::Port::FastRead(uint64_t offset, std::span<std::byte> buf,
                                          const std::vector<Piece>& pieces, uint64_t pin) {
  ++pins_[pin].in_flight;
  const FormatDriver& top = shared_->dev_->top();
  Status s;
  for (const Piece& p : pieces) {
    auto part = buf.subspan(p.guest_offset - offset, p.length);
    if (p.kind != ExtentKind::kData) {
      std::memset(part.data(), 0, part.size());
      continue;
    }
    Status r = co_await top.file(p.file_index)->ReadZeroPadded(part, p.host);
    if (!r.ok()) {
      s = r;
      break;
    }
  }
  --pins_[pin].in_flight;
  MaybeRelease(pin);
  co_return s;
}

Task<Status> SharedDevice::Port::FastWrite(uint64_t offset, std::span<const std::byte> buf,
                                           const std::vector<Piece>& pieces, uint64_t pin) {
  ++pins_[pin].in_flight;
  const FormatDriver& top = shared_->dev_->top();
  Status s;
  for (const Piece& p : pieces) {
    Status w = co_await top.file(p.file_index)
                   ->WriteAt(buf.subspan(p.guest_offset - offset, p.length), p.host);
    if (!w.ok()) {
      s = w;
      break;
    }
  }
  --pins_[pin].in_flight;
  MaybeRelease(pin);
  co_return s;
}

Task<Status> SharedDevice::Port::ChangeOnOwner(
    uint64_t offset, uint64_t length, bool refresh,
    const std::function<Task<Status>(BlockDevice*)>* op) {
  ++stats_.owner_ops;
  SharedDevice* shared = shared_;
  Port* self = this;
  const uint64_t cs = shared_->dev_->top().cluster_size();
  const Range changed{AlignDown(offset, cs), std::min(AlignUp(offset + length, cs), size())};
  const Range lookup = refresh ? changed : Range{0, 0};
  std::function<Task<ChangeResult>()> change = [shared, self, changed, lookup, op] {
    return shared->RunChange(self, changed, lookup, op);
  };
  ChangeResult out = co_await OnOwner(&change);
  if (refresh) Accept(out.refresh);
  co_return out.status;
}

Task<Status> SharedDevice::Port::Read(uint64_t offset, std::span<std::byte> buf) {
  if (buf.empty()) co_return Status::Ok();  // nothing to map (and no pin to count it under)
  std::vector<Piece> pieces;
  uint64_t pin = 0;
  for (int attempt = 0; attempt < 2; ++attempt) {
    const Plan plan = PlanRange(offset, buf.size(), /*write=*/false, true, &pieces, &pin);
    if (plan == Plan::kFast) {
      ++stats_.fast_reads;
      Status s = co_await FastRead(offset, buf, pieces, pin);
      co_return s;
    }
    if (plan == Plan::kOwner) break;
    co_await RefreshRange(offset, buf.size(), /*for_write=*/false);
  }
  ++stats_.owner_ops;
  BlockDevice* dev = shared_->dev_;
  std::function<Task<Status>()> read = [dev, offset, buf] { return dev->Read(offset, buf); };
  Status s = co_await OnOwner(&read);
  co_return s;
}

Task<Status> SharedDevice::Port::Write(uint64_t offset, std::span<const std::byte> buf, bool fua) {
  if (buf.empty()) {
    if (!fua) co_return Status::Ok();
    Status s = co_await Flush();
    co_return s;
  }
  const bool aligned_buffer = Aligned(reinterpret_cast<uintptr_t>(buf.data()));
  std::vector<Piece> pieces;
  uint64_t pin = 0;
  for (int attempt = 0; attempt < 2; ++attempt) {
    const Plan plan = PlanRange(offset, buf.size(), /*write=*/true, aligned_buffer, &pieces, &pin);
    if (plan == Plan::kFast) {
      ++stats_.fast_writes;
      Status s = co_await FastWrite(offset, buf, pieces, pin);
      if (s.ok() && fua) s = co_await Flush();
      co_return s;
    }
    if (plan == Plan::kOwner) break;
    co_await RefreshRange(offset, buf.size(), /*for_write=*/true);
  }
  std::function<Task<Status>(BlockDevice*)> write = [offset, buf, fua](BlockDevice* d) {
    return d->Write(offset, buf, fua);
  };
  Status s = co_await ChangeOnOwner(offset, buf.size(), /*refresh=*/true, &write);
  co_return s;
}

Task<Status> SharedDevice::Port::WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap,
                                             bool fua) {
  std::function<Task<Status>(BlockDevice*)> zeroes = [=](BlockDevice* d) {
    return d->WriteZeroes(offset, length, may_unmap, fua);
  };
  Status s = co_await ChangeOnOwner(offset, length, /*refresh=*/false, &zeroes);
  co_return s;
}

Task<Status> SharedDevice::Port::Discard(uint64_t offset, uint64_t length) {
  std::function<Task<Status>(BlockDevice*)> discard = [=](BlockDevice* d) {
    return d->Discard(offset, length);
  };
  Status s = co_await ChangeOnOwner(offset, length, /*refresh=*/false, &discard);
  co_return s;
}

Task<Status> SharedDevice::Port::Flush() {
  ++stats_.owner_ops;
  SharedDevice* shared = shared_;
  std::function<Task<Status>()> flush = [shared] { return shared->FlushOnOwner(); };
  Status s = co_await OnOwner(&flush);
  co_return s;
}

}  // namespace qcow2kit
