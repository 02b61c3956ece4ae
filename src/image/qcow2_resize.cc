// Resize of the qcow2 driver: growing (L1 table growth, preallocation of the new range) and
// shrinking (unmapping everything past the new end, freeing L2 tables, truncating the file).
//
// Crash safety: a grown L1 table is written and synced, with its refcounts, before the header
// points at it; the new size is written after the L1 growth, and when shrinking only after the
// removal of every mapping past the new end is durable, so that a crash never leaves an image whose
// size exposes clusters that were meant to be dropped.
#include <algorithm>

#include "fmt/format.h"
#include "format/endian.h"
#include "image/qcow2_image.h"

namespace qcow2kit {
namespace {

constexpr uint64_t kMaxL1Bytes = 32ull << 20;  // QEMU's QCOW_MAX_L1_SIZE

uint64_t DivRoundUp(uint64_t a, uint64_t b) {
  return a / b + (a % b != 0);
}

}  // namespace

Task<Status> Qcow2Image::Resize(uint64_t new_size, Preallocation prealloc) {
  const uint64_t old_size = size();
  if (!file_->writable()) co_return Status::Error(EROFS, "the image is opened read-only");
  QK_CO_RETURN_IF_ERROR(RefuseIfCorrupt());
  if (new_size % 512 != 0) co_return Status::Invalid("The new size must be a multiple of 512");
  if (!snapshots_.empty() && parsed_.header.version < 3) {
    co_return Status::Unsupported("Can't resize a v2 image which has snapshots");
  }
  if (!bitmaps_.empty()) {
    co_return Status::Unsupported("Can't resize an image with persistent dirty bitmaps");
  }
  const uint64_t needed_l1 = DivRoundUp(new_size, geometry_.l2_coverage());
  if (needed_l1 > kMaxL1Bytes / 8) {
    co_return Status::Error(EFBIG, fmt::format("the new size {} needs an L1 table larger than "
                                               "{} MiB",
                                               new_size, kMaxL1Bytes >> 20));
  }
  if (new_size < old_size) {
    if (prealloc != Preallocation::kOff) {
      co_return Status::Unsupported("Preallocation can't be used for shrinking an image");
    }
    co_return co_await Shrink(new_size);
  }
  if (new_size == old_size) co_return Status::Ok();
  {
    auto guard = co_await meta_lock_.Lock();
    if (needed_l1 > l1_.size()) QK_CO_RETURN_IF_ERROR(co_await GrowL1(needed_l1));
    QK_CO_RETURN_IF_ERROR(co_await WriteSize(new_size));
  }
  if (prealloc != Preallocation::kOff) {
    QK_CO_RETURN_IF_ERROR(co_await Preallocate(old_size, new_size, prealloc));
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::WriteSize(uint64_t new_size) {
  uint8_t b[8];
  format::StoreBE64(b, new_size);
  QK_CO_RETURN_IF_ERROR(co_await WriteHeaderBytes(24, b));
  QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
  parsed_.header.size = new_size;
  co_return Status::Ok();
}

Task<Status> Qcow2Image::GrowL1(uint64_t entries) {
  const uint64_t cs = geometry_.cluster_size();
  // Every L2 table the in-memory L1 points at is on disk before a table holding those entries
  // is written.
  QK_CO_RETURN_IF_ERROR(co_await FlushLocked(true));
  const uint64_t clusters = DivRoundUp(entries * 8, cs);
  QK_CO_ASSIGN_OR_RETURN(uint64_t table, co_await AllocateClusters(clusters));
  std::vector<uint64_t> be(clusters * cs / 8, 0);
  for (size_t i = 0; i < l1_.size(); ++i) format::StoreBE64(&be[i], l1_[i]);
  QK_CO_RETURN_IF_ERROR(co_await file_->WriteAt(std::as_bytes(std::span(be)), table));
  // The table and its refcounts are durable before the header points at it.
  QK_CO_RETURN_IF_ERROR(co_await FlushLocked(true));
  uint8_t hdr[12];
  format::StoreBE32(hdr, static_cast<uint32_t>(entries));
  format::StoreBE64(hdr + 4, table);
  QK_CO_RETURN_IF_ERROR(co_await WriteHeaderBytes(36, hdr));
  QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
  const uint64_t old_table = parsed_.header.l1_table_offset;
  const uint64_t old_bytes = uint64_t(parsed_.header.l1_size) * 8;
  parsed_.header.l1_size = static_cast<uint32_t>(entries);
  parsed_.header.l1_table_offset = table;
  l1_.resize(entries, 0);
  RebuildMetadataMap();
  if (old_table != 0 && old_bytes > 0) {
    ReleaseLater(old_table, DivRoundUp(old_bytes, cs) * cs, /*metadata=*/true);
    releases_.back().durable = true;  // the header switch is synced
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::Preallocate(uint64_t from, uint64_t to, Preallocation mode) {
  const uint64_t cs = geometry_.cluster_size();
  auto file_length = (geometry_.has_data_file ? data_file_ : file_)->Size();
  if (!file_length.ok()) co_return file_length.status();
  uint64_t host_end = *file_length;
  std::vector<Extent> extents;
  for (uint64_t c = from / cs * cs; c < to;) {
    // Only clusters without host space get some (hosts are per cluster, so a run of extents
    // without one covers whole clusters).
    extents.clear();
    QK_CO_RETURN_IF_ERROR(co_await Fetch(c, to - c, &extents));
    uint64_t run_end = c;
    for (const Extent& e : extents) {
      if (e.has_host() || e.kind == ExtentKind::kCompressed) break;
      run_end = std::min(e.end(), to);
    }
    if (run_end == c) {
      c = std::min(to, DivRoundUp(extents.front().end(), cs) * cs);
      continue;
    }
    const uint64_t run = DivRoundUp(run_end, cs) * cs - c;
    QK_CO_ASSIGN_OR_RETURN(Reservation r, co_await Reserve(c, run));
    const uint64_t host = r.host_offset, reserved = r.length;
    File* f = file(r.file_index);
    QK_CO_RETURN_IF_ERROR(co_await GuardDataWrite(r.file_index, host, reserved));
    // Reused free space may hold old data: the new range must read zeros.
    if (host < host_end && !r.reads_zeros && !geometry_.has_data_file) {
      static const std::vector<std::byte> kZeros(1 << 20);
      for (uint64_t at = host; at < std::min(host_end, host + reserved);) {
        const uint64_t n =
            std::min<uint64_t>(kZeros.size(), std::min(host_end, host + reserved) - at);
        QK_CO_RETURN_IF_ERROR(co_await f->WriteAt(std::span(kZeros).first(n), at));
        at += n;
      }
    }
    // The file may have grown since (a bigger refcount table is written past everything):
    // grow it, never cut it back.
    QK_CO_ASSIGN_OR_RETURN(host_end, f->Size());
    if (host + reserved > host_end) {
      const Preallocation file_mode = mode == Preallocation::kMetadata ? Preallocation::kOff : mode;
      QK_CO_RETURN_IF_ERROR(co_await f->Truncate(host + reserved, file_mode));
      host_end = host + reserved;
    }
    MappingUpdate u;
    u.guest_offset = c;
    u.length = std::min(reserved, to - c);
    u.kind = MappingUpdate::Kind::kData;
    u.host_offset = host;
    QK_CO_RETURN_IF_ERROR(co_await Commit(std::span(&u, 1)));
    c += reserved;
  }
  co_return co_await Flush();
}

Task<Status> Qcow2Image::Shrink(uint64_t new_size) {
  const uint64_t cs = geometry_.cluster_size();
  const uint64_t coverage = geometry_.l2_coverage();
  const uint64_t keep_l1 = DivRoundUp(new_size, coverage);
  // Unmap every whole cluster past the new end (a partial last cluster stays; the block
  // layer zeroes its tail if the image grows again). Tables shared with a snapshot are copied
  // first, so the snapshot keeps its data and the active tree drops its references.
  const uint64_t start = DivRoundUp(new_size, cs) * cs;
  for (uint64_t i = start / coverage; i < l1_.size(); ++i) {
    if (format::L1EntryOffset(l1_[i]) == 0) continue;
    MappingUpdate u;
    u.guest_offset = std::max(start, i * coverage);
    const uint64_t end = std::min((i + 1) * coverage, size());
    if (u.guest_offset >= end) continue;
    u.length = end - u.guest_offset;
    u.kind = MappingUpdate::Kind::kUnmap;
    QK_CO_RETURN_IF_ERROR(co_await Commit(std::span(&u, 1)));
  }
  auto guard = co_await meta_lock_.Lock();
  // L2 tables wholly past the new end go (the L1 table keeps its size, as in QEMU).
  for (uint64_t i = keep_l1; i < l1_.size(); ++i) {
    const uint64_t table = format::L1EntryOffset(l1_[i]);
    if (table == 0) continue;
    for (uint64_t s = 0; s < cs; s += slice_bytes_) l2_cache_->Drop(table + s);
    l1_[i] = 0;
    dirty_l1_.insert(i);
    ReleaseLater(table, cs, /*metadata=*/true);
  }
  // The removals are durable before the size drops; then the freed clusters are released and
  // their refcounts written.
  QK_CO_RETURN_IF_ERROR(co_await FlushLocked(true));
  QK_CO_RETURN_IF_ERROR(co_await WriteSize(new_size));
  QK_CO_RETURN_IF_ERROR(co_await FlushLocked(true));
  // Give back the space after the last used cluster.
  auto length = file_->Size();
  if (!length.ok()) co_return length.status();
  uint64_t last_used_end = 0;
  for (uint64_t c = DivRoundUp(*length, cs); c > 0; --c) {
    auto rc = co_await Refcount((c - 1) * cs);
    if (!rc.ok()) co_return rc.status();
    if (*rc != 0) {
      last_used_end = c * cs;
      break;
    }
  }
  if (last_used_end > 0 && last_used_end < *length) {
    QK_CO_RETURN_IF_ERROR(co_await file_->Truncate(last_used_end));
  }
  co_return Status::Ok();
}

}  // namespace qcow2kit
