// Rounding of offsets and lengths to a granule (cluster, subcluster, I/O block).
#pragma once

#include <cstdint>

namespace qcow2kit {

inline uint64_t AlignDown(uint64_t v, uint64_t a) {
  return v / a * a;
}
inline uint64_t AlignUp(uint64_t v, uint64_t a) {
  return (v + a - 1) / a * a;
}

}  // namespace qcow2kit
