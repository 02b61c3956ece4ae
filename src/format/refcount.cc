// Refcount block entries of 1..64 bits (reference §1.8).

#include "format/refcount.h"

#include <cassert>

#include "format/endian.h"

namespace qcow2kit::format {
namespace {

// For entries narrower than a byte: the byte holding entry `index` and its bit position.
struct SubByte {
  uint64_t byte;
  uint32_t shift;
  uint8_t mask;
};

SubByte Locate(uint64_t index, uint32_t refcount_order) {
  const uint32_t bits = 1u << refcount_order;
  const uint32_t per_byte = 8 >> refcount_order;
  return {index / per_byte, static_cast<uint32_t>((index % per_byte) * bits),
          static_cast<uint8_t>((1u << bits) - 1)};
}

}  // namespace

uint64_t GetRefcount(std::span<const uint8_t> block, uint64_t index, uint32_t refcount_order) {
  assert(refcount_order <= 6);
  assert(((index << refcount_order) >> 3) < block.size());
  switch (refcount_order) {
    case 3:
      return block[index];
    case 4:
      return LoadBE16(&block[index * 2]);
    case 5:
      return LoadBE32(&block[index * 4]);
    case 6:
      return LoadBE64(&block[index * 8]);
    default: {
      const SubByte s = Locate(index, refcount_order);
      return (block[s.byte] >> s.shift) & s.mask;
    }
  }
}

void SetRefcount(std::span<uint8_t> block, uint64_t index, uint32_t refcount_order,
                 uint64_t value) {
  assert(refcount_order <= 6);
  assert(((index << refcount_order) >> 3) < block.size());
  switch (refcount_order) {
    case 3:
      block[index] = static_cast<uint8_t>(value);
      return;
    case 4:
      StoreBE16(&block[index * 2], static_cast<uint16_t>(value));
      return;
    case 5:
      StoreBE32(&block[index * 4], static_cast<uint32_t>(value));
      return;
    case 6:
      StoreBE64(&block[index * 8], value);
      return;
    default: {
      const SubByte s = Locate(index, refcount_order);
      const uint8_t cleared = block[s.byte] & ~(s.mask << s.shift);
      block[s.byte] = static_cast<uint8_t>(cleared | ((value & s.mask) << s.shift));
      return;
    }
  }
}

}  // namespace qcow2kit::format
