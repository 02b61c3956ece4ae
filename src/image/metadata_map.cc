#include "image/metadata_map.h"

#include <algorithm>

namespace qcow2kit {

const char* MetadataMap::Name(Kind k) {
  switch (k) {
    case kHeader:
      return "qcow2_header";
    case kActiveL1:
      return "active L1 table";
    case kRefcountTable:
      return "refcount table";
    case kSnapshotTable:
      return "snapshot table";
    case kInactiveL1:
      return "inactive L1 table";
    case kActiveL2:
      return "active L2 table";
    case kRefcountBlock:
      return "refcount block";
    case kBitmapDirectory:
      return "bitmap directory";
    default:
      return "nothing";
  }
}

void MetadataMap::Clear() {
  ++generation_;
  ranges_.clear();
  tables_.clear();
}

void MetadataMap::AddRange(Kind kind, uint64_t offset, uint64_t length) {
  if (length == 0) return;
  ++generation_;
  const uint64_t first = offset >> cluster_bits_;
  const uint64_t end = ((offset + length - 1) >> cluster_bits_) + 1;
  if (kind == kActiveL2 || kind == kRefcountBlock) {
    // One cluster, or two for an unaligned (damaged) table offset.
    for (uint64_t c = first; c < end; ++c) tables_[c] |= Bit(kind);
  } else {
    ranges_.push_back({first, end, kind});
  }
}

MetadataMap::Kind MetadataMap::Find(uint64_t offset, uint64_t length, unsigned ignore) const {
  if (length == 0) return kNone;
  const uint64_t first = offset >> cluster_bits_;
  const uint64_t end = ((offset + length - 1) >> cluster_bits_) + 1;
  unsigned hit = 0;
  for (const Range& r : ranges_) {
    if (r.first < end && first < r.end) hit |= Bit(r.kind);
  }
  if (!tables_.empty()) {
    for (uint64_t c = first; c < end; ++c) {
      auto it = tables_.find(c);
      if (it != tables_.end()) hit |= it->second;
    }
  }
  hit &= ~ignore;
  for (unsigned k = 0; k < kKinds; ++k) {
    if (hit & (1u << k)) return static_cast<Kind>(k);
  }
  return kNone;
}

}  // namespace qcow2kit
