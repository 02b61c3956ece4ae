// An in-memory model of QEMU's qcow2 cluster allocator (block/qcow2-refcount.c, 7.2) for use
// while creating an image. qemu-img builds a new image by running its ordinary allocator over
// a nearly empty file; where refcount blocks and tables end up depends on every detail of that
// allocator (first-fit search from a moving free-cluster index, self-describing refcount blocks,
// retries after a new block lands where the caller wanted to put data, refcount-table growth
// with 50% headroom). To produce QEMU's layout exactly we replay the same calls on this model
// and write the result once, instead of approximating it with a formula.
//
// Nothing here touches a file. Offsets are byte offsets in the image file.
#pragma once

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "qcow2kit/status.h"

namespace qcow2kit::create_internal {

// QEMU's limits: QCOW_MAX_REFTABLE_SIZE (compared against entry counts, as QEMU does) and
// QCOW_MAX_CLUSTER_OFFSET.
inline constexpr uint64_t kMaxReftableSize = 8ull << 20;
inline constexpr uint64_t kMaxClusterOffset = (1ull << 56) - 1;

// qcow2_refcount_metadata_size: the number of refcount blocks needed to cover `clusters`
// clusters plus the refcount structures themselves (a fixed point); with `generous` the table
// gets room to grow by half.
uint64_t RefcountBlocksNeeded(uint64_t clusters, uint32_t cluster_bits, uint32_t refcount_order,
                              bool generous);

class RefcountModel {
 public:
  // The state qcow2_co_create leaves before it reopens the image: header cluster 0, a
  // one-cluster refcount table at cluster 1 whose entry 0 points at an empty refcount block at
  // cluster 2, and no refcounts set yet.
  RefcountModel(uint32_t cluster_bits, uint32_t refcount_order);

  // qcow2_alloc_clusters: first fit from the free-cluster index, refcounts raised to 1.
  Result<uint64_t> AllocClusters(uint64_t bytes);
  // qcow2_alloc_clusters_at: takes up to `count` free clusters starting exactly at `offset`;
  // returns how many it got (0 if the first one is taken).
  Result<uint64_t> AllocClustersAt(uint64_t offset, uint64_t count);
  // qcow2_refcount_area: new refcount blocks and a new table at `start` that cover everything
  // up to `start` plus `additional_clusters`; returns the offset after them.
  Result<uint64_t> RefcountArea(uint64_t start, uint64_t additional_clusters, bool exact_size,
                                uint64_t new_block_index = 0, uint64_t new_block_offset = 0);
  // qcow2_get_last_cluster: the last cluster below `file_size` with a refcount, or -1.
  int64_t LastUsedCluster(uint64_t file_size) const;

  uint64_t Refcount(uint64_t cluster_index) const;

  // The length the file has after every write made so far (or announced with NoteWrite).
  uint64_t file_length() const { return file_length_; }
  void NoteWrite(uint64_t offset, uint64_t length);

  uint64_t table_offset() const { return table_offset_; }
  uint32_t table_clusters() const;

  // Everything written for the refcount structures, in an order that leaves the file as QEMU
  // leaves it when written front to back: abandoned tables as they were when replaced, then
  // the current refcount blocks and table.
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> Writes() const;

 private:
  Result<uint64_t> AllocClustersNoref(uint64_t bytes, uint64_t max_offset);
  // update_refcount by +1 / -1 over the clusters touching [offset, offset + length). EAGAIN:
  // a refcount block was placed where the caller may have wanted its clusters; start over.
  Status UpdateRefcount(uint64_t offset, uint64_t length, bool decrease);
  Status AllocRefcountBlock(uint64_t cluster_index, std::vector<uint8_t>** block);
  std::vector<uint8_t>* Block(uint64_t offset);
  std::vector<uint8_t> TableBytes() const;
  void UpdateMaxTableIndex();

  uint32_t cluster_bits_;
  uint32_t order_;
  uint64_t cluster_size_;
  uint32_t block_bits_;  // log2 of the entries in one refcount block
  uint64_t max_refcount_;

  std::vector<uint64_t> table_;  // the refcount table as on disk (table size = its length)
  uint64_t table_offset_;
  uint64_t max_table_index_ = 0;
  std::map<uint64_t, std::vector<uint8_t>> blocks_;  // refcount blocks by offset
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> abandoned_tables_;
  uint64_t free_cluster_index_ = 0;
  uint64_t file_length_;
};

}  // namespace qcow2kit::create_internal
