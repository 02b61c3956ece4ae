// Shared by header.cc, header_extensions.cc and header_encode.cc: the byte layout of the
// fixed header fields and the extension helpers. Not part of the format layer's API.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "format/header.h"
#include "qcow2kit/status.h"

namespace qcow2kit::format::internal {

// Byte offsets of the fixed header fields (reference §1.1).
inline constexpr size_t kOffMagic = 0;
inline constexpr size_t kOffVersion = 4;
inline constexpr size_t kOffBackingFileOffset = 8;
inline constexpr size_t kOffBackingFileSize = 16;
inline constexpr size_t kOffClusterBits = 20;
inline constexpr size_t kOffSize = 24;
inline constexpr size_t kOffCryptMethod = 32;
inline constexpr size_t kOffL1Size = 36;
inline constexpr size_t kOffL1TableOffset = 40;
inline constexpr size_t kOffRefcountTableOffset = 48;
inline constexpr size_t kOffRefcountTableClusters = 56;
inline constexpr size_t kOffNbSnapshots = 60;
inline constexpr size_t kOffSnapshotsOffset = 64;
inline constexpr size_t kOffIncompatible = 72;
inline constexpr size_t kOffCompatible = 80;
inline constexpr size_t kOffAutoclear = 88;
inline constexpr size_t kOffRefcountOrder = 96;
inline constexpr size_t kOffHeaderLength = 100;
inline constexpr size_t kOffCompressionType = 104;
// Everything we know ends here; QEMU writes header_length = 112 (7 bytes of padding).
inline constexpr uint32_t kKnownHeaderLength = 112;

inline constexpr size_t kFeatureEntrySize = 48;
inline constexpr size_t kFeatureNameSize = 46;
inline constexpr size_t kBitmapsExtSize = 24;
inline constexpr size_t kCryptoExtSize = 16;
// QEMU keeps the backing format in a 16-byte C string.
inline constexpr size_t kMaxBackingFormatLength = 15;
inline constexpr uint32_t kMaxBitmapsInExt = 65535;
inline constexpr uint64_t kMaxBitmapDirectorySize = 64ull << 20;
inline constexpr uint32_t kCryptLuks = 2;

inline uint64_t AlignUp8(uint64_t v) {
  return (v + 7) & ~uint64_t{7};
}

// Walks the extensions in bytes [start, end) of `cluster0` (end <= cluster0.size()) until the
// end marker, appending each to `out` in file order. On error `out` keeps the ones before it.
Status WalkExtensions(std::span<const uint8_t> cluster0, uint64_t start, uint64_t end,
                      std::vector<RawExtension>* out);

// The whole 48-byte entries of a feature name table.
std::vector<FeatureName> DecodeFeatureTable(std::span<const uint8_t> data);

// Interprets p->extensions (known types, duplicates, lengths) against p->header and fills the
// typed members of `p`.
Status InterpretExtensions(uint64_t file_size, ParsedHeader* p);

}  // namespace qcow2kit::format::internal
