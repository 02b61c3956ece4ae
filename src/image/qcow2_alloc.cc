// Host cluster allocation and refcount updates for the qcow2 driver.
//
// Crash-safety rules enforced here and in qcow2_flush.cc (DESIGN.md):
//  - a refcount increment reaches the disk before any L2/L1 entry that uses the cluster
//    (refcount blocks are written first at flush);
//  - a refcount block is on disk before the refcount-table entry that points at it;
//  - a refcount decrement happens only after the removal of the reference is on disk and no
//    I/O issued under the old mapping is in flight (ReleaseLater / ApplyReleases), so a crash
//    can leak a cluster but never hand out one that is still referenced.
#include <algorithm>

#include "fmt/format.h"
#include "format/endian.h"
#include "image/qcow2_image.h"

namespace qcow2kit {

Task<Result<uint64_t>> Qcow2Image::AllocateClusters(uint64_t count, uint64_t* got) {
  const uint64_t cs = geometry_.cluster_size();
  const uint64_t epb = refcount_geometry_.block_entries();
  // First fit: the first free cluster, extended while the following ones are free too (up to
  // `count`). Runs are cut by refcount blocks, which sit at the start of their range. A caller
  // that needs all `count` clusters in one run skips shorter runs.
  uint64_t start = 0;
  uint64_t run = 0;
  uint64_t first_free = UINT64_MAX;
  for (uint64_t i = free_hint_; run < count; ++i) {
    if (i >= (1ull << (56 - geometry_.cluster_bits))) {
      if (run > 0 && got) break;
      co_return Status::Error(EFBIG, "no free host clusters left below the 64 PiB offset limit");
    }
    uint64_t ti = i / epb;
    if (ti >= reftable_.size() || (reftable_[ti] & format::kRefcountTableOffsetMask) == 0) {
      QK_CO_RETURN_IF_ERROR(co_await EnsureRefblock(ti));
    }
    auto rc = co_await Refcount(i * cs);
    if (!rc.ok()) co_return rc.status();
    if (*rc == 0) {
      if (run++ == 0) start = i;
      first_free = std::min(first_free, i);
    } else if (run > 0) {
      if (got) break;
      run = 0;
    }
  }
  // No free cluster below the hint: everything up to the end of this run is used, except a
  // shorter run skipped on the way.
  free_hint_ = first_free < start ? first_free : start + run;
  QK_CO_RETURN_IF_ERROR(co_await UpdateRefcounts(start * cs, run * cs, +1));
  if (got) {
    *got = run;
  } else if (run < count) {
    co_return Status::Error(ENOSPC, "could not allocate contiguous clusters");
  }
  co_return start* cs;
}

Task<Status> Qcow2Image::UpdateRefcounts(uint64_t offset, uint64_t length, int64_t delta) {
  const auto& g = refcount_geometry_;
  const uint64_t cs = geometry_.cluster_size();
  const uint64_t entries_per_slice = (uint64_t(slice_bytes_) * 8) >> g.refcount_order;
  for (uint64_t c = offset / cs; c < (offset + length + cs - 1) / cs; ++c) {
    uint64_t host = c * cs;
    uint64_t ti = g.table_index(host);
    if (ti >= reftable_.size() || (reftable_[ti] & format::kRefcountTableOffsetMask) == 0) {
      if (delta < 0) {
        co_return Status::Corrupt(fmt::format(
            "cannot drop the refcount of cluster {:#x}: no refcount block covers it", host));
      }
      QK_CO_RETURN_IF_ERROR(co_await EnsureRefblock(ti));
    }
    uint64_t block = reftable_[ti] & format::kRefcountTableOffsetMask;
    if (block & (cs - 1)) {
      co_return Status::Corrupt(
          fmt::format("Refblock offset {:#x} unaligned (reftable index: {:#x})", block, ti));
    }
    uint64_t index = g.block_index(host);
    auto slice =
        co_await refcount_cache_->GetForUpdate(block + (index / entries_per_slice) * slice_bytes_);
    if (!slice.ok()) co_return slice.status();
    std::span<uint8_t> bytes(*slice, slice_bytes_);
    uint64_t old = format::GetRefcount(bytes, index % entries_per_slice, g.refcount_order);
    if (delta < 0 && old < uint64_t(-delta)) {
      co_return Status::Corrupt(
          fmt::format("refcount of cluster {:#x} would drop below zero", host));
    }
    if (delta > 0 && g.max_refcount() - old < uint64_t(delta)) {
      co_return Status::Error(
          ERANGE, fmt::format("refcount of cluster {:#x} would exceed the maximum of {} "
                              "(refcount_bits={})",
                              host, g.max_refcount(), g.refcount_bits()));
    }
    uint64_t now = old + delta;
    format::SetRefcount(bytes, index % entries_per_slice, g.refcount_order, now);
    if (delta > 0) unwritten_from_ = std::max(unwritten_from_, host + cs);
    if (now == 0 && c < free_hint_) free_hint_ = c;
    if (now == 0 && host == pack_host_) {
      // Every stream packed there is gone: the cluster is free, so packing must not go on
      // into it (QEMU resets free_byte_offset the same way).
      pack_host_ = Extent::kNoHost;
      pack_used_ = pack_written_ = 0;
    }
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::EnsureRefblock(uint64_t ti) {
  auto present = [&] {
    return ti < reftable_.size() && (reftable_[ti] & format::kRefcountTableOffsetMask) != 0;
  };
  if (present()) co_return Status::Ok();
  if (ti == 0) {
    co_return Status::Corrupt("the refcount table has no block for the first clusters");
  }
  if (ti >= reftable_.size()) {
    QK_CO_RETURN_IF_ERROR(co_await GrowRefcountTable(ti + 1));
    if (present()) co_return Status::Ok();
  }
  // No block means every cluster of the range is free: the block takes the range's first
  // cluster and describes itself.
  const uint64_t cs = geometry_.cluster_size();
  const uint64_t block = ti * refcount_geometry_.block_entries() * cs;
  for (uint64_t s = slice_bytes_; s < cs; s += slice_bytes_) {
    refcount_cache_->CreateZeroed(block + s);
  }
  format::SetRefcount(std::span(refcount_cache_->CreateZeroed(block), slice_bytes_), 0,
                      refcount_geometry_.refcount_order, 1);
  reftable_[ti] = block;
  dirty_reftable_.insert(ti);
  metadata_map_.AddTable(MetadataMap::kRefcountBlock, block);
  unwritten_from_ = std::max(unwritten_from_, block + cs);
  co_return Status::Ok();
}

Task<Status> Qcow2Image::GrowRefcountTable(uint64_t min_entries) {
  const uint64_t cs = geometry_.cluster_size();
  const uint64_t epb = refcount_geometry_.block_entries();
  const uint64_t per_cluster = cs / 8;
  const uint64_t old_entries = reftable_.size();
  const uint64_t old_offset = parsed_.header.refcount_table_offset;
  const uint64_t old_clusters = parsed_.header.refcount_table_clusters;
  auto round = [&](uint64_t n) { return (n + per_cluster - 1) / per_cluster * per_cluster; };
  uint64_t entries = round(std::max(min_entries, old_entries + old_entries / 2));
  // The new table and the refcount blocks describing it go right after the area the old table
  // covers: [first, first + table_clusters + blocks). Iterate to the fixed point where the
  // blocks cover the area including themselves and the table covers the blocks.
  const uint64_t first = old_entries * epb;
  uint64_t table_clusters = 0, blocks = 0;
  for (;;) {
    table_clusters = entries / per_cluster;
    blocks = 1;
    while (blocks < (table_clusters + blocks + epb - 1) / epb) ++blocks;
    if (entries >= old_entries + blocks) break;
    entries = round(old_entries + blocks);
  }
  if (table_clusters * cs > (8ull << 20)) {
    co_return Status::Error(EFBIG, "the refcount table would exceed 8 MiB");
  }
  // New blocks: block j covers range old_entries + j and sits after the table.
  std::vector<uint64_t> table(entries, 0);
  std::copy(reftable_.begin(), reftable_.end(), table.begin());
  const uint64_t area_end = first + table_clusters + blocks;
  for (uint64_t j = 0; j < blocks; ++j) {
    uint64_t block = (first + table_clusters + j) * cs;
    table[old_entries + j] = block;
    for (uint64_t s = 0; s < cs; s += slice_bytes_) refcount_cache_->CreateZeroed(block + s);
  }
  reftable_ = table;  // so that UpdateRefcounts finds the new blocks
  QK_CO_RETURN_IF_ERROR(co_await UpdateRefcounts(first * cs, (area_end - first) * cs, +1));
  // Blocks (old dirty ones too) before the table that points at them; the table before the
  // header that points at it.
  QK_CO_RETURN_IF_ERROR(co_await refcount_cache_->WriteBack());
  std::vector<uint64_t> be(entries);
  for (uint64_t i = 0; i < entries; ++i) format::StoreBE64(&be[i], table[i]);
  QK_CO_RETURN_IF_ERROR(co_await file_->WriteAt(std::as_bytes(std::span(be)), first * cs));
  QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
  uint8_t hdr[12];
  format::StoreBE64(hdr, first * cs);
  format::StoreBE32(hdr + 8, static_cast<uint32_t>(table_clusters));
  QK_CO_RETURN_IF_ERROR(co_await WriteHeaderBytes(48, hdr));
  QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
  parsed_.header.refcount_table_offset = first * cs;
  parsed_.header.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  dirty_reftable_.clear();  // every entry was just written with the new table
  RebuildMetadataMap();
  if (old_offset != 0) ReleaseLater(old_offset, old_clusters * cs, /*metadata=*/true);
  for (auto& r : releases_) {
    if (r.metadata && r.offset == old_offset) r.durable = true;  // the header switch is synced
  }
  co_return Status::Ok();
}

void Qcow2Image::ReleaseLater(uint64_t offset, uint64_t length, bool metadata) {
  if (length == 0) return;
  Release r;
  r.offset = offset;
  r.length = length;
  r.metadata = metadata;
  r.epoch = metadata ? 0 : NextEpoch();
  releases_.push_back(r);
}

Task<Status> Qcow2Image::ApplyReleases() {
  std::vector<Release> ready;
  std::vector<Release> later;
  for (const Release& r : releases_) {
    bool safe = r.durable && (r.metadata || !IoInFlightUpTo(r.epoch));
    (safe ? ready : later).push_back(r);
  }
  releases_ = std::move(later);
  bool tables_freed = false;
  for (const Release& r : ready) {
    QK_CO_RETURN_IF_ERROR(co_await UpdateRefcounts(r.offset, r.length, -1));
    tables_freed |= r.metadata;
    // The space may hold other data from now on: the decompressed copy of it is stale.
    if (decompressed_host_ >= r.offset && decompressed_host_ - r.offset < r.length) {
      decompressed_host_ = Extent::kNoHost;
    }
  }
  // A freed table's clusters may hold guest data from now on.
  if (tables_freed) RebuildMetadataMap();
  co_return Status::Ok();
}

}  // namespace qcow2kit
