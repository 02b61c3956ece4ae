// The header and header-extension parser, the snapshot entry and bitmap directory decoders,
// given arbitrary bytes: errors are fine, crashes, hangs and out-of-bounds reads are not.
#include <algorithm>
#include <cstdint>
#include <span>

#include "format/header.h"
#include "format/snapshot.h"

using namespace qcow2kit;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> in(data, size);
  auto need = format::HeaderReadSize(in);
  if (need.ok()) {
    // The file is the input, possibly followed by more clusters.
    auto parsed = format::ParseHeader(in.first(std::min<uint64_t>(*need, size)), size + 65536);
    (void)parsed;
  }
  auto entry_size = format::SnapshotEntrySize(in);
  if (entry_size.ok() && *entry_size <= size) {
    auto snap = format::ParseSnapshotEntry(in.first(*entry_size), 0);
    if (snap.ok()) {
      (void)format::ValidateSnapshotL1(*snap, 0, 16);
      (void)format::SnapshotEntryIncomplete(*snap, 3);
    }
  }
  if (size >= 4) {
    const uint32_t nb = data[0] | (uint32_t{data[1]} << 8);
    auto dir = format::ParseBitmapDirectory(in.subspan(4), nb);
    (void)dir;
  }
  return 0;
}
