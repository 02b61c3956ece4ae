// Repair of an image left dirty by a crash with lazy refcounts (DESIGN.md rule 6): on the
// next read-write open every refcount is recomputed from the metadata that references
// clusters and corrected in place, as QEMU does with `qemu-img check -r all` on open.
//
// In-place repair is possible because refcount blocks and refcount-table entries are written
// even with lazy refcounts (qcow2_flush.cc; QEMU writes new refcount blocks eagerly too), so
// every cluster in use is covered by a refcount block on disk. If one is not, or the metadata
// points outside the file, the image needs more than this and we say so.
#include <algorithm>

#include "fmt/format.h"
#include "format/endian.h"
#include "image/qcow2_image.h"

namespace qcow2kit {
namespace {

constexpr char kFullRepair[] = "; run 'qemu-img check -r all' on it";

}  // namespace

// References per host cluster, counted from the metadata, and the clusters the active tables
// mark COPIED (which must come out with exactly one reference).
class Qcow2Image::ReferenceCounter {
 public:
  ReferenceCounter(uint64_t cluster_size, uint64_t file_clusters)
      : cs_(cluster_size), refs_(file_clusters, 0) {}

  Status Add(uint64_t offset, uint64_t length, const char* what) {
    if (length == 0) return Status::Ok();
    const uint64_t first = offset / cs_, last = (offset + length - 1) / cs_;
    if (offset + length < offset || last >= refs_.size()) {
      return Status::Corrupt(fmt::format("{} at {:#x} lies past the end of the file{}", what,
                                         offset, kFullRepair));
    }
    for (uint64_t c = first; c <= last; ++c) ++refs_[c];
    return Status::Ok();
  }
  const std::vector<uint32_t>& refs() const { return refs_; }
  std::vector<uint64_t> copied;  // host offsets

 private:
  uint64_t cs_;
  std::vector<uint32_t> refs_;
};

Task<Status> Qcow2Image::CountTableReferences(uint64_t l1_offset, uint64_t l1_size,
                                              bool active, ReferenceCounter& counter) {
  const uint64_t cs = geometry_.cluster_size();
  QK_CO_RETURN_IF_ERROR(counter.Add(l1_offset, l1_size * 8, "an L1 table"));
  std::vector<uint64_t> l1(l1_size);
  if (active) {
    l1 = l1_;
  } else {
    QK_CO_RETURN_IF_ERROR(
        co_await file_->ReadExact(std::as_writable_bytes(std::span(l1)), l1_offset));
    for (auto& e : l1) e = format::LoadBE64(&e);
  }
  const uint32_t step = geometry_.extended_l2 ? 2 : 1;
  for (uint64_t l1e : l1) {
    const uint64_t table = format::L1EntryOffset(l1e);
    if (table == 0) continue;
    QK_CO_RETURN_IF_ERROR(counter.Add(table, cs, "an L2 table"));
    if (active && (l1e & format::kOflagCopied)) counter.copied.push_back(table);
    QK_CO_ASSIGN_OR_RETURN(std::vector<uint64_t> l2, co_await ReadL2Table(table));
    for (size_t i = 0; i < l2.size(); i += step) {
      const uint64_t entry = l2[i];
      const format::ClusterType type = format::ClassifyCluster(entry, geometry_);
      if (type == format::ClusterType::kCompressed) {
        auto d = format::DecodeCompressed(entry, geometry_.cluster_bits);
        QK_CO_RETURN_IF_ERROR(counter.Add(d.host_offset & ~511ull,
                                          (uint64_t(d.extra_sectors) + 1) * 512,
                                          "a compressed cluster"));
        continue;
      }
      const uint64_t host = format::L2EntryOffset(entry);
      if (host != 0 && !geometry_.has_data_file) {
        QK_CO_RETURN_IF_ERROR(counter.Add(host, cs, "a data cluster"));
        if (active && (entry & format::kOflagCopied)) counter.copied.push_back(host);
      }
    }
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::RepairRefcounts() {
  const uint64_t cs = geometry_.cluster_size();
  const format::Header& h = parsed_.header;
  auto length = file_->Size();
  if (!length.ok()) co_return length.status();
  const uint64_t clusters = (*length + cs - 1) / cs;
  ReferenceCounter counter(cs, clusters);
  QK_CO_RETURN_IF_ERROR(counter.Add(0, cs, "the header"));
  QK_CO_RETURN_IF_ERROR(co_await CountTableReferences(h.l1_table_offset, h.l1_size, true,
                                                      counter));
  for (const format::Snapshot& s : snapshots_) {
    QK_CO_RETURN_IF_ERROR(
        co_await CountTableReferences(s.l1_table_offset, s.l1_size, false, counter));
  }
  QK_CO_RETURN_IF_ERROR(counter.Add(h.snapshots_offset, snapshot_table_bytes_,
                                    "the snapshot table"));
  QK_CO_RETURN_IF_ERROR(counter.Add(h.refcount_table_offset,
                                    uint64_t(h.refcount_table_clusters) * cs,
                                    "the refcount table"));
  for (uint64_t e : reftable_) {
    const uint64_t block = e & format::kRefcountTableOffsetMask;
    if (block != 0) QK_CO_RETURN_IF_ERROR(counter.Add(block, cs, "a refcount block"));
  }
  if (parsed_.bitmaps) {
    QK_CO_RETURN_IF_ERROR(counter.Add(parsed_.bitmaps->directory_offset,
                                      parsed_.bitmaps->directory_size, "the bitmap directory"));
    for (const format::BitmapInfo& b : bitmaps_) {
      QK_CO_RETURN_IF_ERROR(counter.Add(b.table_offset, uint64_t(b.table_size) * 8,
                                        "a bitmap table"));
      std::vector<uint64_t> table(b.table_size);
      QK_CO_RETURN_IF_ERROR(
          co_await file_->ReadExact(std::as_writable_bytes(std::span(table)), b.table_offset));
      for (uint64_t e : table) {
        const uint64_t data = format::LoadBE64(&e) & 0x00fffffffffffe00ull;
        if (data != 0) QK_CO_RETURN_IF_ERROR(counter.Add(data, cs, "bitmap data"));
      }
    }
  }

  // A COPIED cluster with other references would be written in place under a snapshot.
  for (uint64_t host : counter.copied) {
    if (counter.refs()[host / cs] != 1) {
      co_return Status::Corrupt(fmt::format("cluster {:#x} is marked COPIED but has {} "
                                            "references{}",
                                            host, counter.refs()[host / cs], kFullRepair));
    }
  }
  // Correct every refcount that differs (and only those: most are right).
  uint64_t fixed = 0;
  for (uint64_t c = 0; c < clusters; ++c) {
    const uint64_t want = counter.refs()[c];
    QK_CO_ASSIGN_OR_RETURN(uint64_t have, co_await Refcount(c * cs));
    if (have == want) continue;
    const uint64_t ti = refcount_geometry_.table_index(c * cs);
    if (ti >= reftable_.size() || (reftable_[ti] & format::kRefcountTableOffsetMask) == 0) {
      co_return Status::Corrupt(fmt::format(
          "cluster {:#x} is in use but no refcount block covers it{}", c * cs, kFullRepair));
    }
    QK_CO_RETURN_IF_ERROR(co_await UpdateRefcounts(c * cs, cs, int64_t(want) - int64_t(have)));
    ++fixed;
  }
  QK_CO_RETURN_IF_ERROR(co_await refcount_cache_->WriteBack());
  QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
  QK_CO_RETURN_IF_ERROR(co_await SetIncompatibleBit(format::kIncompatDirty, false));
  repaired_refcounts_ = fixed;
  co_return Status::Ok();
}

}  // namespace qcow2kit
