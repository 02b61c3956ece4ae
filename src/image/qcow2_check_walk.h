// Pieces the two halves of check (qcow2_check.cc: counting; qcow2_check_compare.cc:
// comparing and the COPIED audit) share.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "format/entries.h"
#include "io/read_ahead.h"
#include "qcow2kit/status.h"

namespace qcow2kit::check_detail {

// Tables read ahead while walking: enough to keep the device busy, bounded in memory.
inline unsigned ReadDepth(uint64_t cluster_size) {
  return static_cast<unsigned>(std::clamp<uint64_t>((1ull << 20) / cluster_size, 2, 32));
}

inline std::string ErrnoText(const Status& s) {
  return std::strerror(s.code());
}

// The tables that the entries of an L1 `table` point at, in order: every non-zero entry as
// check_refcounts_l1 visits them (`by_offset` false), or only entries with an offset, as the
// COPIED audit does (true).
inline ReadAhead::RangeSource L2Tables(const std::vector<uint64_t>& table, uint64_t cs,
                                       bool by_offset) {
  return [&table, cs, by_offset, i = size_t{0}](ByteRange* r) mutable {
    for (; i < table.size(); ++i) {
      const uint64_t offset = format::L1EntryOffset(table[i]);
      if (by_offset ? offset != 0 : table[i] != 0) {
        *r = {offset, cs};
        ++i;
        return true;
      }
    }
    return false;
  };
}

}  // namespace qcow2kit::check_detail
