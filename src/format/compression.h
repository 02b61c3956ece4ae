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
Status DecompressCluster(CompressionType type, std::span<const uint8_t> in,
                         std::span<uint8_t> out);

}  // namespace qcow2kit::format
