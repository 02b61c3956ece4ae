// The qcow2 header (cluster 0): fixed fields, feature bits, header extensions and the backing
// file name. Pure decode / encode / validate; no I/O.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "qcow2kit/status.h"

namespace qcow2kit::format {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kV2HeaderLength = 72;
inline constexpr uint32_t kV3MinHeaderLength = 104;
inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 21;
inline constexpr uint32_t kMaxBackingNameLength = 1023;

// Feature bits.
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompression = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kIncompatSupported = 0x1f;
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
inline constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;
inline constexpr uint64_t kAutoclearSupported = 0x3;

// Header extension types.
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xE2792ACA;
inline constexpr uint32_t kExtFeatureTable = 0x6803F857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtCrypto = 0x0537BE77;
inline constexpr uint32_t kExtDataFile = 0x44415441;

enum class CompressionType : uint8_t { kZlib = 0, kZstd = 1 };
const char* CompressionTypeName(CompressionType t);  // "zlib" / "zstd"

// The fixed part of the header (v2: 72 bytes, v3: header_length >= 104).
struct Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;  // virtual size in bytes
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;   // v2 implies 4
  uint32_t header_length = 112;  // v2 implies 72
  CompressionType compression_type = CompressionType::kZlib;
  // Bytes between the end of the fields we know (112) and header_length: kept verbatim.
  std::vector<uint8_t> unknown_header_fields;

  uint64_t cluster_size() const { return 1ull << cluster_bits; }
  uint32_t refcount_bits() const { return 1u << refcount_order; }
  bool extended_l2() const { return incompatible_features & kIncompatExtendedL2; }
  bool has_data_file() const { return incompatible_features & kIncompatDataFile; }
  bool dirty() const { return incompatible_features & kIncompatDirty; }
  bool corrupt() const { return incompatible_features & kIncompatCorrupt; }
  bool lazy_refcounts() const { return compatible_features & kCompatLazyRefcounts; }
  bool data_file_raw() const { return autoclear_features & kAutoclearDataFileRaw; }

  friend bool operator==(const Header&, const Header&) = default;
};

struct FeatureName {
  uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit = 0;
  std::string name;

  friend bool operator==(const FeatureName&, const FeatureName&) = default;
};

struct BitmapsExtension {
  uint32_t nb_bitmaps = 0;
  uint64_t directory_size = 0;
  uint64_t directory_offset = 0;

  friend bool operator==(const BitmapsExtension&, const BitmapsExtension&) = default;
};

struct CryptoExtension {
  uint64_t offset = 0;
  uint64_t length = 0;

  friend bool operator==(const CryptoExtension&, const CryptoExtension&) = default;
};

// One extension exactly as found (for `dump --extensions` and for preserving unknown ones).
struct RawExtension {
  uint32_t type = 0;
  uint64_t offset = 0;  // where its 8-byte type/length header starts in the file
  std::vector<uint8_t> data;

  friend bool operator==(const RawExtension&, const RawExtension&) = default;
};

// Everything cluster 0 says.
struct ParsedHeader {
  Header header;
  std::vector<RawExtension> extensions;          // every extension, in file order, no end marker
  std::optional<std::string> backing_file;       // name as stored
  std::optional<std::string> backing_format;     // from kExtBackingFormat
  std::optional<std::string> data_file;          // from kExtDataFile
  std::vector<FeatureName> feature_names;        // from kExtFeatureTable
  std::optional<BitmapsExtension> bitmaps;       // only if the autoclear bit is also set
  bool bitmaps_inconsistent = false;             // extension present without the autoclear bit
  std::optional<CryptoExtension> crypto;
  std::vector<RawExtension> unknown_extensions;  // types we do not know, kept for rewrites

  friend bool operator==(const ParsedHeader&, const ParsedHeader&) = default;
};

// Decodes and validates the header in `cluster0` (the first min(cluster size, file size)
// bytes of the file; at least 104 bytes unless the file is shorter). `file_size` is the length
// of the image file. Performs the open-time checks of QEMU (reference §1.4) that need no
// further I/O, with messages naming the field and value, e.g. "Unsupported cluster size:
// 2^22", "L1 table offset 0x10200 is not cluster aligned", "Unsupported qcow2 feature(s):
// extended L2 entries" (unknown incompatible bits are named from the feature-name table, else
// "Unknown incompatible feature: 20" in hex as QEMU prints it).
// `for_check`: the snapshot table pointer is not validated; the check reads, reports and
// repairs the table itself (QEMU's BDRV_O_CHECK).
Result<ParsedHeader> ParseHeader(std::span<const uint8_t> cluster0, uint64_t file_size,
                                 bool for_check = false);

// How many bytes of the file ParseHeader needs: reads the cluster size from the first 24
// bytes (must be at least 24 long). Errors for bad magic / version / cluster_bits.
Result<uint64_t> HeaderReadSize(std::span<const uint8_t> first_bytes);

// Names of the set bits in `mask` of feature `type`, using `table` where it names them and
// "Unknown incompatible feature: <hex>" style text otherwise, joined with ", ".
std::string DescribeFeatures(uint64_t mask, uint8_t type, const std::vector<FeatureName>& table);

// The eight names QEMU writes in its feature table (incompatible 0-4, compatible 0, autoclear
// 0-1). EncodeHeader writes exactly these; callers can pass them to DescribeFeatures when an
// image has no table of its own.
const std::vector<FeatureName>& StandardFeatureNames();

// Encodes cluster 0 in QEMU's layout (fixed header, unknown fields, backing format, data file,
// crypto, feature table (v3 and cluster > 4 KiB), bitmaps, unknown extensions, end marker,
// backing name). Fails if it does not fit in one cluster. Used by the write path.
Result<std::vector<uint8_t>> EncodeHeader(const ParsedHeader& h);

}  // namespace qcow2kit::format
