#include "tools/read_stream.h"

#include <algorithm>
#include <vector>

#include "fmt/format.h"
#include "qcow2kit/buffer.h"

namespace qcow2kit::tools {
namespace {

struct Slot {
  AlignedBuffer buf;
  uint64_t offset = 0;
  size_t length = 0;
  bool done = false;
  Status status;
};

Task<void> ReadInto(BlockDevice* dev, Slot* slot) {
  slot->status = co_await dev->Read(slot->offset, slot->buf.span().first(slot->length));
  slot->done = true;
}

}  // namespace

Status StreamRead(Reactor& reactor, BlockDevice& dev, uint64_t offset, uint64_t length,
                  size_t chunk, unsigned depth, const ChunkSink& sink) {
  if (offset > dev.size() || length > dev.size() - offset) {
    return Status::Invalid(fmt::format("range {:#x}+{:#x} lies outside the image ({} bytes)",
                                       offset, length, dev.size()));
  }
  if (length == 0) return Status::Ok();
  chunk = std::max<size_t>(chunk, 1);
  depth = std::max(depth, 1u);
  const uint64_t chunks = (length + chunk - 1) / chunk;
  depth = static_cast<unsigned>(std::min<uint64_t>(depth, chunks));
  std::vector<Slot> slots(depth);
  for (Slot& s : slots) s.buf.Resize(static_cast<size_t>(std::min<uint64_t>(chunk, length)));

  Status result;
  uint64_t issued = 0;
  for (uint64_t delivered = 0; delivered < chunks && result.ok(); ++delivered) {
    // Keep the pipeline full: chunk k always uses slot k % depth.
    while (issued < chunks && issued - delivered < depth) {
      Slot& s = slots[issued % depth];
      s.offset = offset + issued * chunk;
      s.length = static_cast<size_t>(std::min<uint64_t>(chunk, offset + length - s.offset));
      s.done = false;
      reactor.Spawn(ReadInto(&dev, &s));
      ++issued;
    }
    Slot& s = slots[delivered % depth];
    while (!s.done) {
      if (!reactor.RunOnce(true) && !s.done) {
        return Status::Error(EDEADLK, "internal error: read never completed");
      }
    }
    result = s.status;
    if (result.ok()) result = sink(s.offset, std::span<const std::byte>(s.buf.data(), s.length));
  }
  // Slots live in this frame: let every read still in flight finish before they go away.
  reactor.RunUntilIdle();
  return result;
}

}  // namespace qcow2kit::tools
