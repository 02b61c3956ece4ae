// L1/L2 entry classification and validation, compressed descriptors (reference §1.5-1.7).

#include "format/entries.h"

#include "format/hex.h"

namespace qcow2kit::format {
namespace {

constexpr uint64_t kSubclusterAllocMask = 0xffffffffull;  // bitmap bits 0-31
// Host offsets in every entry stay below 2^56.
constexpr uint32_t kMaxHostOffsetBits = 56;

// Bits 0..x-1 of a compressed descriptor hold the stream offset, x = 70 - cluster_bits.
uint32_t CompressedOffsetBits(uint32_t cluster_bits) {
  return 70 - cluster_bits;
}

bool AllocBit(uint64_t bitmap, uint32_t index) {
  return bitmap & (1ull << index);
}
bool ZeroBit(uint64_t bitmap, uint32_t index) {
  return bitmap & (1ull << (32 + index));
}

SubclusterType StandardSubclusterType(ClusterType t) {
  switch (t) {
    case ClusterType::kUnallocated:
      return SubclusterType::kUnallocatedPlain;
    case ClusterType::kZeroPlain:
      return SubclusterType::kZeroPlain;
    case ClusterType::kZeroAlloc:
      return SubclusterType::kZeroAlloc;
    case ClusterType::kNormal:
      return SubclusterType::kNormal;
    case ClusterType::kCompressed:
      return SubclusterType::kCompressed;
  }
  return SubclusterType::kInvalid;
}

// Messages are built only on failure: validation runs over every entry of an image.
Status L2Error(uint64_t l2_entry, uint64_t guest_offset, const std::string& problem) {
  return Status::Corrupt("L2 entry " + HexEntry(l2_entry) + " for guest offset " +
                         Hex(guest_offset) + ": " + problem);
}

Status ValidateCompressedEntry(uint64_t e, uint64_t bitmap, uint64_t guest_offset,
                               const Geometry& g) {
  if (g.has_data_file) {
    return L2Error(e, guest_offset, "compressed cluster in an image with an external data file");
  }
  if (e & kOflagCopied) return L2Error(e, guest_offset, "compressed cluster has the COPIED flag");
  const uint32_t x = CompressedOffsetBits(g.cluster_bits);
  const uint64_t offset = e & ((1ull << x) - 1);
  if (offset >> kMaxHostOffsetBits) {  // possible only when x > 56, i.e. clusters <= 16 KiB
    return L2Error(e, guest_offset,
                   "compressed cluster offset " + Hex(offset) + " is not below 2^56");
  }
  if (g.extended_l2 && bitmap != 0) {
    return L2Error(e, guest_offset,
                   "compressed cluster has a non-zero subcluster bitmap " + HexEntry(bitmap));
  }
  return Status::Ok();
}

Status ValidateSubclusterBitmap(uint64_t e, uint64_t bitmap, uint64_t guest_offset,
                                const Geometry& g) {
  const ClusterType t = ClassifyCluster(e, g);
  if (t == ClusterType::kNormal && ((bitmap >> 32) & bitmap) != 0) {
    return L2Error(
        e, guest_offset,
        "subcluster bitmap " + HexEntry(bitmap) + " marks subclusters both allocated and zero");
  }
  if (t == ClusterType::kUnallocated && (bitmap & kSubclusterAllocMask) != 0) {
    return L2Error(e, guest_offset,
                   "subcluster bitmap " + HexEntry(bitmap) +
                       " allocates subclusters of a cluster without a host offset");
  }
  return Status::Ok();
}

}  // namespace

ClusterType ClassifyCluster(uint64_t l2_entry, const Geometry& g) {
  if (l2_entry & kOflagCompressed) return ClusterType::kCompressed;
  const uint64_t offset = L2EntryOffset(l2_entry);
  // With extended L2 entries zeroes are per subcluster and bit 0 is unused.
  if ((l2_entry & kOflagZero) && !g.extended_l2) {
    return offset ? ClusterType::kZeroAlloc : ClusterType::kZeroPlain;
  }
  if (offset == 0) {
    // Offset 0 is a valid data file offset; data file clusters always have refcount 1, so
    // COPIED tells the two apart.
    const bool data_at_zero = g.has_data_file && (l2_entry & kOflagCopied);
    return data_at_zero ? ClusterType::kNormal : ClusterType::kUnallocated;
  }
  return ClusterType::kNormal;
}

SubclusterType ClassifySubcluster(uint64_t l2_entry, uint64_t l2_bitmap, uint32_t index,
                                  const Geometry& g) {
  const ClusterType t = ClassifyCluster(l2_entry, g);
  if (!g.extended_l2) {
    return index == 0 ? StandardSubclusterType(t) : SubclusterType::kInvalid;
  }
  if (index >= kSubclustersPerCluster) return SubclusterType::kInvalid;
  switch (t) {
    case ClusterType::kCompressed:
      return l2_bitmap == 0 ? SubclusterType::kCompressed : SubclusterType::kInvalid;
    case ClusterType::kNormal:
      if ((l2_bitmap >> 32) & l2_bitmap) return SubclusterType::kInvalid;
      if (ZeroBit(l2_bitmap, index)) return SubclusterType::kZeroAlloc;
      if (AllocBit(l2_bitmap, index)) return SubclusterType::kNormal;
      return SubclusterType::kUnallocatedAlloc;
    case ClusterType::kUnallocated:
      if (l2_bitmap & kSubclusterAllocMask) return SubclusterType::kInvalid;
      if (ZeroBit(l2_bitmap, index)) return SubclusterType::kZeroPlain;
      return SubclusterType::kUnallocatedPlain;
    default:  // zero cluster types do not exist with extended L2 entries
      return SubclusterType::kInvalid;
  }
}

Status ValidateL1Entry(uint64_t l1_entry, uint64_t l1_index, const Geometry& g) {
  const uint64_t offset = L1EntryOffset(l1_entry);
  const bool reserved = l1_entry & kL1ReservedMask;
  const bool unaligned = offset & (g.cluster_size() - 1);
  if (!reserved && !unaligned) return Status::Ok();
  const std::string where =
      "L1 entry " + std::to_string(l1_index) + " (" + HexEntry(l1_entry) + ")";
  if (reserved) return Status::Corrupt(where + " has reserved bits set");
  return Status::Corrupt(where + ": L2 table offset " + Hex(offset) + " is not cluster aligned");
}

Status ValidateL2Entry(uint64_t l2_entry, uint64_t l2_bitmap, uint64_t guest_offset,
                       uint32_t version, const Geometry& g) {
  if (l2_entry & kOflagCompressed) {
    return ValidateCompressedEntry(l2_entry, l2_bitmap, guest_offset, g);
  }
  const uint64_t reserved = kL2StandardReservedMask | (g.extended_l2 ? kOflagZero : 0);
  if (l2_entry & reserved) return L2Error(l2_entry, guest_offset, "reserved bits set");
  const uint64_t offset = L2EntryOffset(l2_entry);
  if (offset & (g.cluster_size() - 1)) {
    return L2Error(l2_entry, guest_offset,
                   "host offset " + Hex(offset) + " is not cluster aligned");
  }
  if ((l2_entry & kOflagZero) && version < 3) {
    return L2Error(l2_entry, guest_offset,
                   "zero cluster in a version " + std::to_string(version) + " image");
  }
  if (g.extended_l2) return ValidateSubclusterBitmap(l2_entry, l2_bitmap, guest_offset, g);
  return Status::Ok();
}

CompressedDescriptor DecodeCompressed(uint64_t l2_entry, uint32_t cluster_bits) {
  const uint32_t x = CompressedOffsetBits(cluster_bits);
  const uint64_t sector_mask = (1ull << (cluster_bits - 8)) - 1;
  CompressedDescriptor d;
  d.host_offset = l2_entry & ((1ull << x) - 1);
  d.extra_sectors = static_cast<uint32_t>((l2_entry >> x) & sector_mask);
  return d;
}

uint64_t EncodeCompressed(uint64_t host_offset, uint64_t length, uint32_t cluster_bits) {
  const uint32_t x = CompressedOffsetBits(cluster_bits);
  const uint64_t sector_mask = (1ull << (cluster_bits - 8)) - 1;
  // Sectors touched after the one holding the first byte (an empty stream touches one).
  const uint64_t last = host_offset + (length ? length - 1 : 0);
  const uint64_t extra = last / 512 - host_offset / 512;
  return kOflagCompressed | ((extra & sector_mask) << x) | (host_offset & ((1ull << x) - 1));
}

}  // namespace qcow2kit::format
