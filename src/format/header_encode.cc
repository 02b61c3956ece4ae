// Encoding of cluster 0 in the layout QEMU's qcow2_update_header writes, so that an image we
// rewrite is byte-identical to one QEMU would have written (reference §1.3).

#include <cstring>
#include <string>

#include "format/endian.h"
#include "format/header.h"
#include "format/header_internal.h"

namespace qcow2kit::format {
namespace {

namespace in = internal;

// Appends to a zero-filled cluster, remembering how much room was needed if it overflows.
class ClusterWriter {
 public:
  explicit ClusterWriter(uint64_t cluster_size) : buf_(cluster_size) {}

  uint64_t pos() const { return pos_; }
  bool overflowed() const { return pos_ > buf_.size(); }
  uint8_t* data() { return buf_.data(); }
  std::vector<uint8_t> Take() && { return std::move(buf_); }

  void Bytes(const void* p, size_t n) {
    if (n <= buf_.size() && pos_ <= buf_.size() - n && n > 0) std::memcpy(&buf_[pos_], p, n);
    pos_ += n;
  }
  void Skip(size_t n) { pos_ += n; }
  // type, length, data, zero padding to 8 bytes.
  void Extension(uint32_t type, const void* data, size_t length) {
    uint8_t head[8];
    StoreBE32(head, type);
    StoreBE32(head + 4, static_cast<uint32_t>(length));
    Bytes(head, sizeof(head));
    Bytes(data, length);
    Skip(in::AlignUp8(length) - length);
  }
  void Extension(uint32_t type, const std::string& s) { Extension(type, s.data(), s.size()); }
  void Extension(uint32_t type, const std::vector<uint8_t>& v) {
    Extension(type, v.data(), v.size());
  }

 private:
  std::vector<uint8_t> buf_;
  uint64_t pos_ = 0;
};

// Refuses what the header cannot represent, so that ParseHeader(EncodeHeader(x)) == x.
Status CheckEncodable(const ParsedHeader& p) {
  const Header& h = p.header;
  if (h.version != 2 && h.version != 3) {
    return Status::Invalid("cannot encode qcow2 version " + std::to_string(h.version));
  }
  if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits) {
    return Status::Invalid("cannot encode cluster_bits " + std::to_string(h.cluster_bits));
  }
  const bool v3_only = h.incompatible_features || h.compatible_features || h.autoclear_features ||
                       h.refcount_order != 4 || h.compression_type != CompressionType::kZlib ||
                       !h.unknown_header_fields.empty();
  if (h.version == 2 && v3_only) {
    return Status::Invalid(
        "a version 2 header cannot store feature bits, refcount_order, "
        "compression type or additional header fields");
  }
  if ((h.compression_type != CompressionType::kZlib) !=
      bool(h.incompatible_features & kIncompatCompression)) {
    return Status::Invalid(
        "the compression type feature bit must be set exactly when the "
        "compression type is not zlib");
  }
  if (p.data_file && !h.has_data_file()) {
    return Status::Invalid("a data file name needs the external data file feature bit");
  }
  if (p.backing_file && p.backing_file->size() > kMaxBackingNameLength) {
    return Status::Invalid("backing file name longer than " +
                           std::to_string(kMaxBackingNameLength) + " bytes");
  }
  if (p.backing_format && p.backing_format->size() > in::kMaxBackingFormatLength) {
    return Status::Invalid("backing format name longer than " +
                           std::to_string(in::kMaxBackingFormatLength) + " bytes");
  }
  return Status::Ok();
}

void WriteFixedFields(const Header& h, ClusterWriter* w) {
  uint8_t raw[in::kKnownHeaderLength] = {};
  StoreBE32(raw + in::kOffMagic, kMagic);
  StoreBE32(raw + in::kOffVersion, h.version);
  // backing_file_offset / size are filled in once the name's position is known.
  StoreBE32(raw + in::kOffClusterBits, h.cluster_bits);
  StoreBE64(raw + in::kOffSize, h.size);
  StoreBE32(raw + in::kOffCryptMethod, h.crypt_method);
  StoreBE32(raw + in::kOffL1Size, h.l1_size);
  StoreBE64(raw + in::kOffL1TableOffset, h.l1_table_offset);
  StoreBE64(raw + in::kOffRefcountTableOffset, h.refcount_table_offset);
  StoreBE32(raw + in::kOffRefcountTableClusters, h.refcount_table_clusters);
  StoreBE32(raw + in::kOffNbSnapshots, h.nb_snapshots);
  StoreBE64(raw + in::kOffSnapshotsOffset, h.snapshots_offset);
  if (h.version == 2) {
    w->Bytes(raw, kV2HeaderLength);
    return;
  }
  StoreBE64(raw + in::kOffIncompatible, h.incompatible_features);
  StoreBE64(raw + in::kOffCompatible, h.compatible_features);
  StoreBE64(raw + in::kOffAutoclear, h.autoclear_features);
  StoreBE32(raw + in::kOffRefcountOrder, h.refcount_order);
  StoreBE32(raw + in::kOffHeaderLength,
            static_cast<uint32_t>(in::kKnownHeaderLength + h.unknown_header_fields.size()));
  raw[in::kOffCompressionType] = static_cast<uint8_t>(h.compression_type);
  w->Bytes(raw, sizeof(raw));
  w->Bytes(h.unknown_header_fields.data(), h.unknown_header_fields.size());
}

std::vector<uint8_t> StandardFeatureTable() {
  std::vector<uint8_t> table;
  for (const FeatureName& f : StandardFeatureNames()) {
    uint8_t entry[in::kFeatureEntrySize] = {f.type, f.bit};
    std::memcpy(entry + 2, f.name.data(), f.name.size());
    table.insert(table.end(), entry, entry + sizeof(entry));
  }
  return table;
}

void WriteExtensions(const ParsedHeader& p, ClusterWriter* w) {
  const Header& h = p.header;
  if (p.backing_format) w->Extension(kExtBackingFormat, *p.backing_format);
  if (p.data_file) w->Extension(kExtDataFile, *p.data_file);
  if (p.crypto) {
    uint8_t c[in::kCryptoExtSize];
    StoreBE64(c, p.crypto->offset);
    StoreBE64(c + 8, p.crypto->length);
    w->Extension(kExtCrypto, c, sizeof(c));
  }
  // QEMU leaves the 392-byte table out of small clusters to keep room for a backing name.
  if (h.version >= 3 && h.cluster_size() > 4096) {
    w->Extension(kExtFeatureTable, StandardFeatureTable());
  }
  if (p.bitmaps) {
    uint8_t b[in::kBitmapsExtSize] = {};
    StoreBE32(b, p.bitmaps->nb_bitmaps);
    StoreBE64(b + 8, p.bitmaps->directory_size);
    StoreBE64(b + 16, p.bitmaps->directory_offset);
    w->Extension(kExtBitmaps, b, sizeof(b));
  }
  for (const RawExtension& e : p.unknown_extensions) w->Extension(e.type, e.data);
  w->Extension(kExtEnd, nullptr, 0);
}

}  // namespace

Result<std::vector<uint8_t>> EncodeHeader(const ParsedHeader& p) {
  QK_RETURN_IF_ERROR(CheckEncodable(p));
  ClusterWriter w(p.header.cluster_size());
  WriteFixedFields(p.header, &w);
  WriteExtensions(p, &w);
  if (p.backing_file) {
    if (!w.overflowed()) {
      StoreBE64(w.data() + in::kOffBackingFileOffset, w.pos());
      StoreBE32(w.data() + in::kOffBackingFileSize, static_cast<uint32_t>(p.backing_file->size()));
    }
    w.Bytes(p.backing_file->data(), p.backing_file->size());
  }
  if (w.overflowed()) {
    return Status::Invalid("header does not fit in one cluster (" + std::to_string(w.pos()) +
                           " bytes needed, cluster size " +
                           std::to_string(p.header.cluster_size()) + ")");
  }
  return std::move(w).Take();
}

}  // namespace qcow2kit::format
