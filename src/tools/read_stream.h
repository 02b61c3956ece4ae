// Streaming reads of a guest range: fixed-size chunks, several in flight, delivered in order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>

#include "qcow2kit/block.h"
#include "qcow2kit/reactor.h"
#include "qcow2kit/status.h"

namespace qcow2kit::tools {

using ChunkSink = std::function<Status(uint64_t offset, std::span<const std::byte> data)>;

// Reads [offset, offset + length) of `dev` in chunks of `chunk` bytes, keeping up to `depth`
// reads in flight on `reactor`, and hands each chunk to `sink` in guest order. Stops at the
// first read or sink error (after letting the reads in flight finish). The range must lie
// inside the image.
Status StreamRead(Reactor& reactor, BlockDevice& dev, uint64_t offset, uint64_t length,
                  size_t chunk, unsigned depth, const ChunkSink& sink);

}  // namespace qcow2kit::tools
