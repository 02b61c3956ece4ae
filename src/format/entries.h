// L1 / L2 table entries, cluster and subcluster classification, and the compressed-cluster
// descriptor. Pure functions over the 64-bit (or 128-bit extended) entries.
#pragma once

#include <cstdint>
#include <string>

#include "qcow2kit/status.h"

namespace qcow2kit::format {

inline constexpr uint64_t kOflagCopied = 1ull << 63;
inline constexpr uint64_t kOflagCompressed = 1ull << 62;
inline constexpr uint64_t kOflagZero = 1ull << 0;
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kL2StandardReservedMask = 0x3f000000000001feull;
inline constexpr uint64_t kRefcountTableOffsetMask = 0xfffffffffffffe00ull;
inline constexpr uint64_t kRefcountTableReservedMask = 0x1ffull;
inline constexpr uint32_t kSubclustersPerCluster = 32;

// The cluster/table geometry that entry interpretation depends on.
struct Geometry {
  uint32_t cluster_bits = 16;
  bool extended_l2 = false;
  bool has_data_file = false;

  uint64_t cluster_size() const { return 1ull << cluster_bits; }
  uint32_t l2_entry_bytes() const { return extended_l2 ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_size() / l2_entry_bytes(); }  // per table
  uint64_t subcluster_size() const {
    return extended_l2 ? cluster_size() / kSubclustersPerCluster : cluster_size();
  }
  // Guest bytes covered by one L2 table.
  uint64_t l2_coverage() const { return l2_entries() << cluster_bits; }
};

enum class ClusterType : uint8_t {
  kUnallocated,  // offset 0: reads from the backing file (or zeros)
  kZeroPlain,    // zero flag, no host cluster
  kZeroAlloc,    // zero flag with a preallocated host cluster
  kNormal,       // data at a host cluster
  kCompressed,
};

enum class SubclusterType : uint8_t {
  kUnallocatedPlain,  // no host cluster; backing / zeros
  kUnallocatedAlloc,  // host cluster reserved, this subcluster not yet written: backing / zeros
  kZeroPlain,
  kZeroAlloc,
  kNormal,
  kCompressed,
  kInvalid,  // violates the spec (both alloc and zero bits, alloc bits without a host cluster,
             // compressed with a non-zero bitmap)
};

// QEMU's qcow2_get_cluster_type order: compressed, zero flag (standard L2 only), offset 0
// (normal with the COPIED bit only for an external data file), normal.
ClusterType ClassifyCluster(uint64_t l2_entry, const Geometry& g);
// Subcluster `index` (0..31) of an extended entry, or the whole cluster for a standard one
// (bitmap ignored, index must be 0).
SubclusterType ClassifySubcluster(uint64_t l2_entry, uint64_t l2_bitmap, uint32_t index,
                                  const Geometry& g);
// Host cluster offset of a normal / zero-alloc entry.
inline uint64_t L2EntryOffset(uint64_t l2_entry) { return l2_entry & kL2OffsetMask; }
inline uint64_t L1EntryOffset(uint64_t l1_entry) { return l1_entry & kL1OffsetMask; }

// Checks an L1 entry: reserved bits, alignment. Message names `l1_index` and the entry in hex.
Status ValidateL1Entry(uint64_t l1_entry, uint64_t l1_index, const Geometry& g);
// Checks an L2 entry (+bitmap for extended L2): reserved bits, cluster alignment of the host
// offset, compressed descriptors in images with a data file, invalid subcluster bitmaps, zero
// flag in v2 (`version` 2). `guest_offset` names the place in messages.
Status ValidateL2Entry(uint64_t l2_entry, uint64_t l2_bitmap, uint64_t guest_offset,
                       uint32_t version, const Geometry& g);

// Compressed cluster descriptor (reference §1.6).
struct CompressedDescriptor {
  uint64_t host_offset = 0;    // byte offset of the stream, not aligned
  uint32_t extra_sectors = 0;  // additional 512-byte sectors after the first one
  // Upper bound of the stream length: (extra_sectors + 1) * 512 - host_offset % 512.
  uint64_t read_bound() const { return (uint64_t(extra_sectors) + 1) * 512 - host_offset % 512; }
};
CompressedDescriptor DecodeCompressed(uint64_t l2_entry, uint32_t cluster_bits);
// Entry (with kOflagCompressed) for a stream of `length` bytes at `host_offset`.
uint64_t EncodeCompressed(uint64_t host_offset, uint64_t length, uint32_t cluster_bits);

}  // namespace qcow2kit::format
