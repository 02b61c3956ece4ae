// The allocator model. Each function mirrors the QEMU function named in the header, step by
// step, because the layout depends on the exact order of decisions (see the header).
#include "image/create_refcount_model.h"

#include <algorithm>
#include <cerrno>
#include <string>

#include "format/endian.h"
#include "format/refcount.h"

namespace qcow2kit::create_internal {
namespace {

constexpr uint64_t kReftableOffsetMask = 0xfffffffffffffe00ull;

uint64_t DivRoundUp(uint64_t a, uint64_t b) {
  return a / b + (a % b != 0);
}

Status Again() {
  return Status::Error(EAGAIN, "allocation must be retried");
}
bool IsAgain(const Status& s) {
  return s.code() == EAGAIN;
}
Status TooLarge() {
  return Status::Error(EFBIG, "File too large");
}

}  // namespace

uint64_t RefcountBlocksNeeded(uint64_t clusters, uint32_t cluster_bits, uint32_t refcount_order,
                              bool generous) {
  const uint64_t blocks_per_table_cluster = (1ull << cluster_bits) / 8;
  const uint64_t refcounts_per_block = (1ull << (cluster_bits + 3)) >> refcount_order;
  uint64_t table = 0, blocks = 0, n = 0, last;
  do {
    last = n;
    blocks = DivRoundUp(clusters + table + blocks, refcounts_per_block);
    table = DivRoundUp(blocks, blocks_per_table_cluster);
    n = clusters + blocks + table;
    if (n == last && generous) {
      clusters += DivRoundUp(table, 2);
      n = 0;  // go round once more
      generous = false;
    }
  } while (n != last);
  return blocks;
}

RefcountModel::RefcountModel(uint32_t cluster_bits, uint32_t refcount_order)
    : cluster_bits_(cluster_bits),
      order_(refcount_order),
      cluster_size_(1ull << cluster_bits),
      block_bits_(cluster_bits + 3 - refcount_order),
      max_refcount_(refcount_order == 6 ? ~0ull : (1ull << (1u << refcount_order)) - 1),
      table_(cluster_size_ / 8, 0),
      table_offset_(cluster_size_),
      file_length_(3 * cluster_size_) {
  table_[0] = 2 * cluster_size_;
  blocks_[2 * cluster_size_].assign(cluster_size_, 0);
}

void RefcountModel::NoteWrite(uint64_t offset, uint64_t length) {
  file_length_ = std::max(file_length_, offset + length);
}

uint32_t RefcountModel::table_clusters() const {
  return static_cast<uint32_t>(table_.size() * 8 / cluster_size_);
}

std::vector<uint8_t>* RefcountModel::Block(uint64_t offset) {
  auto it = blocks_.find(offset);
  return it == blocks_.end() ? nullptr : &it->second;
}

uint64_t RefcountModel::Refcount(uint64_t cluster_index) const {
  uint64_t table_index = cluster_index >> block_bits_;
  if (table_index >= table_.size()) return 0;
  uint64_t offset = table_[table_index] & kReftableOffsetMask;
  if (!offset) return 0;
  auto it = blocks_.find(offset);
  if (it == blocks_.end()) return 0;
  return format::GetRefcount(it->second, cluster_index & ((1ull << block_bits_) - 1), order_);
}

int64_t RefcountModel::LastUsedCluster(uint64_t file_size) const {
  for (int64_t i = static_cast<int64_t>(DivRoundUp(file_size, cluster_size_)) - 1; i >= 0; --i) {
    if (Refcount(static_cast<uint64_t>(i)) > 0) return i;
  }
  return -1;
}

void RefcountModel::UpdateMaxTableIndex() {
  uint64_t i = table_.size() - 1;
  while (i > 0 && (table_[i] & kReftableOffsetMask) == 0) --i;
  max_table_index_ = i;
}

std::vector<uint8_t> RefcountModel::TableBytes() const {
  std::vector<uint8_t> out(table_.size() * 8);
  for (size_t i = 0; i < table_.size(); ++i) format::StoreBE64(&out[i * 8], table_[i]);
  return out;
}

Result<uint64_t> RefcountModel::AllocClustersNoref(uint64_t bytes, uint64_t max_offset) {
  const uint64_t count = DivRoundUp(bytes, cluster_size_);
  for (uint64_t found = 0; found < count;) {
    found = Refcount(free_cluster_index_++) == 0 ? found + 1 : 0;
  }
  if (free_cluster_index_ > 0 && free_cluster_index_ - 1 > (max_offset >> cluster_bits_)) {
    return TooLarge();
  }
  return (free_cluster_index_ - count) << cluster_bits_;
}

Status RefcountModel::UpdateRefcount(uint64_t offset, uint64_t length, bool decrease) {
  if (length == 0) return Status::Ok();
  const uint64_t start = offset & ~(cluster_size_ - 1);
  const uint64_t last = (offset + length - 1) & ~(cluster_size_ - 1);
  std::vector<uint8_t>* block = nullptr;
  uint64_t old_table_index = ~0ull;
  Status status;
  uint64_t cluster_offset;
  for (cluster_offset = start; cluster_offset <= last; cluster_offset += cluster_size_) {
    const uint64_t cluster_index = cluster_offset >> cluster_bits_;
    const uint64_t table_index = cluster_index >> block_bits_;
    if (table_index != old_table_index) {
      status = AllocRefcountBlock(cluster_index, &block);
      if (IsAgain(status) && free_cluster_index_ > (start >> cluster_bits_)) {
        free_cluster_index_ = start >> cluster_bits_;
      }
      if (!status.ok()) break;
    }
    old_table_index = table_index;
    const uint64_t index = cluster_index & ((1ull << block_bits_) - 1);
    uint64_t refcount = format::GetRefcount(*block, index, order_);
    if (decrease ? refcount == 0 : refcount == max_refcount_) {
      status = Status::Invalid("refcount of cluster " + std::to_string(cluster_index) +
                               (decrease ? " would drop below 0" : " would overflow"));
      break;
    }
    refcount = decrease ? refcount - 1 : refcount + 1;
    if (refcount == 0 && cluster_index < free_cluster_index_) {
      free_cluster_index_ = cluster_index;
    }
    format::SetRefcount(*block, index, order_, refcount);
  }
  if (!status.ok()) {
    // Undo what was done before the failure, as QEMU does.
    (void)UpdateRefcount(offset, cluster_offset > offset ? cluster_offset - offset : 0, !decrease);
  }
  return status;
}

Status RefcountModel::AllocRefcountBlock(uint64_t cluster_index, std::vector<uint8_t>** block) {
  const uint64_t table_index = cluster_index >> block_bits_;
  if (table_index < table_.size()) {
    const uint64_t offset = table_[table_index] & kReftableOffsetMask;
    if (offset) {
      *block = Block(offset);
      if (!*block) return Status::Corrupt("refcount block model lost a block");
      return Status::Ok();
    }
  }
  *block = nullptr;

  QK_ASSIGN_OR_RETURN(uint64_t new_block, AllocClustersNoref(cluster_size_, INT64_MAX));
  if (new_block == 0) {
    return Status::Corrupt("Preventing invalid allocation of refcount block at offset 0");
  }
  const uint32_t coverage_bits = cluster_bits_ + block_bits_;
  if ((new_block >> coverage_bits) == ((cluster_index << cluster_bits_) >> coverage_bits)) {
    // The block describes itself.
    std::vector<uint8_t>& b = blocks_[new_block];
    b.assign(cluster_size_, 0);
    format::SetRefcount(b, (new_block >> cluster_bits_) & ((1ull << block_bits_) - 1), order_, 1);
  } else {
    QK_RETURN_IF_ERROR(UpdateRefcount(new_block, cluster_size_, false));
    blocks_[new_block].assign(cluster_size_, 0);
  }
  NoteWrite(new_block, cluster_size_);

  if (table_index < table_.size()) {
    table_[table_index] = new_block;
    max_table_index_ = std::max(max_table_index_, table_index);
    return Again();  // the block may sit where the caller meant to allocate
  }

  // The table is too small: build a new area after everything the table would cover.
  const uint64_t entries = 1ull << block_bits_;
  const uint64_t blocks_used =
      DivRoundUp(std::max(cluster_index + 1, (new_block >> cluster_bits_) + 1), entries);
  QK_ASSIGN_OR_RETURN(uint64_t end, RefcountArea(blocks_used * entries * cluster_size_, 0, false,
                                                 table_index, new_block));
  (void)end;
  *block = Block(new_block);
  return Again();
}

Result<uint64_t> RefcountModel::RefcountArea(uint64_t start, uint64_t additional_clusters,
                                             bool exact_size, uint64_t new_block_index,
                                             uint64_t new_block_offset) {
  const uint64_t total_blocks = RefcountBlocksNeeded(start / cluster_size_ + additional_clusters,
                                                     cluster_bits_, order_, !exact_size);
  if (total_blocks > kMaxReftableSize) return TooLarge();
  const uint64_t entries = 1ull << block_bits_;
  const uint64_t area_index = (start / cluster_size_) / entries;
  const uint64_t per_cluster = cluster_size_ / 8;
  uint64_t table_size = exact_size ? total_blocks : total_blocks + DivRoundUp(total_blocks, 2);
  table_size = DivRoundUp(table_size, per_cluster) * per_cluster;
  const uint64_t table_clusters = table_size / per_cluster;
  if (table_size > kMaxReftableSize) return TooLarge();

  std::vector<uint64_t> new_table(table_size, 0);
  const uint64_t copy = table_size > max_table_index_ ? max_table_index_ + 1 : table_size;
  std::copy_n(table_.begin(), std::min<uint64_t>(copy, table_.size()), new_table.begin());
  if (new_block_offset) {
    if (new_block_index >= total_blocks)
      return Status::Corrupt("refcount block index out of range");
    new_table[new_block_index] = new_block_offset;
  }

  uint64_t additional_blocks = 0;
  for (uint64_t i = area_index; i < total_blocks; ++i) additional_blocks += new_table[i] == 0;
  const uint64_t table_offset = start + additional_blocks * cluster_size_;
  const uint64_t end_offset = table_offset + table_clusters * cluster_size_;

  uint64_t block_offset = start;
  for (uint64_t i = area_index; i < total_blocks; ++i) {
    std::vector<uint8_t>* block;
    if (new_table[i]) {
      block = Block(new_table[i]);
      if (!block) return Status::Corrupt("refcount block model lost a block");
    } else {
      block = &blocks_[block_offset];
      block->assign(cluster_size_, 0);
      new_table[i] = block_offset;
      NoteWrite(block_offset, cluster_size_);
      block_offset += cluster_size_;
    }
    // Refcounts of the new area's own clusters (blocks and table) that this block covers.
    const uint64_t first_covered = i * entries * cluster_size_;
    if (first_covered < end_offset) {
      uint64_t j = first_covered < start ? (start - first_covered) / cluster_size_ : 0;
      const uint64_t end_index = std::min((end_offset - first_covered) / cluster_size_, entries);
      for (; j < end_index; ++j) {
        if (format::GetRefcount(*block, j, order_) != 0) {
          return Status::Corrupt("new refcount area overlaps used clusters");
        }
        format::SetRefcount(*block, j, order_, 1);
      }
    }
  }
  NoteWrite(table_offset, table_size * 8);

  // The old table stays in the file as it was when it was replaced; its clusters are freed.
  abandoned_tables_.emplace_back(table_offset_, TableBytes());
  const uint64_t old_offset = table_offset_;
  const uint64_t old_size = table_.size();
  table_ = std::move(new_table);
  table_offset_ = table_offset;
  UpdateMaxTableIndex();
  QK_RETURN_IF_ERROR(UpdateRefcount(old_offset, old_size * 8, /*decrease=*/true));
  return end_offset;
}

Result<uint64_t> RefcountModel::AllocClusters(uint64_t bytes) {
  for (;;) {
    QK_ASSIGN_OR_RETURN(uint64_t offset, AllocClustersNoref(bytes, kMaxClusterOffset));
    Status status = UpdateRefcount(offset, bytes, false);
    if (IsAgain(status)) continue;
    if (!status.ok()) return status;
    return offset;
  }
}

Result<uint64_t> RefcountModel::AllocClustersAt(uint64_t offset, uint64_t count) {
  if (count == 0) return uint64_t{0};
  for (;;) {
    uint64_t cluster_index = offset >> cluster_bits_;
    uint64_t free = 0;
    while (free < count && Refcount(cluster_index++) == 0) ++free;
    Status status = UpdateRefcount(offset, free << cluster_bits_, false);
    if (IsAgain(status)) continue;
    if (!status.ok()) return status;
    return free;
  }
}

std::vector<std::pair<uint64_t, std::vector<uint8_t>>> RefcountModel::Writes() const {
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> out = abandoned_tables_;
  for (const auto& [offset, block] : blocks_) out.emplace_back(offset, block);
  out.emplace_back(table_offset_, TableBytes());
  return out;
}

}  // namespace qcow2kit::create_internal
