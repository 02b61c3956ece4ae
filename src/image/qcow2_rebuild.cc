// Rebuilding the refcount structures of a damaged image from the counted references (check
// -r all, when the refcount table or blocks cannot be repaired in place).
//
// Unlike QEMU, which places new blocks into any free cluster, everything new goes past the
// last cluster in use or referenced: no cluster that anything might still point at is
// overwritten, whatever the damage. The order makes the switch atomic:
//   1. new refcount blocks and the new table written past the used area,
//   2. sync,
//   3. the header's refcount table offset and size (one 12-byte write),
//   4. sync.
// A crash before 4 leaves the old structures in effect (the new ones are garbage past their
// end); after it the new ones, with the old ones leaked, which the rest of the check frees.
#include <algorithm>

#include "fmt/format.h"
#include "format/endian.h"
#include "image/qcow2_check.h"
#include "image/qcow2_image.h"

namespace qcow2kit {

Task<Status> Qcow2Checker::RebuildRefcounts(CheckResult& res) {
  const uint64_t cs = img_.geometry_.cluster_size();
  const uint64_t per_block = img_.refcount_geometry_.block_entries();
  const uint64_t per_table_cluster = cs / 8;
  const uint64_t start = refs_.clusters();  // past everything in use or referenced

  // Which refcount blocks cover a cluster in use below `start` (computed once).
  const uint64_t blocks_below = (start + per_block - 1) / per_block;
  std::vector<bool> used_before(blocks_below);
  for (uint64_t t = 0; t < blocks_below; ++t) {
    used_before[t] = !refs_.RangeFree(t * per_block, std::min(per_block, start - t * per_block));
  }

  // The fixed point: `extra` clusters for the blocks and the table that describe everything
  // including themselves (non-decreasing, so it ends).
  uint64_t extra = 0, table_clusters = 0;
  std::vector<uint64_t> blocks;  // table indices that get a block
  for (;;) {
    blocks.clear();
    const uint64_t end_block = (start + extra + per_block - 1) / per_block;
    for (uint64_t t = 0; t < end_block; ++t) {
      const bool below = t < blocks_below && used_before[t];
      const bool new_area =
          extra > 0 && t * per_block < start + extra && (t + 1) * per_block > start;
      if (below || new_area) blocks.push_back(t);
    }
    const uint64_t entries = blocks.empty() ? 1 : blocks.back() + 1;
    table_clusters = (entries + per_table_cluster - 1) / per_table_cluster;
    const uint64_t need = table_clusters + blocks.size();
    if (need <= extra) break;
    extra = need;
  }
  if (table_clusters * cs > (8ull << 20)) {
    ++res.check_errors;
    Log("ERROR allocating reftable: File too large");
    co_return Status::Error(EFBIG, "");
  }
  // Layout: the table first, then the blocks in table order. Every cluster of the area is
  // used (need == extra at the fixed point).
  for (uint64_t c = start; c < start + extra; ++c) refs_.Set(c, 1);
  const uint64_t table_offset = start * cs;
  std::vector<uint64_t> table(table_clusters * per_table_cluster, 0);
  for (size_t j = 0; j < blocks.size(); ++j) {
    const uint64_t block_offset = (start + table_clusters + j) * cs;
    table[blocks[j]] = block_offset;
    Status s = co_await img_.file_->WriteAt(std::as_bytes(refs_.Block(blocks[j])), block_offset);
    if (!s.ok()) {
      Log(fmt::format("ERROR writing refblock: {}", s.ToString()));
      ++res.check_errors;
      co_return s;
    }
  }
  std::vector<uint64_t> be(table.size());
  for (size_t i = 0; i < table.size(); ++i) format::StoreBE64(&be[i], table[i]);
  Status s = co_await img_.file_->WriteAt(std::as_bytes(std::span(be)), table_offset);
  if (s.ok()) s = co_await img_.SyncFiles();
  if (!s.ok()) {
    Log(fmt::format("ERROR writing reftable: {}", s.ToString()));
    ++res.check_errors;
    co_return s;
  }
  uint8_t hdr[12];
  format::StoreBE64(hdr, table_offset);
  format::StoreBE32(hdr + 8, static_cast<uint32_t>(table_clusters));
  s = co_await img_.WriteHeaderBytes(48, hdr);
  if (s.ok()) s = co_await img_.SyncFiles();
  if (!s.ok()) {
    Log(fmt::format("ERROR setting reftable: {}", s.ToString()));
    ++res.check_errors;
    co_return s;
  }
  img_.parsed_.header.refcount_table_offset = table_offset;
  img_.parsed_.header.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  img_.reftable_ = std::move(table);
  img_.dirty_reftable_.clear();
  img_.refcount_cache_->DropAll();
  img_.RebuildMetadataMap();
  img_.free_hint_ = 0;
  img_.unwritten_from_ = std::max(img_.unwritten_from_, (start + extra) * cs);
  co_return Status::Ok();
}

}  // namespace qcow2kit
