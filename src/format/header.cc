// Decoding and open-time validation of the qcow2 header (reference §1.1-1.4).

#include "format/header.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "format/endian.h"
#include "format/header_internal.h"
#include "format/hex.h"
#include "format/snapshot.h"

namespace qcow2kit::format {
namespace {

namespace in = internal;

// QEMU's limits on the tables the header points at.
constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;
constexpr uint64_t kMaxL1Entries = (32ull << 20) / 8;
// QEMU passes offsets around as int64_t, so no table may reach past INT64_MAX.
constexpr uint64_t kMaxFileOffset = INT64_MAX;
constexpr uint32_t kMinExtendedL2ClusterBits = 14;  // 32 subclusters of at least 512 bytes
constexpr uint32_t kMaxRefcountOrder = 6;
constexpr uint32_t kCryptAes = 1;

std::string Count(uint64_t n, const char* singular, const char* plural) {
  return std::to_string(n) + " " + (n == 1 ? singular : plural);
}

// Magic, version and cluster size: the fields everything else depends on. `b` has >= 24 bytes.
Status CheckIdentity(std::span<const uint8_t> b) {
  const uint32_t magic = LoadBE32(&b[in::kOffMagic]);
  if (magic != kMagic) {
    return Status::Invalid("Image is not in qcow2 format (magic " + Hex(magic) + ")");
  }
  const uint32_t version = LoadBE32(&b[in::kOffVersion]);
  if (version < 2 || version > 3) {
    return Status::Unsupported("Unsupported qcow2 version " + std::to_string(version));
  }
  const uint32_t cluster_bits = LoadBE32(&b[in::kOffClusterBits]);
  if (cluster_bits < kMinClusterBits || cluster_bits > kMaxClusterBits) {
    return Status::Unsupported("Unsupported cluster size: 2^" + std::to_string(cluster_bits));
  }
  return Status::Ok();
}

void DecodeV3Fields(const uint8_t* raw, Header* h) {
  h->incompatible_features = LoadBE64(raw + in::kOffIncompatible);
  h->compatible_features = LoadBE64(raw + in::kOffCompatible);
  h->autoclear_features = LoadBE64(raw + in::kOffAutoclear);
  h->refcount_order = LoadBE32(raw + in::kOffRefcountOrder);
  h->header_length = LoadBE32(raw + in::kOffHeaderLength);
  // An additional field is absent (zero) unless header_length covers it.
  if (h->header_length > in::kOffCompressionType) {
    h->compression_type = static_cast<CompressionType>(raw[in::kOffCompressionType]);
  }
}

Result<Header> DecodeFixedFields(std::span<const uint8_t> bytes) {
  // A file shorter than the header reads as zeros past its end, as it does in QEMU.
  uint8_t raw[in::kKnownHeaderLength] = {};
  std::memcpy(raw, bytes.data(), std::min<size_t>(bytes.size(), sizeof(raw)));
  QK_RETURN_IF_ERROR(CheckIdentity(raw));
  Header h;
  h.version = LoadBE32(raw + in::kOffVersion);
  h.backing_file_offset = LoadBE64(raw + in::kOffBackingFileOffset);
  h.backing_file_size = LoadBE32(raw + in::kOffBackingFileSize);
  h.cluster_bits = LoadBE32(raw + in::kOffClusterBits);
  h.size = LoadBE64(raw + in::kOffSize);
  h.crypt_method = LoadBE32(raw + in::kOffCryptMethod);
  h.l1_size = LoadBE32(raw + in::kOffL1Size);
  h.l1_table_offset = LoadBE64(raw + in::kOffL1TableOffset);
  h.refcount_table_offset = LoadBE64(raw + in::kOffRefcountTableOffset);
  h.refcount_table_clusters = LoadBE32(raw + in::kOffRefcountTableClusters);
  h.nb_snapshots = LoadBE32(raw + in::kOffNbSnapshots);
  h.snapshots_offset = LoadBE64(raw + in::kOffSnapshotsOffset);
  if (h.version == 2) {
    h.refcount_order = 4;
    h.header_length = kV2HeaderLength;
  } else {
    DecodeV3Fields(raw, &h);
  }
  return h;
}

// The part of `cluster0` that is cluster 0 of the file.
Result<std::span<const uint8_t>> ClusterZero(std::span<const uint8_t> cluster0, const Header& h,
                                             uint64_t file_size) {
  const uint64_t needed = std::min(h.cluster_size(), file_size);
  if (cluster0.size() < needed) {
    return Status::Invalid("ParseHeader needs the first " + std::to_string(needed) +
                           " bytes of the image, got " + std::to_string(cluster0.size()));
  }
  return cluster0.first(needed);
}

Status CheckHeaderLength(const Header& h, uint64_t available) {
  const std::string value = " (header_length " + std::to_string(h.header_length);
  if (h.version >= 3 && h.header_length < kV3MinHeaderLength) {
    return Status::Invalid("qcow2 header too short" + value + ", at least " +
                           std::to_string(kV3MinHeaderLength) + ")");
  }
  if (h.header_length > h.cluster_size()) {
    return Status::Invalid("qcow2 header exceeds cluster size" + value + ", cluster size " +
                           std::to_string(h.cluster_size()) + ")");
  }
  if (h.header_length > available) {
    return Status::Invalid("qcow2 header extends past end of file" + value + ", file size " +
                           std::to_string(available) + ")");
  }
  return Status::Ok();
}

// The backing file name lives in cluster 0 after the extensions.
Status CheckBackingName(const Header& h, uint64_t available) {
  const uint64_t offset = h.backing_file_offset;
  if (offset == 0) return Status::Ok();
  if (offset > h.cluster_size()) {
    return Status::Invalid("Invalid backing file offset " + Hex(offset) + " (beyond cluster 0)");
  }
  if (offset < h.header_length) {
    return Status::Invalid("Invalid backing file offset " + Hex(offset) +
                           " (inside the header, header_length " + std::to_string(h.header_length) +
                           ")");
  }
  const uint64_t size = h.backing_file_size;
  if (size > std::min<uint64_t>(kMaxBackingNameLength, h.cluster_size() - offset)) {
    return Status::Invalid("Backing file name too long (backing_file_size " + std::to_string(size) +
                           " at offset " + Hex(offset) + ")");
  }
  if (offset + size > available) {
    return Status::Invalid("Backing file name (offset " + Hex(offset) + ", " +
                           std::to_string(size) + " bytes) extends past end of file (" +
                           Hex(available) + " bytes)");
  }
  return Status::Ok();
}

// QEMU requires the incompatible bit to be set exactly when the type is not zlib.
Status CheckCompressionType(const Header& h) {
  const auto type = static_cast<uint32_t>(h.compression_type);
  if (type > static_cast<uint32_t>(CompressionType::kZstd)) {
    return Status::Unsupported("Unknown compression type: " + std::to_string(type));
  }
  const bool bit = h.incompatible_features & kIncompatCompression;
  if (h.compression_type == CompressionType::kZlib && bit) {
    return Status::Invalid(
        "Compression type incompatible feature bit must not be set for compression type zlib");
  }
  if (h.compression_type != CompressionType::kZlib && !bit) {
    return Status::Invalid(std::string("Compression type incompatible feature bit must be set "
                                       "for compression type ") +
                           CompressionTypeName(h.compression_type));
  }
  return Status::Ok();
}

uint64_t ExtensionAreaEnd(const Header& h, uint64_t available) {
  const uint64_t end = h.backing_file_offset ? h.backing_file_offset : h.cluster_size();
  return std::min(end, available);
}

// Refuses unknown incompatible bits, naming them from the image's own feature table.
Status CheckIncompatibleFeatures(const Header& h, const std::vector<RawExtension>& exts) {
  const uint64_t unknown = h.incompatible_features & ~kIncompatSupported;
  if (unknown == 0) return Status::Ok();
  std::vector<FeatureName> table;
  auto it = std::find_if(exts.begin(), exts.end(),
                         [](const RawExtension& e) { return e.type == kExtFeatureTable; });
  if (it != exts.end()) table = in::DecodeFeatureTable(it->data);
  return Status::Unsupported("Unsupported qcow2 feature(s): " +
                             DescribeFeatures(unknown, 0, table));
}

Status CheckGeometry(const Header& h) {
  if (h.extended_l2() && h.cluster_bits < kMinExtendedL2ClusterBits) {
    return Status::Unsupported(
        "Unsupported subcluster size: " + std::to_string(h.cluster_size() / 32) +
        " (extended L2 entries need clusters of at least 16 KiB)");
  }
  if (h.refcount_order > kMaxRefcountOrder) {
    return Status::Invalid(
        "Reference count entry width too large; may not exceed 64 bits "
        "(refcount_order " +
        std::to_string(h.refcount_order) + ")");
  }
  if (h.crypt_method > in::kCryptLuks) {
    return Status::Invalid("Unsupported encryption method: " + std::to_string(h.crypt_method));
  }
  return Status::Ok();
}

// A table the header points at: `count` units of `unit_bytes` at `offset`.
struct TableSpec {
  const char* name;
  const char* count_field;
  const char* unit;
  const char* units;
  uint64_t offset;
  uint64_t count;
  uint64_t unit_bytes;
  uint64_t max_count;
};

Status ValidateTable(const TableSpec& t, uint64_t cluster_size, uint64_t file_size) {
  const std::string name = t.name;
  if (t.count > t.max_count) {
    return Status::Invalid(name + " too large: " + t.count_field + " " + std::to_string(t.count) +
                           " exceeds " + std::to_string(t.max_count));
  }
  if (t.offset % cluster_size != 0) {
    return Status::Invalid(name + " offset " + Hex(t.offset) + " is not cluster aligned");
  }
  const std::string what =
      name + " (offset " + Hex(t.offset) + ", " + Count(t.count, t.unit, t.units) + ")";
  const uint64_t bytes = t.count * t.unit_bytes;  // bounded by max_count: no overflow
  if (t.offset > kMaxFileOffset - bytes) {
    return Status::Invalid(what + " lies beyond the largest file offset");
  }
  if (t.count > 0 && t.offset + bytes > file_size) {
    return Status::Invalid(what + " extends past end of file (" + Hex(file_size) + " bytes)");
  }
  return Status::Ok();
}

// The L1 table must map the whole virtual disk.
Status CheckL1Covers(const Header& h) {
  const uint32_t l2_bits = h.cluster_bits - (h.extended_l2() ? 4 : 3);
  const uint32_t shift = h.cluster_bits + l2_bits;
  const uint64_t needed = (h.size >> shift) + ((h.size & ((1ull << shift) - 1)) != 0);
  if (h.l1_size < needed) {
    return Status::Invalid("L1 table is too small: l1_size " + std::to_string(h.l1_size) +
                           ", virtual size " + std::to_string(h.size) + " needs " +
                           std::to_string(needed) + " entries");
  }
  return Status::Ok();
}

Status CheckTables(const Header& h, uint64_t file_size, bool for_check) {
  const uint64_t cs = h.cluster_size();
  if (h.refcount_table_clusters == 0) {
    return Status::Invalid(
        "Image does not contain a reference count table (refcount_table_clusters 0)");
  }
  QK_RETURN_IF_ERROR(ValidateTable(
      {"Refcount table", "refcount_table_clusters", "cluster", "clusters", h.refcount_table_offset,
       h.refcount_table_clusters, cs, kMaxRefcountTableBytes / cs},
      cs, file_size));
  // Entries are variable-sized; 40 bytes is the least each can take.
  if (!for_check) {
    QK_RETURN_IF_ERROR(
        ValidateTable({"Snapshot table", "nb_snapshots", "entry", "entries", h.snapshots_offset,
                       h.nb_snapshots, kSnapshotFixedSize, kMaxSnapshots},
                      cs, file_size));
  }
  QK_RETURN_IF_ERROR(ValidateTable(
      {"L1 table", "l1_size", "entry", "entries", h.l1_table_offset, h.l1_size, 8, kMaxL1Entries},
      cs, file_size));
  return CheckL1Covers(h);
}

Status CheckDataFile(const ParsedHeader& p) {
  if (p.data_file && !p.header.has_data_file()) {
    return Status::Invalid("data file name present but the external data file feature is not set");
  }
  if (p.header.data_file_raw() && !p.header.has_data_file()) {
    return Status::Invalid("data-file-raw requires a data file");
  }
  return Status::Ok();
}

// Encryption is refused last so that structural errors in an encrypted image are still named.
Status RefuseEncryption(const Header& h) {
  if (h.crypt_method == 0) return Status::Ok();
  return Status::Unsupported("encrypted images are not supported (crypt_method " +
                             std::to_string(h.crypt_method) +
                             (h.crypt_method == kCryptAes ? ": AES)" : ": LUKS)"));
}

const char* FeatureKind(uint8_t type) {
  switch (type) {
    case 0:
      return "incompatible";
    case 1:
      return "compatible";
    case 2:
      return "autoclear";
    default:
      return "unknown-type";
  }
}

}  // namespace

const char* CompressionTypeName(CompressionType t) {
  switch (t) {
    case CompressionType::kZlib:
      return "zlib";
    case CompressionType::kZstd:
      return "zstd";
  }
  return "unknown";
}

Result<uint64_t> HeaderReadSize(std::span<const uint8_t> first_bytes) {
  if (first_bytes.size() < in::kOffSize) {
    return Status::Invalid("Image is not in qcow2 format (only " +
                           std::to_string(first_bytes.size()) + " bytes)");
  }
  QK_RETURN_IF_ERROR(CheckIdentity(first_bytes));
  return uint64_t{1} << LoadBE32(&first_bytes[in::kOffClusterBits]);
}

std::string DescribeFeatures(uint64_t mask, uint8_t type, const std::vector<FeatureName>& table) {
  std::string out;
  auto append = [&out](const std::string& s) { out += (out.empty() ? "" : ", ") + s; };
  for (const FeatureName& f : table) {
    if (f.name.empty()) break;  // like QEMU, the table ends at the first unnamed entry
    if (f.type != type || f.bit >= 64 || !(mask & (1ull << f.bit))) continue;
    append(f.name);
    mask &= ~(1ull << f.bit);
  }
  if (mask != 0) {
    append(std::string("Unknown ") + FeatureKind(type) + " feature: " + HexDigits(mask));
  }
  return out;
}

const std::vector<FeatureName>& StandardFeatureNames() {
  static const std::vector<FeatureName> kNames = {
      {0, 0, "dirty bit"},            // incompatible
      {0, 1, "corrupt bit"},          //
      {0, 2, "external data file"},   //
      {0, 3, "compression type"},     //
      {0, 4, "extended L2 entries"},  //
      {1, 0, "lazy refcounts"},       // compatible
      {2, 0, "bitmaps"},              // autoclear
      {2, 1, "raw external data"},    //
  };
  return kNames;
}

Result<ParsedHeader> ParseHeader(std::span<const uint8_t> cluster0, uint64_t file_size,
                                 bool for_check) {
  QK_ASSIGN_OR_RETURN(Header h, DecodeFixedFields(cluster0));
  QK_ASSIGN_OR_RETURN(std::span<const uint8_t> bytes, ClusterZero(cluster0, h, file_size));
  QK_RETURN_IF_ERROR(CheckHeaderLength(h, bytes.size()));
  QK_RETURN_IF_ERROR(CheckBackingName(h, bytes.size()));
  QK_RETURN_IF_ERROR(CheckCompressionType(h));
  ParsedHeader p;
  // Walked before the feature check because the error for unknown features needs the names.
  const Status walked =
      in::WalkExtensions(bytes, h.header_length, ExtensionAreaEnd(h, bytes.size()), &p.extensions);
  QK_RETURN_IF_ERROR(CheckIncompatibleFeatures(h, p.extensions));
  QK_RETURN_IF_ERROR(CheckGeometry(h));
  QK_RETURN_IF_ERROR(CheckTables(h, file_size, for_check));
  QK_RETURN_IF_ERROR(walked);
  if (h.header_length > in::kKnownHeaderLength) {
    h.unknown_header_fields.assign(bytes.begin() + in::kKnownHeaderLength,
                                   bytes.begin() + h.header_length);
  }
  p.header = std::move(h);
  QK_RETURN_IF_ERROR(in::InterpretExtensions(file_size, &p));
  QK_RETURN_IF_ERROR(CheckDataFile(p));
  if (p.header.backing_file_offset != 0) {
    auto name = bytes.subspan(p.header.backing_file_offset, p.header.backing_file_size);
    p.backing_file = std::string(name.begin(), name.end());
  }
  QK_RETURN_IF_ERROR(RefuseEncryption(p.header));
  return p;
}

}  // namespace qcow2kit::format
