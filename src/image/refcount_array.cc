#include "image/refcount_array.h"

#include <algorithm>

namespace qcow2kit {

RefcountArray::RefcountArray(const format::RefcountGeometry& g, uint64_t clusters) : geometry_(g) {
  Grow(clusters);
}

void RefcountArray::Grow(uint64_t clusters) {
  if (clusters <= clusters_) return;
  const uint64_t per_block = geometry_.block_entries();
  ReserveBlocks((clusters + per_block - 1) / per_block);
  clusters_ = clusters;
}

void RefcountArray::ReserveBlocks(uint64_t blocks) {
  const uint64_t block_bytes = uint64_t{1} << geometry_.cluster_bits;
  if (blocks * block_bytes > bytes_.size()) {
    // Amortised growth: references past the end come in increasing order when a table points
    // far beyond the file.
    uint64_t want = std::max<uint64_t>(blocks * block_bytes, bytes_.size() + bytes_.size() / 2);
    want = (want + block_bytes - 1) / block_bytes * block_bytes;
    bytes_.resize(want, 0);
  }
}

bool RefcountArray::Increment(uint64_t cluster) {
  Grow(cluster + 1);
  const uint64_t v = format::GetRefcount(bytes_, cluster, geometry_.refcount_order);
  if (v == geometry_.max_refcount()) return false;
  format::SetRefcount(bytes_, cluster, geometry_.refcount_order, v + 1);
  return true;
}

void RefcountArray::Set(uint64_t cluster, uint64_t value) {
  Grow(cluster + 1);
  format::SetRefcount(bytes_, cluster, geometry_.refcount_order, value);
}

void RefcountArray::Clear() {
  std::fill(bytes_.begin(), bytes_.end(), 0);
}

std::span<const uint8_t> RefcountArray::Block(uint64_t table_index) {
  ReserveBlocks(table_index + 1);
  const uint64_t block_bytes = uint64_t{1} << geometry_.cluster_bits;
  return std::span<const uint8_t>(bytes_).subspan(table_index * block_bytes, block_bytes);
}

bool RefcountArray::RangeFree(uint64_t first, uint64_t count) const {
  for (uint64_t c = first; c < first + count && c < clusters_; ++c) {
    if (Get(c) != 0) return false;
  }
  return true;
}

}  // namespace qcow2kit
