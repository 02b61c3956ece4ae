// Ordered metadata writeback of the qcow2 driver.
//
// Flush writes dirty metadata in dependency order, with a sync wherever the next step must
// not reach the disk before the previous one (DESIGN.md, crash consistency):
//   1. refcount blocks                  (increments before the entries that use the clusters)
//   2. sync; refcount table entries     (a block before the table entry that points at it)
//   3. sync                             (guest data, including copied-in head and tail, before
//                                        the L2 entries that expose it)
//   4. L2 slices
//   5. sync; L1 entries                 (a table before the L1 entry that points at it)
//   6. sync                             (a completed flush survives power loss)
// Clusters whose last reference a commit removed are released only after step 6 made the
// removal durable (ApplyReleases at the next flush or at close).
#include "fmt/format.h"
#include "format/endian.h"
#include "image/qcow2_image.h"

namespace qcow2kit {

Task<Status> Qcow2Image::SyncFiles() {
  QK_CO_RETURN_IF_ERROR(co_await file_->Sync());
  if (data_file_ && data_file_->writable()) QK_CO_RETURN_IF_ERROR(co_await data_file_->Sync());
  co_return Status::Ok();
}

Task<Status> Qcow2Image::WriteHeaderBytes(uint64_t offset, std::span<const uint8_t> bytes) {
  co_return co_await file_->WriteAt(std::as_bytes(bytes), offset);
}

Task<Status> Qcow2Image::SetIncompatibleBit(uint64_t bit, bool on) {
  uint64_t v = parsed_.header.incompatible_features;
  v = on ? (v | bit) : (v & ~bit);
  if (v == parsed_.header.incompatible_features) co_return Status::Ok();
  if (parsed_.header.version < 3) {
    // A v2 header has no feature fields (those bytes belong to the extensions): the bit
    // lives in memory only, as in QEMU.
    parsed_.header.incompatible_features = v;
    co_return Status::Ok();
  }
  uint8_t b[8];
  format::StoreBE64(b, v);
  QK_CO_RETURN_IF_ERROR(co_await WriteHeaderBytes(72, b));
  QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
  parsed_.header.incompatible_features = v;
  co_return Status::Ok();
}

Task<Status> Qcow2Image::Flush() {
  if (!file_->writable()) co_return Status::Ok();
  auto guard = co_await meta_lock_.Lock();
  co_return co_await FlushLocked(!header().lazy_refcounts());
}

Task<Status> Qcow2Image::FlushLocked(bool write_refcounts) {
  Status s = co_await WriteTables(write_refcounts);
  if (s.ok()) co_return s;
  co_return co_await MarkCorruptIfNeeded(std::move(s));
}

Task<Status> Qcow2Image::WriteTables(bool write_refcounts) {
  QK_CO_RETURN_IF_ERROR(RefuseIfCorrupt());  // nothing more is written to a corrupt image
  QK_CO_RETURN_IF_ERROR(co_await ApplyReleases());
  // Packed compressed streams before anything syncs: they are data their L2 entries expose.
  QK_CO_RETURN_IF_ERROR(co_await WritePack());
  const bool l2_dirty = l2_cache_->dirty_count() > 0 || !dirty_l1_.empty();
  if (l2_dirty && header().lazy_refcounts() && !header().dirty()) {
    // Lazy refcounts: the dirty bit is on disk before the first L2 update.
    QK_CO_RETURN_IF_ERROR(co_await SetIncompatibleBit(format::kIncompatDirty, true));
  }
  // New refcount blocks and table entries are written even with lazy refcounts, so a dirty
  // image can always be repaired in place.
  if (write_refcounts || !dirty_reftable_.empty()) {
    QK_CO_RETURN_IF_ERROR(co_await refcount_cache_->WriteBack());
  }
  if (!dirty_reftable_.empty()) {
    QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
    for (uint64_t i : dirty_reftable_) {
      uint8_t b[8];
      format::StoreBE64(b, reftable_[i]);
      const uint64_t at = parsed_.header.refcount_table_offset + i * 8;
      QK_CO_RETURN_IF_ERROR(CheckOverlap(at, 8, MetadataMap::Bit(MetadataMap::kRefcountTable)));
      QK_CO_RETURN_IF_ERROR(co_await WriteHeaderBytes(at, b));
    }
    dirty_reftable_.clear();
  }
  QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
  if (l2_dirty) {
    QK_CO_RETURN_IF_ERROR(co_await l2_cache_->WriteBack());
    if (!dirty_l1_.empty()) {
      QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
      for (uint64_t i : dirty_l1_) {
        uint8_t b[8];
        format::StoreBE64(b, l1_[i]);
        const uint64_t at = parsed_.header.l1_table_offset + i * 8;
        QK_CO_RETURN_IF_ERROR(CheckOverlap(at, 8, MetadataMap::Bit(MetadataMap::kActiveL1)));
        QK_CO_RETURN_IF_ERROR(co_await WriteHeaderBytes(at, b));
      }
      dirty_l1_.clear();
    }
    QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
  }
  for (Release& r : releases_) r.durable = true;
  co_return Status::Ok();
}

Task<Status> Qcow2Image::Close() {
  if (!file_->writable()) co_return Status::Ok();
  auto guard = co_await meta_lock_.Lock();
  // A corrupt image gets no more writes: what was not flushed is lost, as in QEMU.
  if (!corruption_.empty()) co_return Status::Ok();
  // Twice: the first makes pending removals durable, the second writes the refcounts they
  // release.
  QK_CO_RETURN_IF_ERROR(co_await FlushLocked(true));
  QK_CO_RETURN_IF_ERROR(co_await FlushLocked(true));
  if (header().dirty()) {
    QK_CO_RETURN_IF_ERROR(co_await SetIncompatibleBit(format::kIncompatDirty, false));
  }
  co_return Status::Ok();
}

}  // namespace qcow2kit
