// Where everything of a new qcow2 image goes, decided the way qemu-img 7.2 decides it
// (qcow2_co_create, then qcow2_co_truncate to the requested size with the requested
// preallocation, reference §2.9-2.10). The allocator model (create_refcount_model.h) replays
// QEMU's allocations; this file replays the calls that make them: the L1 table, and for
// preallocation the L2 tables and data clusters.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "image/create_options.h"
#include "qcow2kit/status.h"

namespace qcow2kit::create_internal {

struct LayoutParams {
  uint32_t cluster_bits = 16;
  uint32_t refcount_order = 4;
  bool extended_l2 = false;
  bool external_data = false;  // data clusters live in a data file at their guest offset
  uint64_t size = 0;           // virtual size, a multiple of 512
  Preallocation preallocation = Preallocation::kOff;
};

// Guest clusters [guest, guest + length) mapped to host [host, host + length).
struct DataRun {
  uint64_t guest = 0;
  uint64_t host = 0;
  uint64_t length = 0;
};

struct Layout {
  uint64_t l1_offset = 0;
  uint32_t l1_size = 0;
  std::vector<uint64_t> l1;  // entries as stored: L2 offset | COPIED, or 0
  uint64_t reftable_offset = 0;
  uint32_t reftable_clusters = 0;
  // Refcount blocks and tables as written, in write order (later writes win).
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> refcount_writes;
  // Clusters the preallocation mapped, in guest order. Their L2 entries are host | COPIED with
  // an empty subcluster bitmap (QEMU's "prealloc" link: reads see zeros or the backing file).
  std::vector<DataRun> runs;
  uint64_t file_length = 0;  // the image file's final length
  // falloc/full: the image file grows from `grow_from` to `grow_to` with that preallocation.
  uint64_t grow_from = 0;
  uint64_t grow_to = 0;
  // Metadata preallocation of a size that ends inside a subcluster: QEMU copies the rest of
  // that subcluster on write, so these bytes are written (with zeros; QEMU copies whatever
  // the backing file has past the end of the new disk) in the file holding the data.
  uint64_t tail_offset = 0;
  uint64_t tail_length = 0;
  // With an external data file: after the tail write (which sets its length), the data file
  // grows from `data_grow_from` to `data_grow_to` with the preallocation.
  uint64_t data_grow_from = 0;
  uint64_t data_grow_to = 0;
};

// Fails with EFBIG where QEMU does (L1 table over 32 MiB, refcount table too large, offsets
// past 2^56).
Result<Layout> PlanQcow2Layout(const LayoutParams& params);

// The contents of L2 table `l1_index` of `layout` (one cluster).
std::vector<uint8_t> BuildL2Table(const Layout& layout, const LayoutParams& params,
                                  uint64_t l1_index);

}  // namespace qcow2kit::create_internal
