#include "tools/stats.h"

#include <algorithm>

#include "fmt/format.h"
#include "format/endian.h"
#include "io/read_ahead.h"

namespace qcow2kit::tools {
namespace {

constexpr uint64_t kZeroBits = 0xffffffff00000000ull;

uint64_t ClustersFor(uint64_t bytes, uint64_t cluster_size) {
  return (bytes + cluster_size - 1) / cluster_size;
}

}  // namespace

void ClusterCounter::Add(uint64_t entry, uint64_t bitmap) {
  using format::ClusterType;
  const uint64_t host = format::L2EntryOffset(entry);
  ClusterType type = format::ClassifyCluster(entry, geometry_);
  if (geometry_.extended_l2 && type != ClusterType::kCompressed &&
      (bitmap & kZeroBits) == kZeroBits) {
    // Extended L2 has no cluster zero flag: a cluster whose subclusters all read as zeros is
    // reported as a zero cluster.
    type = host ? ClusterType::kZeroAlloc : ClusterType::kZeroPlain;
  }
  switch (type) {
    case ClusterType::kUnallocated:
      ++counts_.unallocated;
      return;
    case ClusterType::kZeroPlain:
      ++counts_.zero_plain;
      return;
    case ClusterType::kCompressed:
      ++counts_.compressed;
      ++counts_.check_allocated;
      ++counts_.fragmented;  // never contiguous, as QEMU counts them
      return;
    case ClusterType::kZeroAlloc:
      ++counts_.zero_alloc;
      break;
    case ClusterType::kNormal:
      ++counts_.normal;
      break;
  }
  ++counts_.check_allocated;
  if (next_contiguous_ && host != next_contiguous_) ++counts_.fragmented;
  next_contiguous_ = host + geometry_.cluster_size();
}

Task<Result<ImageStats>> ComputeStats(Qcow2Image& img) {
  const format::Header& h = img.header();
  const format::Geometry& g = img.geometry();
  const uint64_t cs = g.cluster_size();
  ImageStats s;
  s.filename = img.filename();
  s.virtual_size = h.size;
  s.cluster_size = cs;
  s.guest_clusters = ClustersFor(h.size, cs);
  QK_CO_ASSIGN_OR_RETURN(s.host_file_size, img.file(0)->Size());
  QK_CO_ASSIGN_OR_RETURN(s.host_allocated_bytes, img.file(0)->AllocatedBytes());

  ClusterCounter counter(g);
  const uint64_t per_table = g.l2_entries();
  const uint64_t entry_bytes = g.l2_entry_bytes();
  const std::vector<uint64_t>& l1 = img.l1_table();
  const uint64_t tables = std::min<uint64_t>(l1.size(), ClustersFor(s.guest_clusters, per_table));
  // The L2 tables are read straight from the file, several at a time, not through the cache:
  // a walk over every table of a huge image would only churn it.
  uint64_t next = 0;
  ReadAhead reads(
      img.file(0),
      [&](ByteRange* r) {
        for (; next < tables; ++next) {
          if (format::L1EntryOffset(l1[next])) {
            *r = {format::L1EntryOffset(l1[next++]), cs};
            return true;
          }
        }
        return false;
      },
      static_cast<unsigned>(std::clamp<uint64_t>((1ull << 20) / cs, 2, 32)));
  uint64_t cluster = 0;
  for (uint64_t i = 0; i < tables; ++i) {
    const uint64_t in_table = std::min(per_table, s.guest_clusters - cluster);
    QK_CO_RETURN_IF_ERROR(format::ValidateL1Entry(l1[i], i, g));
    if (format::L1EntryOffset(l1[i]) == 0) {
      counter.AddUnallocated(in_table);
    } else {
      ++s.metadata.l2_tables;
      auto table = co_await reads.Next();
      if (!table.ok()) co_return table.status();
      counter.StartTable();
      for (uint64_t j = 0; j < in_table; ++j) {
        const uint8_t* e = table->data() + j * entry_bytes;
        counter.Add(format::LoadBE64(e), entry_bytes > 8 ? format::LoadBE64(e + 8) : 0);
      }
    }
    cluster += in_table;
  }
  counter.AddUnallocated(s.guest_clusters - cluster);  // past the end of the L1 table
  s.clusters = counter.counts();

  MetadataClusters& m = s.metadata;
  m.l1_table = ClustersFor(uint64_t{h.l1_size} * 8, cs);
  m.refcount_table = h.refcount_table_clusters;
  m.refcount_blocks =
      std::count_if(img.refcount_table().begin(), img.refcount_table().end(),
                    [](uint64_t e) { return (e & format::kRefcountTableOffsetMask) != 0; });
  uint64_t snapshot_bytes = 0;
  for (const auto& snap : img.snapshots()) {
    // Fixed part, extra data, id and name, padded to 8 (as the table stores them).
    snapshot_bytes += (format::kSnapshotFixedSize + snap.extra_data.size() + snap.id.size() +
                       snap.name.size() + 7) /
                      8 * 8;
    m.snapshot_l1_tables += ClustersFor(uint64_t{snap.l1_size} * 8, cs);
  }
  m.snapshot_table = ClustersFor(snapshot_bytes, cs);
  if (img.parsed().bitmaps)
    m.bitmap_directory = ClustersFor(img.parsed().bitmaps->directory_size, cs);
  co_return s;
}

Json StatsJson(const ImageStats& s) {
  const ClusterCounts& c = s.clusters;
  const MetadataClusters& m = s.metadata;
  Json j = Json::object();
  j["filename"] = s.filename;
  j["virtual-size"] = s.virtual_size;
  j["cluster-size"] = s.cluster_size;
  j["guest-clusters"] = s.guest_clusters;
  j["allocated-clusters"] = c.normal;
  j["compressed-clusters"] = c.compressed;
  j["zero-clusters"] = c.zero_plain + c.zero_alloc;
  j["zero-plain-clusters"] = c.zero_plain;
  j["zero-alloc-clusters"] = c.zero_alloc;
  j["unallocated-clusters"] = c.unallocated;
  j["metadata-clusters"] = {{"header", m.header},
                            {"l1-table", m.l1_table},
                            {"l2-tables", m.l2_tables},
                            {"refcount-table", m.refcount_table},
                            {"refcount-blocks", m.refcount_blocks},
                            {"snapshot-table", m.snapshot_table},
                            {"snapshot-l1-tables", m.snapshot_l1_tables},
                            {"bitmap-directory", m.bitmap_directory},
                            {"total", m.total()}};
  j["host-file-size"] = s.host_file_size;
  j["host-allocated-size"] = s.host_allocated_bytes;
  j["fragmented-clusters"] = c.fragmented;
  j["fragmentation-percent"] = s.fragmented_percent();
  return j;
}

std::string StatsHuman(const ImageStats& s) {
  const ClusterCounts& c = s.clusters;
  const MetadataClusters& m = s.metadata;
  std::string out;
  out += fmt::format("image: {}\n", s.filename);
  out += fmt::format("virtual size: {} bytes, cluster size {} bytes, {} guest clusters\n",
                     s.virtual_size, s.cluster_size, s.guest_clusters);
  out += "Guest clusters:\n";
  out += fmt::format("    allocated data clusters: {}\n", c.normal);
  out += fmt::format("    compressed clusters: {}\n", c.compressed);
  out += fmt::format("    zero clusters: {} (without host cluster {}, preallocated {})\n",
                     c.zero_plain + c.zero_alloc, c.zero_plain, c.zero_alloc);
  out += fmt::format("    unallocated clusters: {}\n", c.unallocated);
  out += fmt::format("Metadata clusters: {}\n", m.total());
  out += fmt::format("    header: {}\n", m.header);
  out += fmt::format("    L1 table: {}\n", m.l1_table);
  out += fmt::format("    L2 tables: {}\n", m.l2_tables);
  out += fmt::format("    refcount table: {}\n", m.refcount_table);
  out += fmt::format("    refcount blocks: {}\n", m.refcount_blocks);
  out += fmt::format("    snapshot table: {}\n", m.snapshot_table);
  out += fmt::format("    snapshot L1 tables: {}\n", m.snapshot_l1_tables);
  out += fmt::format("    bitmap directory: {}\n", m.bitmap_directory);
  out += fmt::format("Host file size: {} bytes ({} on disk)\n", s.host_file_size,
                     s.host_allocated_bytes);
  out += fmt::format("Fragmentation: {:.2f}% ({} of {} clusters with host space)\n",
                     s.fragmented_percent(), c.fragmented, c.check_allocated);
  return out;
}

}  // namespace qcow2kit::tools
