// Number formatting for error messages: offsets and entries are shown in hex, as QEMU does.
#pragma once

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <string>

namespace qcow2kit::format {

// "0x10200".
inline std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
  return buf;
}

// "20" (QEMU prints feature masks without a prefix).
inline std::string HexDigits(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%" PRIx64, v);
  return buf;
}

// A 64-bit table entry, zero padded: "0x8000000000050000".
inline std::string HexEntry(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%016" PRIx64, v);
  return buf;
}

}  // namespace qcow2kit::format
