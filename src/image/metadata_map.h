// MetadataMap: where an image's metadata lives in the image file, so that no write lands on
// it by mistake. A damaged table (an L2 entry pointing at a refcount block, an L1 entry at
// the refcount table) would otherwise make an ordinary guest write or a table writeback
// overwrite metadata; QEMU calls this the overlap check.
//
// It holds what QEMU's default ("cached") overlap check covers: the header, the active L1
// table, the refcount table, the snapshot table, the snapshots' L1 tables, the bitmap
// directory (ranges), and the active L2 tables and refcount blocks (single clusters, looked up
// by hash, so the check costs one lookup per cluster written). The owner rebuilds it whenever
// tables move or are freed, and adds new tables as they are allocated.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace qcow2kit {

class MetadataMap {
 public:
  // In QEMU's order of precedence (the first that overlaps is the one reported).
  enum Kind : uint8_t {
    kHeader,
    kActiveL1,
    kRefcountTable,
    kSnapshotTable,
    kInactiveL1,
    kActiveL2,
    kRefcountBlock,
    kBitmapDirectory,
    kKinds,
    kNone = kKinds,
  };
  static constexpr unsigned Bit(Kind k) { return 1u << k; }
  // QEMU's names for them, as in "overlaps with refcount block".
  static const char* Name(Kind k);

  explicit MetadataMap(uint32_t cluster_bits) : cluster_bits_(cluster_bits) {}

  void Clear();
  // A structure of `length` bytes at `offset` (nothing if length is 0).
  void AddRange(Kind kind, uint64_t offset, uint64_t length);
  // A one-cluster table (L2 table or refcount block) at `offset`.
  void AddTable(Kind kind, uint64_t offset) {
    AddRange(kind, offset, uint64_t{1} << cluster_bits_);
  }

  // The first kind (not in `ignore`, a mask of Bit()s) whose clusters the clusters of
  // [offset, offset + length) touch; kNone if none.
  Kind Find(uint64_t offset, uint64_t length, unsigned ignore = 0) const;
  // Moves whenever a structure is added or the map cleared: what Find() allowed before may
  // be refused now.
  uint64_t generation() const { return generation_; }

 private:
  struct Range {
    uint64_t first, end;  // clusters
    Kind kind;
  };
  uint32_t cluster_bits_;
  uint64_t generation_ = 0;
  std::vector<Range> ranges_;                      // the few multi-cluster structures
  std::unordered_map<uint64_t, unsigned> tables_;  // cluster -> mask of kinds
};

}  // namespace qcow2kit
