// qemu-img check for qcow2 (see qcow2_check.h), first half: counting the references of every
// structure (with their sanity checks) and the run as a whole; the comparison with the
// refcounts on disk and the COPIED audit are in qcow2_check_compare.cc. The diagnostics are
// QEMU 7.2's, word for word, and come in the same order.
#include "image/qcow2_check.h"

#include <algorithm>
#include <cstring>

#include "fmt/format.h"
#include "format/endian.h"
#include "image/qcow2_check_walk.h"
#include "image/qcow2_image.h"
#include "io/read_ahead.h"

namespace qcow2kit {
namespace {

constexpr uint64_t kMaxL1Bytes = 32ull << 20;          // QCOW_MAX_L1_SIZE
constexpr uint64_t kMaxRefcountArray = 1ull << 30;     // memory a check may take for counting
constexpr uint64_t kMaxRefblockGrowth = 256ull << 20;  // see CheckRefblocks
constexpr uint64_t kBitmapEntryOffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kBitmapEntryReservedMask = 0xff000000000001feull;
constexpr uint64_t kBitmapEntryAllOnes = 1;
constexpr uint64_t kAllAllocBits = 0xffffffffull;  // extended L2 bitmap, low half

}  // namespace

using check_detail::ErrnoText;
using check_detail::L2Tables;
using check_detail::ReadDepth;

Qcow2Checker::Qcow2Checker(Qcow2Image& img, unsigned fix, const CheckLog& log)
    : img_(img), fix_(fix), log_(log), refs_(img.refcount_geometry(), 0) {}

Status Qcow2Checker::Inc(CheckResult& res, uint64_t offset, uint64_t length) {
  if (length == 0) return Status::Ok();
  const uint32_t cb = img_.geometry_.cluster_bits;
  // The last cluster may reach past the end of the file (it is only partly written), but
  // nothing further: that keeps the array within the file's size, whatever a table says.
  if (offset > (1ull << 62) || offset + length >= file_length_ + (1ull << cb)) {
    Log(
        fmt::format("ERROR: counting reference for region exceeding the end of the file by "
                    "one cluster or more: offset 0x{:x} size 0x{:x}",
                    offset, length));
    ++res.corruptions;
    return Status::Ok();
  }
  const uint64_t last = (offset + length - 1) >> cb;
  if (((last + 1) << img_.refcount_geometry_.refcount_order) / 8 > kMaxRefcountArray) {
    ++res.check_errors;
    return Status::Error(ENOMEM, "");
  }
  for (uint64_t c = offset >> cb; c <= last; ++c) {
    if (!refs_.Increment(c)) {
      Log(fmt::format("ERROR: overflow cluster offset=0x{:x}", c << cb));
      Log("Use qemu-img amend to increase the refcount entry width or qemu-img convert to "
          "create a clean copy if the image cannot be opened for writing");
      ++res.corruptions;
    }
  }
  return Status::Ok();
}

Task<Status> Qcow2Checker::FixEntryByZero(uint64_t l2_offset, uint8_t* table, uint64_t index) {
  const format::Geometry& g = img_.geometry_;
  uint8_t* e = table + index * g.l2_entry_bytes();
  if (g.extended_l2) {
    uint64_t bitmap = format::LoadBE64(e + 8);
    bitmap = (bitmap | (bitmap << 32)) & ~kAllAllocBits;  // allocated subclusters become zero
    format::StoreBE64(e, 0);
    format::StoreBE64(e + 8, bitmap);
  } else {
    format::StoreBE64(e, format::kOflagZero);
  }
  const uint64_t at = l2_offset + index * g.l2_entry_bytes();
  Status guard = img_.CheckOverlap(
      at, g.l2_entry_bytes(),
      MetadataMap::Bit(MetadataMap::kActiveL2) | MetadataMap::Bit(MetadataMap::kInactiveL1));
  if (!guard.ok()) co_return co_await img_.MarkCorruptIfNeeded(guard);
  Status s = co_await img_.file_->WriteAt(std::as_bytes(std::span(e, g.l2_entry_bytes())), at);
  if (s.ok()) s = co_await img_.file_->Sync();
  // The cached slice (if any) is stale now.
  img_.l2_cache_->Drop(at / img_.slice_bytes_ * img_.slice_bytes_);
  co_return s;
}

Task<Status> Qcow2Checker::CheckL2(CheckResult& res, uint64_t l2_offset, uint8_t* table,
                                   bool active, unsigned fix) {
  const format::Geometry& g = img_.geometry_;
  const uint32_t cb = g.cluster_bits;
  const uint64_t cs = g.cluster_size();
  const bool data_file = g.has_data_file;
  uint64_t next_contiguous = 0;
  for (uint64_t i = 0; i < g.l2_entries(); ++i) {
    const uint8_t* p = table + i * g.l2_entry_bytes();
    uint64_t entry = format::LoadBE64(p);
    const uint64_t bitmap = g.extended_l2 ? format::LoadBE64(p + 8) : 0;
    const format::ClusterType type = format::ClassifyCluster(entry, g);
    if (type != format::ClusterType::kCompressed && (entry & format::kL2StandardReservedMask)) {
      Log(fmt::format("ERROR found l2 entry with reserved bits set: {:x}", entry));
      ++res.corruptions;
    }
    switch (type) {
      case format::ClusterType::kCompressed: {
        const format::CompressedDescriptor d = format::DecodeCompressed(entry, cb);
        if (entry & format::kOflagCopied) {
          Log(
              fmt::format("ERROR: coffset=0x{:x}: copied flag must never be set for compressed "
                          "clusters",
                          d.host_offset));
          entry &= ~format::kOflagCopied;
          ++res.corruptions;
        }
        if (data_file) {
          Log(fmt::format("ERROR compressed cluster {} with data file, entry=0x{:x}", i, entry));
          ++res.corruptions;
          break;
        }
        if (bitmap) {
          Log(
              fmt::format("ERROR compressed cluster {} with non-zero subcluster allocation "
                          "bitmap, entry=0x{:x}",
                          i, entry));
          ++res.corruptions;
          break;
        }
        QK_CO_RETURN_IF_ERROR(Inc(res, d.host_offset, d.read_bound()));
        if (active) {
          ++res.allocated_clusters;
          ++res.compressed_clusters;
          ++res.fragmented_clusters;  // never contiguous, as QEMU counts them
        }
        break;
      }
      case format::ClusterType::kZeroAlloc:
      case format::ClusterType::kNormal: {
        const uint64_t offset = format::L2EntryOffset(entry);
        if ((bitmap >> 32) & bitmap) {
          ++res.corruptions;
          Log(
              fmt::format("ERROR offset={:x}: Allocated cluster has corrupted subcluster "
                          "allocation bitmap",
                          offset));
        }
        if (offset & (cs - 1)) {
          ++res.corruptions;
          const bool has_data =
              g.extended_l2 ? (bitmap & kAllAllocBits) != 0 : !(entry & format::kOflagZero);
          if (!has_data) {
            Log(
                fmt::format("{} offset={:x}: Preallocated cluster is not properly aligned; L2 "
                            "entry corrupted.",
                            fix & kFixErrors ? "Repairing" : "ERROR", offset));
            if (fix & kFixErrors) {
              // Nothing is lost by making the cluster read as zeros without host space.
              Status s = co_await FixEntryByZero(l2_offset, table, i);
              if (s.ok()) {
                --res.corruptions;
                ++res.corruptions_fixed;
                continue;  // no longer uses a cluster
              }
              Log(fmt::format("ERROR: Failed to overwrite L2 table entry: {}", ErrnoText(s)));
              ++res.check_errors;
            }
          } else {
            Log(
                fmt::format("ERROR offset={:x}: Data cluster is not properly aligned; L2 entry "
                            "corrupted.",
                            offset));
          }
        }
        if (active) {
          ++res.allocated_clusters;
          if (next_contiguous && offset != next_contiguous) ++res.fragmented_clusters;
          next_contiguous = offset + cs;
        }
        if (!data_file) QK_CO_RETURN_IF_ERROR(Inc(res, offset, cs));
        break;
      }
      case format::ClusterType::kZeroPlain:
        break;
      case format::ClusterType::kUnallocated:
        if (bitmap & kAllAllocBits) {
          ++res.corruptions;
          Log("ERROR: Unallocated cluster has non-zero subcluster allocation map");
        }
        break;
    }
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Checker::CheckL1(CheckResult& res, uint64_t l1_offset, uint64_t l1_size,
                                   bool active, unsigned fix) {
  if (l1_size == 0) co_return Status::Ok();
  const uint64_t cs = img_.geometry_.cluster_size();
  QK_CO_RETURN_IF_ERROR(Inc(res, l1_offset, l1_size * 8));
  // The active table is the one read at open (no copy: it can be 32 MiB); a snapshot's is
  // read now.
  std::vector<uint64_t> snapshot_l1;
  if (!active) {
    snapshot_l1.resize(l1_size);
    Status read = co_await img_.file_->ReadZeroPadded(
        std::as_writable_bytes(std::span(snapshot_l1)), l1_offset);
    if (!read.ok()) {
      Log("ERROR: I/O error in check_refcounts_l1");
      ++res.check_errors;
      co_return read;
    }
    for (uint64_t& e : snapshot_l1) e = format::LoadBE64(&e);
  }
  const std::vector<uint64_t>& l1 = active ? img_.l1_ : snapshot_l1;
  ReadAhead reads(img_.file_.get(), L2Tables(l1, cs, false), ReadDepth(cs));
  for (uint64_t e : l1) {
    if (!e) continue;
    if (e & format::kL1ReservedMask) {
      Log(fmt::format("ERROR found L1 entry with reserved bits set: {:x}", e));
      ++res.corruptions;
    }
    const uint64_t l2_offset = format::L1EntryOffset(e);
    QK_CO_RETURN_IF_ERROR(Inc(res, l2_offset, cs));
    if (l2_offset & (cs - 1)) {
      Log(fmt::format("ERROR l2_offset={:x}: Table is not cluster aligned; L1 entry corrupted",
                      l2_offset));
      ++res.corruptions;
    }
    auto table = co_await reads.Next();
    if (!table.ok()) {
      Log("ERROR: I/O error in check_refcounts_l2");
      ++res.check_errors;
      co_return table.status();
    }
    QK_CO_RETURN_IF_ERROR(co_await CheckL2(res, l2_offset, table->data(), active, fix));
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Checker::CountBitmaps(CheckResult& res) {
  const auto& ext = img_.parsed_.bitmaps;
  if (!ext || ext->nb_bitmaps == 0) co_return Status::Ok();
  QK_CO_RETURN_IF_ERROR(Inc(res, ext->directory_offset, ext->directory_size));
  const uint64_t cs = img_.geometry_.cluster_size();
  for (const format::BitmapInfo& b : img_.bitmaps_) {
    QK_CO_RETURN_IF_ERROR(Inc(res, b.table_offset, uint64_t{b.table_size} * 8));
    std::vector<uint64_t> table(b.table_size);
    Status s =
        co_await img_.file_->ReadExact(std::as_writable_bytes(std::span(table)), b.table_offset);
    if (!s.ok()) {
      ++res.corruptions;
      co_return s;
    }
    for (uint64_t& e : table) {
      e = format::LoadBE64(&e);
      const uint64_t offset = e & kBitmapEntryOffsetMask;
      if ((e & kBitmapEntryReservedMask) || (offset & (cs - 1)) ||
          ((e & kBitmapEntryAllOnes) && offset != 0)) {
        ++res.corruptions;
        continue;
      }
      if (offset) QK_CO_RETURN_IF_ERROR(Inc(res, offset, cs));
    }
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Checker::CheckRefblocks(CheckResult& res, unsigned fix, bool* rebuild) {
  const uint64_t cs = img_.geometry_.cluster_size();
  const uint32_t cb = img_.geometry_.cluster_bits;
  for (uint64_t i = 0; i < img_.reftable_.size(); ++i) {
    const uint64_t e = img_.reftable_[i];
    const uint64_t offset = e & format::kRefcountTableOffsetMask;
    const uint64_t cluster = offset >> cb;
    if (e & format::kRefcountTableReservedMask) {
      Log(fmt::format("ERROR refcount table entry {} has reserved bits set", i));
      ++res.corruptions;
      *rebuild = true;
      continue;
    }
    if (offset & (cs - 1)) {
      Log(
          fmt::format("ERROR refcount block {} is not cluster aligned; refcount table entry "
                      "corrupted",
                      i));
      ++res.corruptions;
      *rebuild = true;
      continue;
    }
    if (cluster >= refs_.clusters()) {
      ++res.corruptions;
      Log(fmt::format("{} refcount block {} is outside image",
                      fix & kFixErrors ? "Repairing" : "ERROR", i));
      if (fix & kFixErrors) {
        // Growing the file makes the block part of it (reading as zeros: no refcounts). Only
        // near the end, unlike QEMU: a block far past it is garbage, and growing a sparse
        // file to reach it would make every later pass walk terabytes. The rebuild that
        // follows replaces it instead.
        Status s = Status::Error(EFBIG, "");
        if (offset < file_length_ + std::max<uint64_t>(file_length_, kMaxRefblockGrowth)) {
          s = co_await img_.file_->Truncate(offset + cs);
        }
        if (s.ok()) {
          auto size = img_.file_->Size();
          if (!size.ok()) {
            s = size.status();
          } else {
            file_length_ = *size;
            refs_.Grow((*size + cs - 1) / cs);
          }
        }
        if (s.ok() && cluster < refs_.clusters()) {
          --res.corruptions;
          ++res.corruptions_fixed;
          QK_CO_RETURN_IF_ERROR(Inc(res, offset, cs));
          continue;
        }
        *rebuild = true;
        Log(fmt::format("ERROR could not resize image: {}",
                        ErrnoText(s.ok() ? Status::Error(EINVAL, "") : s)));
      }
      continue;
    }
    if (offset != 0) {
      QK_CO_RETURN_IF_ERROR(Inc(res, offset, cs));
      if (refs_.Get(cluster) != 1) {
        Log(fmt::format("ERROR refcount block {} refcount={}", i, refs_.Get(cluster)));
        ++res.corruptions;
        *rebuild = true;
      }
    }
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Checker::CalculateRefcounts(CheckResult& res, unsigned fix, bool* rebuild) {
  const uint64_t cs = img_.geometry_.cluster_size();
  const format::Header& h = img_.parsed_.header;
  QK_CO_ASSIGN_OR_RETURN(file_length_, img_.file_->Size());
  QK_CO_RETURN_IF_ERROR(Inc(res, 0, cs));
  QK_CO_RETURN_IF_ERROR(co_await CheckL1(res, h.l1_table_offset, h.l1_size, true, fix));
  if (img_.geometry_.has_data_file && !img_.snapshots_.empty()) {
    Log(fmt::format("ERROR {} snapshots in image with data file", img_.snapshots_.size()));
    ++res.corruptions;
  }
  for (const format::Snapshot& sn : img_.snapshots_) {
    if (sn.l1_table_offset & (cs - 1)) {
      Log(
          fmt::format("ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster "
                      "aligned; snapshot table entry corrupted",
                      sn.id, sn.name, sn.l1_table_offset));
      ++res.corruptions;
      continue;
    }
    if (uint64_t{sn.l1_size} > kMaxL1Bytes / 8) {
      Log(
          fmt::format("ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot "
                      "table entry corrupted",
                      sn.id, sn.name, sn.l1_size));
      ++res.corruptions;
      continue;
    }
    QK_CO_RETURN_IF_ERROR(co_await CheckL1(res, sn.l1_table_offset, sn.l1_size, false, fix));
  }
  QK_CO_RETURN_IF_ERROR(Inc(res, h.snapshots_offset, img_.snapshot_table_bytes_));
  QK_CO_RETURN_IF_ERROR(Inc(res, h.refcount_table_offset, img_.reftable_.size() * 8));
  QK_CO_RETURN_IF_ERROR(co_await CountBitmaps(res));
  co_return co_await CheckRefblocks(res, fix, rebuild);
}

Task<Status> Qcow2Checker::CheckRefcounts(CheckResult& res) {
  const uint64_t cs = img_.geometry_.cluster_size();
  QK_CO_ASSIGN_OR_RETURN(uint64_t size, img_.file_->Size());
  uint64_t clusters = (size + cs - 1) / cs;
  if (clusters > 0x7fffffff) {
    ++res.check_errors;
    co_return Status::Error(EFBIG, "");
  }
  refs_ = RefcountArray(img_.refcount_geometry_, clusters);
  res.total_clusters = (img_.size() + cs - 1) / cs;
  bool rebuild = false;
  QK_CO_RETURN_IF_ERROR(co_await CalculateRefcounts(res, fix_, &rebuild));

  // A first comparison without repairs decides whether the structures need a rebuild; the
  // repairs come after (and then the comparison runs again, as QEMU does).
  const CheckResult before_compare = res;
  uint64_t highest = 0;
  QK_CO_RETURN_IF_ERROR(co_await CompareRefcounts(res, kFixNothing, &rebuild, &highest));
  if (rebuild && (fix_ & kFixErrors)) {
    const CheckResult old = res;
    Log("Rebuilding refcount structure");
    QK_CO_RETURN_IF_ERROR(co_await RebuildRefcounts(res));
    res.corruptions = 0;
    res.leaks = 0;
    // The old structures are leaked now: count again and free them.
    rebuild = false;
    refs_.Clear();
    QK_CO_RETURN_IF_ERROR(co_await CalculateRefcounts(res, kFixNothing, &rebuild));
    uint64_t fresh_leaks = 0;
    refs_match_disk_ = false;  // until a comparison against the new structures
    if (fix_ & kFixLeaks) {
      const CheckResult saved = res;
      res = CheckResult{};
      QK_CO_RETURN_IF_ERROR(co_await CompareRefcounts(res, kFixLeaks, &rebuild, &highest));
      if (rebuild) Log("ERROR rebuilt refcount structure is still broken");
      fresh_leaks = res.leaks;
      res = saved;
    }
    if (res.corruptions < old.corruptions) {
      res.corruptions_fixed += old.corruptions - res.corruptions;
    }
    if (res.leaks < old.leaks) res.leaks_fixed += old.leaks - res.leaks;
    res.leaks += fresh_leaks;
  } else if (fix_) {
    if (rebuild) {
      Log("ERROR need to rebuild refcount structures");
      ++res.check_errors;
      co_return Status::Error(EIO, "");
    }
    if (res.leaks || res.corruptions) {
      res = before_compare;
      QK_CO_RETURN_IF_ERROR(co_await CompareRefcounts(res, fix_, &rebuild, &highest));
    }
  }
  if (fix_) {
    // Refcount repairs before the COPIED audit reads them back, and durable.
    QK_CO_RETURN_IF_ERROR(co_await img_.refcount_cache_->WriteBack());
    QK_CO_RETURN_IF_ERROR(co_await img_.SyncFiles());
  }
  QK_CO_RETURN_IF_ERROR(co_await CheckCopied(res, fix_));
  res.image_end_offset = (highest + 1) * cs;
  refs_ = RefcountArray(img_.refcount_geometry_, 0);  // frees it
  co_return Status::Ok();
}

Task<Result<CheckResult>> Qcow2Image::Check(unsigned fix, const CheckLog& log) {
  if (fix && !file_->writable()) {
    co_return Status::Error(EROFS, "the image must be opened read-write to be repaired");
  }
  auto guard = co_await meta_lock_.Lock();
  Qcow2Checker checker(*this, fix, log);
  CheckResult snapshot_res;
  Status s = co_await checker.ReadSnapshotTable(snapshot_res);
  if (!s.ok()) co_return s;
  CheckResult res;
  s = co_await checker.CheckRefcounts(res);
  if (!s.ok()) co_return s;
  s = co_await checker.FixSnapshotTable(snapshot_res);
  if (!s.ok()) co_return s;
  res.corruptions += snapshot_res.corruptions;
  res.leaks += snapshot_res.leaks;
  res.check_errors += snapshot_res.check_errors;
  res.corruptions_fixed += snapshot_res.corruptions_fixed;
  res.leaks_fixed += snapshot_res.leaks_fixed;
  if (fix && res.check_errors == 0 && res.corruptions == 0) {
    // Consistent again: neither dirty nor corrupt.
    QK_CO_RETURN_IF_ERROR(co_await SetIncompatibleBit(format::kIncompatDirty, false));
    QK_CO_RETURN_IF_ERROR(co_await SetIncompatibleBit(format::kIncompatCorrupt, false));
  }
  co_return res;
}

}  // namespace qcow2kit
