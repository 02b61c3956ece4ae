// `stats`: how the guest clusters of a qcow2 image are stored (data, compressed, zero,
// unallocated), how many clusters its metadata takes, and how fragmented its data is.
#pragma once

#include <cstdint>
#include <string>

#include "format/entries.h"
#include "image/qcow2_image.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"
#include "tools/qemu_json.h"

namespace qcow2kit::tools {

struct ClusterCounts {
  uint64_t normal = 0;  // data in a host cluster
  uint64_t compressed = 0;
  uint64_t zero_plain = 0;   // zero flag (all subclusters zero), no host cluster
  uint64_t zero_alloc = 0;   // zero flag with a preallocated host cluster
  uint64_t unallocated = 0;  // reads from the backing file (or zeros)
  // qemu-img check's fragmentation counters: every cluster with host space (normal, zero with
  // a host cluster, compressed) is "allocated"; one is "fragmented" if it is compressed or its
  // host cluster does not follow the previous one's in the same L2 table.
  uint64_t check_allocated = 0;
  uint64_t fragmented = 0;
};

// Classifies L2 entries one at a time (pure; unit tested).
class ClusterCounter {
 public:
  explicit ClusterCounter(const format::Geometry& g) : geometry_(g) {}
  // QEMU restarts the contiguity check at each L2 table.
  void StartTable() { next_contiguous_ = 0; }
  void Add(uint64_t l2_entry, uint64_t l2_bitmap);
  void AddUnallocated(uint64_t clusters) { counts_.unallocated += clusters; }
  const ClusterCounts& counts() const { return counts_; }

 private:
  format::Geometry geometry_;
  ClusterCounts counts_;
  uint64_t next_contiguous_ = 0;
};

struct MetadataClusters {
  uint64_t header = 1;
  uint64_t l1_table = 0;
  uint64_t l2_tables = 0;  // of the active L1 table
  uint64_t refcount_table = 0;
  uint64_t refcount_blocks = 0;
  uint64_t snapshot_table = 0;
  uint64_t snapshot_l1_tables = 0;
  uint64_t bitmap_directory = 0;
  uint64_t total() const {
    return header + l1_table + l2_tables + refcount_table + refcount_blocks + snapshot_table +
           snapshot_l1_tables + bitmap_directory;
  }
};

struct ImageStats {
  std::string filename;
  uint64_t virtual_size = 0;
  uint64_t cluster_size = 0;
  uint64_t guest_clusters = 0;
  ClusterCounts clusters;
  MetadataClusters metadata;
  uint64_t host_file_size = 0;
  uint64_t host_allocated_bytes = 0;  // st_blocks * 512

  double fragmented_percent() const {
    return clusters.check_allocated ? 100.0 * clusters.fragmented / clusters.check_allocated : 0.0;
  }
};

// Reads every L2 table of the active L1 table (through the image's L2 cache).
Task<Result<ImageStats>> ComputeStats(Qcow2Image& img);

Json StatsJson(const ImageStats& s);
std::string StatsHuman(const ImageStats& s);

}  // namespace qcow2kit::tools
