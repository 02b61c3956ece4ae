// Naming a read error as qemu-img does: its block status runs stop at each compressed
// cluster, so its reads, and the offsets its errors name, start at the failing cluster.
#pragma once

#include <cstdint>
#include <span>
#include <utility>

#include "qcow2kit/block.h"

namespace qcow2kit::tools {

// A read of [offset, offset + buf.size()) failed with `error`: reads it again a cluster at a
// time and returns the offset of the first piece that fails, with its error. If every piece
// reads now, `offset` and `error`.
Task<std::pair<uint64_t, Status>> FirstUnreadable(BlockDevice& dev, uint64_t offset,
                                                  std::span<std::byte> buf, Status error);

}  // namespace qcow2kit::tools
