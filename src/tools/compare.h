// compare: qemu-img compare's walk over two images. Ranges both images report as zero are
// skipped, ranges allocated in both are read and compared, and a range allocated in one only
// must read as zeros there; with `strict`, sizes and block status must match too. Messages
// and exit codes are qemu-img's.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "qcow2kit/block.h"

namespace qcow2kit::tools {

struct CompareOutcome {
  // 0 identical, 1 different, 3 block status failed, 4 read failed (2, an image that does
  // not open, is the caller's).
  int exit_code = 0;
  std::string out;  // for stdout ("Images are identical.", "Content mismatch at offset N!")
  std::string err;  // for stderr, without the program prefix
};

Task<CompareOutcome> CompareImages(BlockDevice& a, const std::string& name_a, BlockDevice& b,
                                   const std::string& name_b, bool strict,
                                   const std::function<void(double)>& progress = nullptr);

}  // namespace qcow2kit::tools
