// measure: how large a qcow2 or raw image made from a source (or of a given size) will be,
// computed as qemu-img measure computes it: "required" for the source's allocated data plus
// the metadata of a fully allocated image, "fully allocated" for every cluster, and for qcow2
// v3 targets of qcow2 v3 sources the room the source's persistent bitmaps would take.
#pragma once

#include <cstdint>
#include <optional>

#include "image/create_options.h"
#include "qcow2kit/block.h"

namespace qcow2kit::tools {

struct MeasureResult {
  uint64_t required = 0;
  uint64_t fully_allocated = 0;
  std::optional<uint64_t> bitmaps;  // only when both sides support persistent bitmaps
};

// `target` says the format and options of the image to be made (size ignored); exactly one of
// `size` and `source` is given.
Task<Result<MeasureResult>> Measure(const CreateOptions& target, std::optional<uint64_t> size,
                                    BlockDevice* source);

// qcow2_calc_prealloc_size: the file size of a fully preallocated qcow2 image.
uint64_t Qcow2FullyAllocatedSize(uint64_t virtual_size, uint32_t cluster_bits,
                                 uint32_t refcount_order, bool extended_l2);

}  // namespace qcow2kit::tools
