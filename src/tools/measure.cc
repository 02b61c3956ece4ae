#include "tools/measure.h"

#include <bit>
#include <vector>

#include "image/create_refcount_model.h"
#include "image/qcow2_image.h"

namespace qcow2kit::tools {
namespace {

uint64_t RoundUp(uint64_t v, uint64_t a) {
  return (v + a - 1) / a * a;
}
uint64_t DivRoundUp(uint64_t v, uint64_t a) {
  return (v + a - 1) / a;
}

// Bytes of guest data the source has allocated (neither zero nor left to a backing file),
// each run counted from the start of its first cluster to the end of its last: qemu-img's
// walk, which moves on from the end of that cluster.
Task<Result<uint64_t>> AllocatedClusterBytes(BlockDevice& source, uint64_t cluster) {
  const uint64_t size = source.size();
  uint64_t required = 0;
  uint64_t offset = 0;
  std::vector<BlockStatusExtent> runs;
  while (offset < size) {
    runs.clear();
    const uint64_t window = std::min<uint64_t>(size - offset, 1ull << 30);
    Status s = co_await source.BlockStatus(offset, window, &runs);
    if (!s.ok()) co_return s.WithContext("Unable to get block status");
    if (runs.empty()) co_return Status::IoError("Unable to get block status");
    const uint64_t window_end = offset + window;
    for (const BlockStatusExtent& e : runs) {
      const uint64_t end = e.start + e.length;
      if (end <= offset) continue;
      if (!e.zero && e.data && e.present) {
        const uint64_t run_end = RoundUp(end, cluster);
        required += offset % cluster + (run_end - offset);
        offset = run_end;
      } else {
        offset = end;
      }
      if (offset >= window_end) break;
    }
    offset = std::max(offset, std::min(window_end, size));
  }
  co_return required;
}

uint64_t BitmapsSize(const Qcow2Image& image, uint64_t cluster) {
  uint64_t total = 0;
  uint64_t directory = 0;
  for (const format::BitmapInfo& b : image.bitmaps()) {
    const uint64_t bits = DivRoundUp(image.size(), uint64_t{1} << b.granularity_bits);
    const uint64_t clusters = DivRoundUp(DivRoundUp(bits, 8), cluster);
    total += clusters * cluster + RoundUp(clusters * 8, cluster);
    directory += RoundUp(24 + b.name.size(), 8);
  }
  return total + RoundUp(directory, cluster);
}

}  // namespace

uint64_t Qcow2FullyAllocatedSize(uint64_t virtual_size, uint32_t cluster_bits,
                                 uint32_t refcount_order, bool extended_l2) {
  const uint64_t cs = uint64_t{1} << cluster_bits;
  const uint64_t entry = extended_l2 ? 16 : 8;
  const uint64_t total = RoundUp(virtual_size, cs);
  uint64_t meta = cs;  // the header
  const uint64_t l2_entries = RoundUp(total / cs, cs / entry);
  meta += l2_entries * entry;
  const uint64_t l1_entries = RoundUp(l2_entries * entry / cs, cs / 8);
  meta += l1_entries * 8;
  const uint64_t blocks = create_internal::RefcountBlocksNeeded((meta + total) / cs, cluster_bits,
                                                                refcount_order, false);
  const uint64_t table = DivRoundUp(blocks, cs / 8);
  meta += (blocks + table) * cs;
  return meta + total;
}

Task<Result<MeasureResult>> Measure(const CreateOptions& target, std::optional<uint64_t> size,
                                    BlockDevice* source) {
  MeasureResult r;
  if (target.format == "raw") {
    r.required = source ? RoundUp(source->size(), 512) : RoundUp(*size, 512);
    r.fully_allocated = r.required;
    co_return r;
  }
  const uint64_t cs = target.cluster_size;
  const uint32_t cluster_bits = static_cast<uint32_t>(std::countr_zero(cs));
  const uint32_t refcount_order =
      static_cast<uint32_t>(std::countr_zero(std::max<uint64_t>(1, target.refcount_bits)));
  uint64_t virtual_size = RoundUp(source ? source->size() : *size, cs);
  const uint64_t l2_tables = DivRoundUp(virtual_size / cs, cs / (target.extended_l2 ? 16 : 8));
  if (l2_tables * 8 > (32u << 20)) {  // QEMU's largest L1 table
    co_return Status::Invalid("The image size is too large (try using a larger cluster size)");
  }
  // Data clusters needed: none for a size alone, all of them for a source when the new
  // image gets a backing file (it may share nothing with it), else the source's allocation.
  uint64_t required = source ? virtual_size : 0;
  if (source && !target.backing_file) {
    QK_CO_ASSIGN_OR_RETURN(required, co_await AllocatedClusterBytes(*source, cs));
  }
  if (target.preallocation == Preallocation::kFalloc ||
      target.preallocation == Preallocation::kFull) {
    required = virtual_size;
  }
  r.fully_allocated =
      Qcow2FullyAllocatedSize(virtual_size, cluster_bits, refcount_order, target.extended_l2);
  r.required = r.fully_allocated - virtual_size + required;
  if (source && target.version >= 3) {
    auto* q = dynamic_cast<const Qcow2Image*>(&source->top());
    if (q && q->header().version >= 3) r.bitmaps = BitmapsSize(*q, cs);
  }
  co_return r;
}

}  // namespace qcow2kit::tools
