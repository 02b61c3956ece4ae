// Compressed cluster payloads: type 0 is raw DEFLATE (RFC 1951, no zlib header, QEMU writes
// with a 4 KiB window), type 1 is one or more bare zstd frames.
#pragma once

#include <cstdint>
#include <span>

#include "format/header.h"
#include "qcow2kit/status.h"

namespace qcow2kit::format {

// Decodes `in` (the stream plus possibly trailing bytes of the next one) into exactly
// out.size() bytes (one cluster). Producing less, or (zstd) more, is a corruption error.
Status DecompressCluster(CompressionType type, std::span<const uint8_t> in, std::span<uint8_t> out);

// Compresses one cluster (`in`, the whole cluster) as QEMU does: zlib as raw DEFLATE with a
// 4 KiB window at the default level (QEMU inflates with that window, so a larger one would
// make images it cannot read), zstd as one frame at the default level. Returns the stream's
// length in `out`, or 0 if it would not fit in out.size() bytes (callers pass cluster - 1
// bytes: a cluster that does not shrink is stored plain). Thread safe.
Result<size_t> CompressCluster(CompressionType type, std::span<const uint8_t> in,
                               std::span<uint8_t> out);

}  // namespace qcow2kit::format
