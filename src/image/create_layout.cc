// The creation sequence of QEMU 7.2 replayed on the allocator model: qcow2_co_create reserves
// clusters 0-2, qcow2_co_truncate grows the L1 table exactly and preallocates
// (preallocate_co / qcow2_alloc_host_offset for metadata, qcow2_refcount_area plus a
// contiguous data area for falloc and full).
#include "image/create_layout.h"

#include <algorithm>
#include <cerrno>

#include "format/endian.h"
#include "format/entries.h"
#include "image/create_refcount_model.h"

namespace qcow2kit::create_internal {
namespace {

constexpr uint64_t kMaxL1Entries = (32ull << 20) / 8;  // QCOW_MAX_L1_SIZE
constexpr uint64_t kIntMax = 0x7fffffff;
constexpr uint64_t kRequestMaxBytes = kIntMax & ~511ull;  // BDRV_REQUEST_MAX_BYTES
constexpr uint64_t kInvalidOffset = ~0ull;

uint64_t DivRoundUp(uint64_t a, uint64_t b) {
  return a / b + (a % b != 0);
}

class Planner {
 public:
  explicit Planner(const LayoutParams& p)
      : p_(p),
        rc_(p.cluster_bits, p.refcount_order),
        cluster_size_(1ull << p.cluster_bits),
        l2_entries_(cluster_size_ / (p.extended_l2 ? 16 : 8)) {}

  Result<Layout> Run();

 private:
  Status GetClusterTable(uint64_t guest_offset);
  Status AllocHostOffset(uint64_t offset, uint64_t* bytes, uint64_t* host_offset);
  Result<bool> HandleAlloc(uint64_t guest_offset, uint64_t* host_offset, uint64_t* bytes);
  Status PreallocateMetadata();
  Status PreallocateDataArea();
  void Link(uint64_t guest, uint64_t host, uint64_t clusters);
  uint64_t InCluster(uint64_t offset) const { return offset & (cluster_size_ - 1); }

  const LayoutParams& p_;
  RefcountModel rc_;
  const uint64_t cluster_size_;
  const uint64_t l2_entries_;
  Layout out_;
};

Result<Layout> Planner::Run() {
  QK_ASSIGN_OR_RETURN(uint64_t first, rc_.AllocClusters(3 * cluster_size_));
  if (first != 0) return Status::Corrupt("first cluster in empty image is already in use");

  const uint64_t l1_size = DivRoundUp(p_.size, l2_entries_ << p_.cluster_bits);
  if (l1_size > kMaxL1Entries) return Status::Error(EFBIG, "File too large");
  if (l1_size > 0) {
    QK_ASSIGN_OR_RETURN(out_.l1_offset, rc_.AllocClusters(l1_size * 8));
    rc_.NoteWrite(out_.l1_offset, l1_size * 8);  // written unpadded, as QEMU does
  }
  out_.l1_size = static_cast<uint32_t>(l1_size);
  out_.l1.assign(l1_size, 0);

  if (p_.external_data) {
    if (p_.preallocation == Preallocation::kOff) {
      out_.data_grow_to = p_.size;
    } else {
      QK_RETURN_IF_ERROR(PreallocateMetadata());  // the data file gets the preallocation
    }
  } else if (p_.preallocation == Preallocation::kMetadata) {
    QK_RETURN_IF_ERROR(PreallocateMetadata());
  } else if (p_.preallocation != Preallocation::kOff) {
    QK_RETURN_IF_ERROR(PreallocateDataArea());
  }

  out_.reftable_offset = rc_.table_offset();
  out_.reftable_clusters = rc_.table_clusters();
  out_.refcount_writes = rc_.Writes();
  out_.file_length = rc_.file_length();
  return std::move(out_);
}

// get_cluster_table: allocates the L2 table of `guest_offset` if the L1 entry has none.
Status Planner::GetClusterTable(uint64_t guest_offset) {
  const uint64_t l1_index = (guest_offset >> p_.cluster_bits) / l2_entries_;
  if (l1_index >= out_.l1.size()) return Status::Corrupt("guest offset past the L1 table");
  if (out_.l1[l1_index] & format::kOflagCopied) return Status::Ok();
  QK_ASSIGN_OR_RETURN(uint64_t l2_offset, rc_.AllocClusters(cluster_size_));
  if (l2_offset == 0) return Status::Corrupt("Preventing invalid allocation of L2 table");
  rc_.NoteWrite(l2_offset, cluster_size_);
  out_.l1[l1_index] = l2_offset | format::kOflagCopied;
  return Status::Ok();
}

void Planner::Link(uint64_t guest, uint64_t host, uint64_t clusters) {
  const uint64_t length = clusters * cluster_size_;
  if (!out_.runs.empty()) {
    DataRun& last = out_.runs.back();
    if (last.guest + last.length == guest && last.host + last.length == host) {
      last.length += length;
      return;
    }
  }
  out_.runs.push_back({guest, host, length});
}

// handle_alloc for a range no cluster of which is allocated yet. Returns false when the
// allocation cannot continue contiguously at *host_offset.
Result<bool> Planner::HandleAlloc(uint64_t guest_offset, uint64_t* host_offset, uint64_t* bytes) {
  const uint64_t in_cluster = InCluster(guest_offset);
  uint64_t count = DivRoundUp(in_cluster + *bytes, cluster_size_);
  const uint64_t l2_index = (guest_offset >> p_.cluster_bits) % l2_entries_;
  count = std::min(count, l2_entries_ - l2_index);  // stop at the L2 table's end
  count = std::min(count, kRequestMaxBytes >> p_.cluster_bits);

  uint64_t alloc =
      *host_offset == kInvalidOffset ? kInvalidOffset : *host_offset & ~(cluster_size_ - 1);
  if (p_.external_data) {
    alloc = guest_offset - in_cluster;  // data lives at its guest offset
  } else if (alloc == kInvalidOffset) {
    QK_ASSIGN_OR_RETURN(alloc, rc_.AllocClusters(count * cluster_size_));
  } else {
    QK_ASSIGN_OR_RETURN(count, rc_.AllocClustersAt(alloc, count));
  }
  if (count == 0) {
    *bytes = 0;
    return false;
  }
  const uint64_t requested = *bytes + in_cluster;
  const uint64_t available = count << p_.cluster_bits;
  *host_offset = alloc + in_cluster;
  *bytes = std::min(*bytes, std::min(requested, available) - in_cluster);
  Link(guest_offset - in_cluster, alloc, count);
  return true;
}

// qcow2_alloc_host_offset over a range of a new image (nothing is allocated yet, so
// handle_copied only makes sure the L2 table exists).
Status Planner::AllocHostOffset(uint64_t offset, uint64_t* bytes, uint64_t* host_offset) {
  uint64_t start = offset;
  uint64_t remaining = *bytes;
  uint64_t cluster_offset = kInvalidOffset;
  uint64_t cur = 0;
  *host_offset = kInvalidOffset;
  for (;;) {
    if (*host_offset == kInvalidOffset && cluster_offset != kInvalidOffset) {
      *host_offset = cluster_offset;
    }
    start += cur;
    remaining -= cur;
    if (cluster_offset != kInvalidOffset) cluster_offset += cur;
    if (remaining == 0) break;
    cur = remaining;
    QK_RETURN_IF_ERROR(GetClusterTable(start));
    QK_ASSIGN_OR_RETURN(bool progressed, HandleAlloc(start, &cluster_offset, &cur));
    if (!progressed) break;
  }
  *bytes -= remaining;
  return Status::Ok();
}

// preallocate_co from 0 to the size: L2 tables and data clusters as a sequence of allocating
// writes, then the (data) file extended over the last one.
Status Planner::PreallocateMetadata() {
  const uint64_t chunk = kIntMax / cluster_size_ * cluster_size_;
  uint64_t offset = 0;
  uint64_t bytes = p_.size;
  uint64_t host_offset = 0;
  uint64_t cur = 0;
  while (bytes) {
    cur = std::min(bytes, chunk);
    QK_RETURN_IF_ERROR(AllocHostOffset(offset, &cur, &host_offset));
    bytes -= cur;
    offset += cur;
  }
  // The last allocating "write" ends inside a subcluster: QEMU's copy-on-write fills the
  // rest of that subcluster (perform_cow), which also sets the file length.
  const uint64_t subcluster = p_.extended_l2 ? cluster_size_ / 32 : cluster_size_;
  uint64_t data_length = 0;
  if (p_.size % subcluster != 0) {
    const DataRun& last = out_.runs.back();
    out_.tail_offset = last.host + (p_.size - last.guest);
    out_.tail_length = subcluster - p_.size % subcluster;
    data_length = out_.tail_offset + out_.tail_length;
    if (!p_.external_data) rc_.NoteWrite(out_.tail_offset, out_.tail_length);
  }
  // Then the file is extended over the last allocation if it does not reach that far yet.
  const uint64_t end = host_offset + cur;
  if (p_.external_data) {
    out_.data_grow_from = data_length;
    out_.data_grow_to = std::max(end, data_length);
  } else if (end > rc_.file_length()) {
    rc_.NoteWrite(0, end);
  }
  return Status::Ok();
}

// qcow2_co_truncate for falloc/full: refcount structures for the whole new area first, the
// data clusters contiguously after them, then the L2 tables wherever they fit.
Status Planner::PreallocateDataArea() {
  uint64_t old_file_size = rc_.file_length();
  const int64_t last = rc_.LastUsedCluster(old_file_size);
  old_file_size = last >= 0 ? (static_cast<uint64_t>(last) + 1) * cluster_size_
                            : DivRoundUp(old_file_size, cluster_size_) * cluster_size_;
  const uint64_t data_clusters = DivRoundUp(p_.size, cluster_size_);
  const uint64_t l2_tables = DivRoundUp(data_clusters, l2_entries_) + 1;
  QK_ASSIGN_OR_RETURN(uint64_t start,
                      rc_.RefcountArea(old_file_size, data_clusters + l2_tables, true));
  QK_ASSIGN_OR_RETURN(uint64_t got, rc_.AllocClustersAt(start, data_clusters));
  if (got != data_clusters) return Status::Corrupt("preallocated data area is not free");
  out_.grow_from = rc_.file_length();
  out_.grow_to = start + data_clusters * cluster_size_;
  rc_.NoteWrite(0, out_.grow_to);

  uint64_t guest = 0;
  uint64_t host = start;
  for (uint64_t left = data_clusters; left > 0;) {
    const uint64_t n = std::min(left, l2_entries_ - (guest >> p_.cluster_bits) % l2_entries_);
    QK_RETURN_IF_ERROR(GetClusterTable(guest));
    Link(guest, host, n);
    guest += n * cluster_size_;
    host += n * cluster_size_;
    left -= n;
  }
  return Status::Ok();
}

}  // namespace

Result<Layout> PlanQcow2Layout(const LayoutParams& params) {
  return Planner(params).Run();
}

std::vector<uint8_t> BuildL2Table(const Layout& layout, const LayoutParams& params,
                                  uint64_t l1_index) {
  const uint64_t cluster_size = 1ull << params.cluster_bits;
  const uint64_t entry_bytes = params.extended_l2 ? 16 : 8;
  const uint64_t coverage = cluster_size / entry_bytes * cluster_size;
  const uint64_t first = l1_index * coverage;
  const uint64_t end = first + coverage;
  std::vector<uint8_t> table(cluster_size, 0);
  auto run = std::partition_point(layout.runs.begin(), layout.runs.end(),
                                  [&](const DataRun& r) { return r.guest + r.length <= first; });
  for (; run != layout.runs.end() && run->guest < end; ++run) {
    const uint64_t from = std::max(run->guest, first);
    const uint64_t to = std::min(run->guest + run->length, end);
    for (uint64_t g = from; g < to; g += cluster_size) {
      const uint64_t index = (g - first) >> params.cluster_bits;
      format::StoreBE64(&table[index * entry_bytes],
                        (run->host + (g - run->guest)) | format::kOflagCopied);
    }
  }
  return table;
}

}  // namespace qcow2kit::create_internal
