// RefcountArray: refcounts of every host cluster held in memory (QEMU calls it the in-memory
// refcount table), used by check and repair to count references from the metadata and to
// build new refcount blocks.
//
// Entries have the image's own width (1..64 bits, packed as in a refcount block), so the array
// takes exactly as much memory as the refcount blocks of the whole file would, and one
// cluster-sized piece of it is a refcount block ready to be written. It grows on demand, in
// whole clusters, when a reference points past its end.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "format/refcount.h"

namespace qcow2kit {

class RefcountArray {
 public:
  RefcountArray(const format::RefcountGeometry& g, uint64_t clusters);

  uint64_t clusters() const { return clusters_; }
  uint64_t max_refcount() const { return geometry_.max_refcount(); }
  uint64_t Get(uint64_t cluster) const {
    return cluster < clusters_ ? format::GetRefcount(bytes_, cluster, geometry_.refcount_order) : 0;
  }
  // Adds one reference, growing the array to cover `cluster`. False (and no change) if the
  // refcount is already at the width's maximum.
  bool Increment(uint64_t cluster);
  void Set(uint64_t cluster, uint64_t value);  // grows the array to cover `cluster`
  void Grow(uint64_t clusters);                // covers at least `clusters` clusters
  void Clear();                                // every refcount back to 0, same size
  // The refcounts that refcount block `table_index` holds, as the block's bytes (one cluster;
  // zeros past the end of the array).
  std::span<const uint8_t> Block(uint64_t table_index);

  // Whether no cluster of [first, first + count) has a reference.
  bool RangeFree(uint64_t first, uint64_t count) const;
  size_t memory_bytes() const { return bytes_.capacity(); }

 private:
  void ReserveBlocks(uint64_t blocks);  // bytes for that many blocks; clusters() unchanged

  format::RefcountGeometry geometry_;
  uint64_t clusters_ = 0;
  std::vector<uint8_t> bytes_;  // whole refcount blocks
};

}  // namespace qcow2kit
