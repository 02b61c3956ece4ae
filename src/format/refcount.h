// Refcount blocks: entries of 1..64 bits (refcount_order 0..6). Widths of 8 bits and more are
// big-endian integers; 1/2/4-bit entries are packed LSB-first inside each byte.
#pragma once

#include <cstdint>
#include <span>

namespace qcow2kit::format {

struct RefcountGeometry {
  uint32_t cluster_bits = 16;
  uint32_t refcount_order = 4;

  uint32_t refcount_bits() const { return 1u << refcount_order; }
  uint64_t max_refcount() const {
    return refcount_order == 6 ? ~0ull : (1ull << refcount_bits()) - 1;
  }
  // Entries per refcount block (one cluster).
  uint64_t block_entries() const { return (1ull << (cluster_bits + 3)) >> refcount_order; }
  uint64_t table_index(uint64_t host_offset) const {
    return (host_offset >> cluster_bits) / block_entries();
  }
  uint64_t block_index(uint64_t host_offset) const {
    return (host_offset >> cluster_bits) % block_entries();
  }
};

uint64_t GetRefcount(std::span<const uint8_t> block, uint64_t index, uint32_t refcount_order);
// `value` must not exceed max_refcount(): the bits above the entry width are dropped.
void SetRefcount(std::span<uint8_t> block, uint64_t index, uint32_t refcount_order,
                 uint64_t value);

}  // namespace qcow2kit::format
