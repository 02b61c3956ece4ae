// Mapping updates of the qcow2 driver: range locks for allocating writers, host cluster
// reservation, and Commit, which rewrites L2 entries (allocating or copying L2 tables).
#include <algorithm>

#include "fmt/format.h"
#include "format/endian.h"
#include "image/qcow2_image.h"

namespace qcow2kit {

using format::ClusterType;

// Guest clusters [start, end) held by one allocating writer; others wait on it.
struct Qcow2Image::HeldRange : FormatDriver::RangeGuard {
  HeldRange(Qcow2Image* img, uint64_t start, uint64_t end) : img(img), start(start), end(end) {}
  ~HeldRange() override {
    auto& v = img->held_ranges_;
    v.erase(std::find(v.begin(), v.end(), this));
    for (auto h : waiters) Reactor::Current()->Post(h);
  }
  Qcow2Image* img;
  uint64_t start, end;
  std::vector<std::coroutine_handle<>> waiters;
};

Task<std::unique_ptr<FormatDriver::RangeGuard>> Qcow2Image::LockRange(uint64_t offset,
                                                                      uint64_t length) {
  const uint64_t cs = geometry_.cluster_size();
  const uint64_t start = offset & ~(cs - 1);
  const uint64_t end = (offset + length + cs - 1) & ~(cs - 1);
  for (;;) {
    HeldRange* busy = nullptr;
    for (HeldRange* h : held_ranges_) {
      if (h->start < end && start < h->end) busy = h;
    }
    if (!busy) break;
    struct Wait {
      HeldRange* h;
      bool await_ready() const noexcept { return false; }
      void await_suspend(std::coroutine_handle<> c) { h->waiters.push_back(c); }
      void await_resume() const noexcept {}
    };
    co_await Wait{busy};
  }
  auto held = std::make_unique<HeldRange>(this, start, end);
  held_ranges_.push_back(held.get());
  co_return std::unique_ptr<RangeGuard>(std::move(held));
}

Task<Result<FormatDriver::Reservation>> Qcow2Image::Reserve(uint64_t guest_offset,
                                                            uint64_t length) {
  const uint64_t cs = geometry_.cluster_size();
  const uint64_t clusters = (length + cs - 1) / cs;
  QK_CO_RETURN_IF_ERROR(RefuseIfCorrupt());
  Reservation r;
  if (geometry_.has_data_file) {
    // Guest data lives at the same offset in the data file and is not refcounted.
    r.file_index = 1;
    r.length = clusters * cs;
    r.host_offset = guest_offset & ~(cs - 1);
    co_return r;
  }
  auto guard = co_await meta_lock_.Lock();
  uint64_t got = 0;
  const uint64_t unwritten_from = unwritten_from_;
  QK_CO_ASSIGN_OR_RETURN(r.host_offset, co_await AllocateClusters(clusters, &got));
  r.length = got * cs;
  r.reads_zeros = r.host_offset >= unwritten_from;
  co_return r;
}

Task<Result<uint8_t*>> Qcow2Image::L2SliceForUpdate(uint64_t offset) {
  const uint32_t cb = geometry_.cluster_bits;
  const uint64_t cs = geometry_.cluster_size();
  const uint64_t l2_entries = geometry_.l2_entries();
  const uint64_t cluster_index = offset >> cb;
  const uint64_t l1_index = cluster_index / l2_entries;
  if (l1_index >= l1_.size()) {
    co_return Status::Invalid(fmt::format("guest offset {:#x} is beyond the L1 table", offset));
  }
  uint64_t l1e = l1_[l1_index];
  QK_CO_RETURN_IF_ERROR(format::ValidateL1Entry(l1e, l1_index, geometry_));
  uint64_t table = format::L1EntryOffset(l1e);
  if (table == 0 || !(l1e & format::kOflagCopied)) {
    // A new table, or a private copy of one shared with a snapshot. It is written (at flush)
    // before the L1 entry that points at it.
    QK_CO_ASSIGN_OR_RETURN(uint64_t fresh, co_await AllocateClusters(1));
    for (uint64_t s = 0; s < cs; s += slice_bytes_) {
      // The new slice first: it is dirty, so fetching the old one cannot evict it (while the
      // old one could be evicted by creating the new one).
      uint8_t* dst = l2_cache_->CreateZeroed(fresh + s);
      if (table != 0) {
        auto src = co_await l2_cache_->Get(table + s);
        if (!src.ok()) co_return src.status();
        std::memcpy(dst, *src, slice_bytes_);
      }
    }
    if (table != 0) ReleaseLater(table, cs, /*metadata=*/true);
    table = fresh;
    l1_[l1_index] = fresh | format::kOflagCopied;
    metadata_map_.AddTable(MetadataMap::kActiveL2, fresh);
    dirty_l1_.insert(l1_index);
  }
  const uint64_t slice_entries = slice_bytes_ / geometry_.l2_entry_bytes();
  uint64_t slice_no = (cluster_index % l2_entries) / slice_entries;
  auto slice = co_await l2_cache_->GetForUpdate(table + slice_no * slice_bytes_);
  if (!slice.ok()) co_return slice.status();
  co_return *slice + (cluster_index % slice_entries) * geometry_.l2_entry_bytes();
}

Task<Status> Qcow2Image::Commit(std::span<const MappingUpdate> updates) {
  const uint64_t cs = geometry_.cluster_size();
  auto guard = co_await meta_lock_.Lock();
  QK_CO_RETURN_IF_ERROR(RefuseIfCorrupt());
  for (const MappingUpdate& u : updates) {
    for (uint64_t c = u.guest_offset & ~(cs - 1); c < u.guest_offset + u.length; c += cs) {
      QK_CO_RETURN_IF_ERROR(co_await CommitCluster(u, c));
    }
  }
  co_return co_await WriteBackIfCachesFull();
}

Task<Status> Qcow2Image::WriteBackIfCachesFull() {
  // Bound the dirty metadata: past half the cache, write it back (in order).
  if (l2_cache_->dirty_count() > l2_cache_->capacity() / 2 ||
      refcount_cache_->dirty_count() > refcount_cache_->capacity() / 2) {
    QK_CO_RETURN_IF_ERROR(co_await FlushLocked(!header().lazy_refcounts()));
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::CommitCluster(const MappingUpdate& u, uint64_t cg) {
  const uint64_t cs = geometry_.cluster_size();
  const uint64_t cluster_end = std::min(cg + cs, size());
  const uint64_t lo = std::max(u.guest_offset, cg);
  const uint64_t hi = std::min(u.guest_offset + u.length, cluster_end);
  const bool whole = lo == cg && hi == cluster_end;
  const bool data_file = geometry_.has_data_file;
  const bool zero_flag = parsed_.header.version >= 3;

  QK_CO_ASSIGN_OR_RETURN(uint8_t * p, co_await L2SliceForUpdate(cg));
  const uint64_t old = format::LoadBE64(p);
  const uint64_t old_bitmap = geometry_.extended_l2 ? format::LoadBE64(p + 8) : 0;
  const ClusterType type = format::ClassifyCluster(old, geometry_);
  const bool old_has_host = type == ClusterType::kNormal || type == ClusterType::kZeroAlloc ||
                            (geometry_.extended_l2 && type == ClusterType::kUnallocated &&
                             format::L2EntryOffset(old) != 0);
  const uint64_t old_host = old_has_host ? format::L2EntryOffset(old) : Extent::kNoHost;

  uint64_t entry = old;
  uint64_t bitmap = old_bitmap;
  MappingUpdate::Kind kind = u.kind;
  if (kind == MappingUpdate::Kind::kDiscard) {
    // QEMU: v3 images or images with a backing file read zeros after a discard; otherwise the
    // cluster is simply deallocated. Unallocated clusters without a backing file stay as they
    // are.
    if (!whole) co_return Status::Ok();
    if (type == ClusterType::kUnallocated && !old_has_host && !has_backing()) {
      co_return Status::Ok();
    }
    kind = zero_flag || has_backing() ? MappingUpdate::Kind::kZero : MappingUpdate::Kind::kUnmap;
  }
  if (kind == MappingUpdate::Kind::kZero && !zero_flag) {
    if (has_backing() || u.keep_host) {
      // Without a zero flag, keeping the space means writing zeros into it (the caller's
      // fallback), as QEMU does.
      co_return Status::Unsupported("zero clusters need a v3 (compat=1.1) image");
    }
    kind = MappingUpdate::Kind::kUnmap;  // v2 without backing: unallocated reads as zeros
  }

  if (kind == MappingUpdate::Kind::kCompressed && !whole) {
    co_return Status::Invalid("a compressed mapping must cover a whole cluster");
  }
  uint64_t new_host = Extent::kNoHost;
  if (kind == MappingUpdate::Kind::kData) {
    new_host = (u.host_offset + (cg - u.guest_offset)) & ~(cs - 1);
    if (cg < u.guest_offset) new_host = u.host_offset & ~(cs - 1);
  }

  if (!geometry_.extended_l2) {
    switch (kind) {
      case MappingUpdate::Kind::kData:
        entry = new_host | format::kOflagCopied;
        break;
      case MappingUpdate::Kind::kCompressed:
        entry =
            format::EncodeCompressed(u.host_offset, u.compressed_length, geometry_.cluster_bits);
        break;
      case MappingUpdate::Kind::kZero:
        entry = (u.keep_host && old_has_host && (old & format::kOflagCopied))
                    ? old_host | format::kOflagCopied | format::kOflagZero
                    : format::kOflagZero;
        break;
      default:
        entry = 0;
        break;
    }
  } else {
    const uint64_t sc = geometry_.subcluster_size();
    const uint32_t first = static_cast<uint32_t>((lo - cg) / sc);
    const uint32_t last = static_cast<uint32_t>((hi - cg + sc - 1) / sc);  // exclusive
    const uint64_t mask =
        (last - first == 32) ? 0xffffffffull : ((1ull << (last - first)) - 1) << first;
    switch (kind) {
      case MappingUpdate::Kind::kData:
        if (new_host == old_host && (old & format::kOflagCopied)) {
          bitmap = (bitmap | mask) & ~(mask << 32);  // in place: mark the subclusters written
        } else if (old_has_host || type == ClusterType::kCompressed) {
          // Replacing compressed or shared data: the caller copied the whole cluster.
          if (!whole) co_return Status::Invalid("partial replacement of a host cluster");
          bitmap = 0xffffffffull;
        } else {
          // A fresh cluster: only the written subclusters; the rest keep their zero bits.
          bitmap = mask | (old_bitmap & 0xffffffff00000000ull & ~(mask << 32));
        }
        entry = new_host | format::kOflagCopied;
        break;
      case MappingUpdate::Kind::kCompressed:
        entry =
            format::EncodeCompressed(u.host_offset, u.compressed_length, geometry_.cluster_bits);
        bitmap = 0;  // compressed clusters have no subclusters
        break;
      case MappingUpdate::Kind::kZero:
        if (whole && !u.keep_host) {
          entry = 0;
          bitmap = 0xffffffff00000000ull;
        } else {
          bitmap = (bitmap & ~mask) | (mask << 32);
        }
        break;
      default:  // kUnmap
        if (whole) {
          entry = 0;
          bitmap = 0;
        } else {
          bitmap &= ~(mask | (mask << 32));
        }
        break;
    }
    if (type == ClusterType::kCompressed && entry == old) {
      co_return Status::Unsupported("partial update of a compressed cluster");
    }
  }

  // Release what the old entry referenced and the new one no longer does.
  const uint64_t now_host = format::ClassifyCluster(entry, geometry_) == ClusterType::kCompressed
                                ? Extent::kNoHost
                                : format::L2EntryOffset(entry);
  if (!data_file) {
    if (type == ClusterType::kCompressed && entry != old) {
      auto d = format::DecodeCompressed(old, geometry_.cluster_bits);
      uint64_t first = d.host_offset & ~511ull;
      ReleaseLater(first, (uint64_t(d.extra_sectors) + 1) * 512, /*metadata=*/false);
    } else if (old_has_host && now_host != old_host) {
      ReleaseLater(old_host, cs, /*metadata=*/false);
    }
  }
  format::StoreBE64(p, entry);
  if (geometry_.extended_l2) format::StoreBE64(p + 8, bitmap);
  co_return Status::Ok();
}

}  // namespace qcow2kit
