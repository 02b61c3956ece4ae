#include "export/nbd/session.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

namespace qcow2kit::nbd {
namespace {

constexpr size_t kMaxInFlight = 128;          // requests per connection
constexpr uint64_t kByteBudget = 64ull << 20;  // payload bytes per connection
constexpr size_t kKeepBuffer = 1 << 20;        // slot buffers up to this size are reused
constexpr uint64_t kMinHole = 4096;            // smaller zero runs are sent as data
constexpr size_t kMaxHoles = 16;               // more are sent as data too
constexpr uint64_t kMaxStatusLength = 1ull << 30;
constexpr size_t kMaxDescriptors = 4096;

uint16_t AllowedFlags(uint16_t type) {
  switch (type) {
    case kCmdRead:
      return kCmdFlagFua | kCmdFlagDf;
    case kCmdWrite:
    case kCmdFlush:
    case kCmdTrim:
    case kCmdCache:
      return kCmdFlagFua;
    case kCmdWriteZeroes:
      return kCmdFlagFua | kCmdFlagNoHole | kCmdFlagFastZero;
    case kCmdBlockStatus:
      return kCmdFlagFua | kCmdFlagReqOne;
    default:
      return 0;
  }
}

}  // namespace

// One request and its reply. Buffers keep their capacity from request to request.
struct Session::Slot {
  Request req;
  uint64_t charged = 0;  // payload bytes counted in bytes_held_ for this request
  AlignedBuffer buf;  // WRITE payload or READ data
  std::vector<std::byte> head;  // reply bytes that are not data: headers, descriptors
  struct Segment {
    bool from_head;
    size_t offset;
    size_t length;
  };
  std::vector<Segment> segments;  // the reply, in order
  ZeroRuns zeros;
  std::vector<BlockStatusExtent> extents;

  std::span<std::byte> Data(size_t n) {
    if (buf.size() < n) buf.Resize(n);
    return buf.span().first(n);
  }
  std::byte* AddHead(size_t n) {
    size_t at = head.size();
    head.resize(at + n);
    if (!segments.empty() && segments.back().from_head &&
        segments.back().offset + segments.back().length == at) {
      segments.back().length += n;
    } else {
      segments.push_back({true, at, n});
    }
    return head.data() + at;
  }
  void AddData(size_t offset, size_t n) { segments.push_back({false, offset, n}); }
  void ClearReply() {
    head.clear();
    segments.clear();
  }
  void SimpleReply(uint32_t error) {
    std::byte* p = AddHead(kSimpleReplySize);
    Store64(Store32(Store32(p, kSimpleReplyMagic), error), req.handle);
  }
  // Returns where the chunk's payload goes.
  std::byte* Chunk(uint16_t flags, uint16_t type, uint32_t payload_length, size_t inline_bytes) {
    std::byte* p = AddHead(kChunkHeaderSize + inline_bytes);
    p = Store16(Store32(p, kStructuredReplyMagic), flags);
    p = Store64(Store16(p, type), req.handle);
    return Store32(p, payload_length);
  }
};

Session::Session(Transport* transport, InputBuffer* in, const Negotiated& negotiated)
    : transport_(transport),
      in_(in),
      n_(negotiated),
      device_(negotiated.exp->device) {}

Session::~Session() = default;

void Session::Stop() {
  stopping_ = true;
  transport_->CancelRecv();
  reader_wakeup_.Notify();
}

Session::Slot* Session::TakeSlot() {
  if (free_.empty()) {
    slots_.push_back(std::make_unique<Slot>());
    free_.push_back(slots_.back().get());
  }
  Slot* s = free_.back();
  free_.pop_back();
  ++in_flight_;
  return s;
}

void Session::ReleaseSlot(Slot* slot) {
  bytes_held_ -= slot->charged;
  slot->charged = 0;
  if (slot->buf.size() > kKeepBuffer) slot->buf = AlignedBuffer();
  slot->ClearReply();
  free_.push_back(slot);
  --in_flight_;
}

Task<void> Session::Run() {
  Reactor::Current()->Spawn(Sender());
  co_await Reader();
  reader_done_ = true;
  while (in_flight_ > 0) co_await run_wakeup_.Wait();
  sender_wakeup_.Notify();  // it ends once nothing is left to send
  while (!sender_done_) co_await run_wakeup_.Wait();
}

Task<void> Session::Reader() {
  while (!stopping_ && !dead_) {
    Status s = co_await in_->Need(kRequestSize);
    if (!s.ok()) co_return;  // end of stream, cancelled, or a dead socket
    Request r = DecodeRequest(in_->data());
    in_->Consume(kRequestSize);
    if (r.magic != kRequestMagic) co_return;  // out of sync: nothing to answer safely
    if (r.type == kCmdDisc) co_return;
    if (r.type == kCmdWrite && r.length > kMaxPayload) co_return;  // cannot skip it safely
    uint64_t bytes = r.type == kCmdRead || r.type == kCmdWrite ? r.length : 0;
    if (r.type == kCmdRead && r.length > kMaxPayload) bytes = 0;  // refused, never buffered
    while (!dead_ && (in_flight_ >= kMaxInFlight ||
                      (in_flight_ > 0 && bytes_held_ + bytes > kByteBudget))) {
      co_await reader_wakeup_.Wait();
    }
    if (dead_) co_return;
    Slot* slot = TakeSlot();
    slot->req = r;
    slot->charged = bytes;
    bytes_held_ += bytes;
    if (r.type == kCmdWrite) {
      s = co_await in_->ReadInto(slot->Data(r.length));
      if (!s.ok()) {  // the client left mid-payload: this write never happens
        ReleaseSlot(slot);
        co_return;
      }
    }
    Reactor::Current()->Spawn(Handle(slot));
  }
}

Task<void> Session::Sender() {
  for (;;) {
    while (ready_.empty() && !(reader_done_ && in_flight_ == 0)) co_await sender_wakeup_.Wait();
    if (ready_.empty()) break;
    sending_.swap(ready_);
    iov_.clear();
    for (Slot* s : sending_) {
      for (const Slot::Segment& g : s->segments) {
        std::byte* base = g.from_head ? s->head.data() : s->buf.data();
        iov_.push_back({base + g.offset, g.length});
      }
    }
    if (!dead_) {
      Status st = co_await transport_->SendAll(iov_);
      if (!st.ok()) {
        dead_ = true;  // the client is gone: stop reading, drop the remaining replies
        transport_->CancelRecv();
      }
    }
    for (Slot* s : sending_) ReleaseSlot(s);
    sending_.clear();
    reader_wakeup_.Notify();
    run_wakeup_.Notify();
  }
  sender_done_ = true;
  run_wakeup_.Notify();
}

Task<void> Session::Handle(Slot* slot) {
  Status s = co_await Execute(slot);
  if (!s.ok()) {
    slot->ClearReply();
    uint32_t error = WireError(s.code());
    if (n_.structured_replies) {
      const std::string& msg = s.message();
      uint16_t len = static_cast<uint16_t>(std::min<size_t>(msg.size(), 4096));
      std::byte* p = slot->Chunk(kReplyFlagDone, kChunkError, 6 + len, 6 + len);
      p = Store16(Store32(p, error), len);
      std::memcpy(p, msg.data(), len);
    } else {
      slot->SimpleReply(error);
    }
  }
  ready_.push_back(slot);
  sender_wakeup_.Notify();
}

Status Session::Validate(const Request& r) const {
  const Export& e = *n_.exp;
  if (r.type > kCmdBlockStatus || r.type == kCmdDisc) {
    return Status::Invalid("unknown command " + std::to_string(r.type));
  }
  if (r.flags & ~AllowedFlags(r.type)) {
    return Status::Invalid("unsupported flags " + std::to_string(r.flags) + " for command " +
                           std::to_string(r.type));
  }
  if ((r.flags & kCmdFlagDf) && !n_.structured_replies) {
    return Status::Invalid("DF flag needs structured replies");
  }
  const bool writes = r.type == kCmdWrite || r.type == kCmdTrim || r.type == kCmdWriteZeroes;
  if (writes && e.read_only) return Status::Error(EPERM, "export is read-only");
  if (r.type == kCmdFlush) {
    if (r.offset != 0 || r.length != 0) return Status::Invalid("flush with offset or length");
    return Status::Ok();
  }
  if (r.offset > e.size() || r.length > e.size() - r.offset) {
    if (r.type == kCmdWrite || r.type == kCmdWriteZeroes) {
      return Status::Error(ENOSPC, "request past the end of the export");
    }
    return Status::Invalid("request past the end of the export");
  }
  if ((r.type == kCmdRead || r.type == kCmdCache) && r.length > kMaxPayload) {
    return Status::Invalid("request larger than the maximum block size");
  }
  if (r.type == kCmdBlockStatus) {
    if (!n_.context_allocation && !n_.context_depth) {
      return Status::Invalid("no metadata context selected");
    }
    if (r.length == 0) return Status::Invalid("block status needs a non-zero length");
  }
  return Status::Ok();
}

Task<Status> Session::Execute(Slot* slot) {
  const Request& r = slot->req;
  QK_CO_RETURN_IF_ERROR(Validate(r));
  const Export& e = *n_.exp;
  const bool fua = r.flags & kCmdFlagFua;
  switch (r.type) {
    case kCmdRead:
      co_return co_await DoRead(slot);
    case kCmdWrite:
      QK_CO_RETURN_IF_ERROR(co_await DoWrite(slot));
      break;
    case kCmdFlush:
      QK_CO_RETURN_IF_ERROR(co_await device_->Flush());
      break;
    case kCmdTrim:
      if (e.discard == DiscardMode::kUnmap && r.length > 0) {
        QK_CO_RETURN_IF_ERROR(co_await device_->Discard(r.offset, r.length));
      }
      if (fua) QK_CO_RETURN_IF_ERROR(co_await device_->Flush());
      break;
    case kCmdWriteZeroes:
      QK_CO_RETURN_IF_ERROR(co_await DoWriteZeroes(slot));
      break;
    case kCmdCache:
      // Advisory: walking the mapping brings the L2 tables of the range into the cache.
      if (r.length > 0) {
        slot->extents.clear();
        QK_CO_RETURN_IF_ERROR(co_await device_->BlockStatus(r.offset, r.length, &slot->extents,
                                                            /*probe_host_holes=*/false));
      }
      break;
    case kCmdBlockStatus:
      co_return co_await DoBlockStatus(slot);
  }
  slot->SimpleReply(0);
  co_return Status::Ok();
}

Task<Status> Session::DoRead(Slot* slot) {
  const Request& r = slot->req;
  std::span<std::byte> data = slot->Data(r.length);
  const bool chunks = n_.structured_replies;
  if (!chunks || (r.flags & kCmdFlagDf) || r.length == 0) {
    QK_CO_RETURN_IF_ERROR(co_await device_->Read(r.offset, data));
    if (!chunks) {
      slot->SimpleReply(0);
    } else if (r.length == 0) {
      slot->Chunk(kReplyFlagDone, kChunkNone, 0, 0);
      co_return Status::Ok();
    } else {
      Store64(slot->Chunk(kReplyFlagDone, kChunkOffsetData, 8 + r.length, 8), r.offset);
    }
    slot->AddData(0, r.length);
    co_return Status::Ok();
  }
  ZeroRuns& zeros = slot->zeros;
  zeros.clear();
  QK_CO_RETURN_IF_ERROR(co_await device_->ReadSparse(r.offset, data, &zeros));
  // Keep the holes worth a chunk; fill the others in.
  size_t kept = 0;
  for (auto [off, len] : zeros) {
    if (len >= kMinHole && kept < kMaxHoles) {
      zeros[kept++] = {off, len};
    } else {
      std::memset(data.data() + (off - r.offset), 0, len);
    }
  }
  zeros.resize(kept);
  uint64_t pos = r.offset;
  const uint64_t end = r.offset + r.length;
  auto data_chunk = [&](uint64_t to) {
    uint32_t n = static_cast<uint32_t>(to - pos);
    uint16_t flags = to == end ? kReplyFlagDone : 0;
    Store64(slot->Chunk(flags, kChunkOffsetData, 8 + n, 8), pos);
    slot->AddData(pos - r.offset, n);
  };
  for (auto [off, len] : zeros) {
    if (off > pos) data_chunk(off);
    uint16_t flags = off + len == end ? kReplyFlagDone : 0;
    Store32(Store64(slot->Chunk(flags, kChunkOffsetHole, 12, 12), off),
            static_cast<uint32_t>(len));
    pos = off + len;
  }
  if (pos < end) data_chunk(end);
  co_return Status::Ok();
}

Task<Status> Session::DoWrite(Slot* slot) {
  const Request& r = slot->req;
  const Export& e = *n_.exp;
  const bool fua = r.flags & kCmdFlagFua;
  std::span<const std::byte> data = slot->buf.span().first(r.length);
  if (r.length == 0) co_return Status::Ok();
  if (e.detect_zeroes != DetectZeroes::kOff && IsAllZero(data)) {
    bool unmap = e.detect_zeroes == DetectZeroes::kUnmap && e.discard == DiscardMode::kUnmap;
    co_return co_await device_->WriteZeroes(r.offset, r.length, unmap, fua);
  }
  co_return co_await device_->Write(r.offset, data, fua);
}

Task<Status> Session::DoWriteZeroes(Slot* slot) {
  const Request& r = slot->req;
  if (r.length == 0) co_return Status::Ok();
  const bool unmap = !(r.flags & kCmdFlagNoHole) && n_.exp->discard == DiscardMode::kUnmap;
  co_return co_await device_->WriteZeroes(r.offset, r.length, unmap, r.flags & kCmdFlagFua,
                                          r.flags & kCmdFlagFastZero);
}

Task<Status> Session::DoBlockStatus(Slot* slot) {
  const Request& r = slot->req;
  slot->extents.clear();
  uint64_t length = std::min<uint64_t>(r.length, kMaxStatusLength);
  QK_CO_RETURN_IF_ERROR(co_await device_->BlockStatus(r.offset, length, &slot->extents));
  const bool one = r.flags & kCmdFlagReqOne;
  auto emit = [&](uint32_t context, bool last, auto value_of) {
    // Descriptors: adjacent extents with the same value merged.
    size_t at = slot->head.size();
    std::byte* p = slot->Chunk(last ? kReplyFlagDone : 0, kChunkBlockStatus, 0, 4);
    Store32(p, context);
    size_t count = 0;
    uint32_t cur_value = 0;
    uint64_t cur_length = 0;
    auto flush = [&] {
      std::byte* d = slot->AddHead(8);
      Store32(Store32(d, static_cast<uint32_t>(cur_length)), cur_value);
      ++count;
    };
    for (const BlockStatusExtent& x : slot->extents) {
      uint32_t v = value_of(x);
      if (cur_length > 0 && v == cur_value && cur_length + x.length <= UINT32_MAX) {
        cur_length += x.length;
        continue;
      }
      if (cur_length > 0) {
        flush();
        if (one || count == kMaxDescriptors) break;
      }
      cur_value = v;
      cur_length = x.length;
    }
    if (cur_length > 0 && count < (one ? 1u : kMaxDescriptors)) flush();
    // Patch the chunk's payload length now that the descriptors are known.
    Store32(slot->head.data() + at + 16, static_cast<uint32_t>(4 + 8 * count));
  };
  auto allocation = [](const BlockStatusExtent& x) {
    return (x.data ? 0u : kStateHole) | (x.zero ? kStateZero : 0u);
  };
  auto depth = [](const BlockStatusExtent& x) { return x.present ? x.depth + 1 : 0u; };
  if (n_.context_allocation) emit(kContextBaseAllocation, !n_.context_depth, allocation);
  if (n_.context_depth) emit(kContextAllocationDepth, true, depth);
  co_return Status::Ok();
}

}  // namespace qcow2kit::nbd
