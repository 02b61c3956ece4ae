// Overlap protection and the corrupt bit (QEMU's qcow2_pre_write_overlap_check and
// qcow2_signal_corruption): every data write, table writeback and table entry write is checked
// against the MetadataMap first. A write that would land on metadata fails with EIO naming
// what it would have hit, and the image is marked corrupt (incompatible bit 1, synced): from
// then on it refuses every write, and it opens read-write again only to be repaired by check.
#include <cstdio>

#include "fmt/format.h"
#include "image/qcow2_image.h"

namespace qcow2kit {

void Qcow2Image::RebuildMetadataMap() {
  using K = MetadataMap::Kind;
  const format::Header& h = parsed_.header;
  const uint64_t cs = geometry_.cluster_size();
  MetadataMap& m = metadata_map_;
  m.Clear();
  m.AddRange(K::kHeader, 0, cs);
  m.AddRange(K::kActiveL1, h.l1_table_offset, uint64_t{h.l1_size} * 8);
  m.AddRange(K::kRefcountTable, h.refcount_table_offset, reftable_.size() * 8);
  m.AddRange(K::kSnapshotTable, h.snapshots_offset, snapshot_table_bytes_);
  for (const format::Snapshot& s : snapshots_) {
    m.AddRange(K::kInactiveL1, s.l1_table_offset, uint64_t{s.l1_size} * 8);
  }
  if (parsed_.bitmaps) {
    m.AddRange(K::kBitmapDirectory, parsed_.bitmaps->directory_offset,
               parsed_.bitmaps->directory_size);
  }
  for (uint64_t e : l1_) {
    if (format::L1EntryOffset(e)) m.AddTable(K::kActiveL2, format::L1EntryOffset(e));
  }
  for (uint64_t e : reftable_) {
    const uint64_t block = e & format::kRefcountTableOffsetMask;
    if (block) m.AddTable(K::kRefcountBlock, block);
  }
}

Status Qcow2Image::RefuseIfCorrupt() const {
  if (corruption_.empty()) return Status::Ok();
  return Status::IoError("the image is marked corrupt (" + corruption_ +
                         "); repair it with 'qcow2kit check -r all'");
}

Status Qcow2Image::CheckOverlap(uint64_t offset, uint64_t length, unsigned ignore) {
  QK_RETURN_IF_ERROR(RefuseIfCorrupt());
  const MetadataMap::Kind hit = metadata_map_.Find(offset, length, ignore);
  if (hit == MetadataMap::kNone) return Status::Ok();
  corruption_ = fmt::format("Preventing invalid write on metadata (overlaps with {})",
                            MetadataMap::Name(hit));
  return Status::IoError(
      fmt::format("{}: {:#x} bytes at host offset {:#x}; the image is now "
                  "marked corrupt",
                  corruption_, length, offset));
}

Task<Status> Qcow2Image::MarkCorruptIfNeeded(Status s) {
  if (!corruption_.empty() && !parsed_.header.corrupt() && file_->writable()) {
    // Said once, as QEMU does, for servers whose client only sees EIO.
    std::fprintf(stderr,
                 "qcow2: Marking image as corrupt: %s; further corruption events will be "
                 "suppressed\n",
                 corruption_.c_str());
    // Best effort: the write that found the damage fails either way.
    (void)co_await SetIncompatibleBit(format::kIncompatCorrupt, true);
  }
  co_return s;
}

Task<Status> Qcow2Image::GuardDataWrite(uint8_t file_index, uint64_t host_offset, uint64_t length) {
  if (file_index != 0 && corruption_.empty()) co_return Status::Ok();  // external data file
  Status s = CheckOverlap(host_offset, length, 0);
  if (s.ok()) co_return s;
  co_return co_await MarkCorruptIfNeeded(std::move(s));
}

}  // namespace qcow2kit
