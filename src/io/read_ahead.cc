#include "io/read_ahead.h"

#include <algorithm>

#include "io/wakeup.h"
#include "qcow2kit/buffer.h"
#include "qcow2kit/reactor.h"

namespace qcow2kit {

struct ReadAhead::State {
  struct Slot {
    AlignedBuffer buf;
    uint64_t length = 0;
    bool done = false;
    Status status;
    Wakeup wake;
  };
  File* file;
  ReadAhead::RangeSource next;
  bool exhausted = false;
  std::vector<Slot> slots;
  size_t issued = 0;
  size_t delivered = 0;
};

namespace {

Task<void> ReadSlot(std::shared_ptr<ReadAhead::State> st, size_t slot, ByteRange r) {
  auto& s = st->slots[slot];
  std::span<std::byte> dst(s.buf.data(), static_cast<size_t>(r.length));
  Status status = co_await st->file->ReadZeroPadded(dst, r.offset);
  s.status = std::move(status);
  s.done = true;
  s.wake.Notify();
}

}  // namespace

ReadAhead::ReadAhead(File* file, RangeSource next, unsigned depth)
    : state_(std::make_shared<State>()) {
  state_->file = file;
  state_->next = std::move(next);
  state_->slots.resize(std::max(1u, depth));
}

ReadAhead::~ReadAhead() = default;

Task<Result<std::span<uint8_t>>> ReadAhead::Next() {
  State& st = *state_;
  // The slot of the range delivered last time is free again: refill every free slot.
  const size_t depth = st.slots.size();
  while (!st.exhausted && st.issued - st.delivered < depth) {
    ByteRange r;
    if (!st.next(&r)) {
      st.exhausted = true;
      break;
    }
    auto& s = st.slots[st.issued % depth];
    if (s.buf.size() < r.length) s.buf.Resize(static_cast<size_t>(r.length));
    s.length = r.length;
    s.done = false;
    Reactor::Current()->Spawn(ReadSlot(state_, st.issued % depth, r));
    ++st.issued;
  }
  if (st.delivered == st.issued) co_return Status::Invalid("ReadAhead: no range left to read");
  auto& s = st.slots[st.delivered % depth];
  while (!s.done) co_await s.wake.Wait();
  ++st.delivered;
  if (!s.status.ok()) co_return s.status;
  co_return std::span<uint8_t>(reinterpret_cast<uint8_t*>(s.buf.data()),
                               static_cast<size_t>(s.length));
}

}  // namespace qcow2kit
