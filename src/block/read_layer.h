// ReadLayer: reads guest bytes of one layer of a chain (and, for unallocated ranges, of the
// layers below). Shared by BlockDevice reads and the copy-on-write of allocating writes.
#pragma once

#include <cstdint>
#include <span>

#include "qcow2kit/block.h"
#include "qcow2kit/driver.h"

namespace qcow2kit {

// Reads [offset, offset + buf.size()) of `layer`; bytes past its end read as zeros. With
// `zeros`, ranges known to read as zeros without I/O are appended to it (as guest ranges)
// and left unfilled in `buf`.
Task<Status> ReadLayer(FormatDriver* layer, uint64_t offset, std::span<std::byte> buf,
                       ZeroRuns* zeros = nullptr);

}  // namespace qcow2kit
