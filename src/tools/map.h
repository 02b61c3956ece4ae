// `map`: the allocation map of an image as qemu-img map prints it. Block status is queried in
// windows (so huge images are never mapped in memory at once) and runs are merged across
// window boundaries with qemu-img's rule before they are printed.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "qcow2kit/block.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit::tools {

// One line of qemu-img map (its MapEntry).
struct MapEntry {
  uint64_t start = 0;
  uint64_t length = 0;
  uint32_t depth = 0;
  bool present = false;
  bool zero = false;
  bool data = false;
  bool compressed = false;
  bool has_offset = false;
  uint64_t offset = 0;
  std::string filename;  // the file `offset` refers to; empty without an offset

  friend bool operator==(const MapEntry&, const MapEntry&) = default;
};

MapEntry ToMapEntry(const BlockStatusExtent& e);

// qemu-img's entry_mergeable(): `next` continues `cur` with the same attributes (and, with an
// offset, the same file and a contiguous host offset).
bool MapEntriesMergeable(const MapEntry& cur, const MapEntry& next);

// Joins runs that arrive in order into maximal mergeable runs.
class MapMerger {
 public:
  // Adds the next run; returns the previous merged run if `next` cannot extend it.
  std::optional<MapEntry> Push(const MapEntry& next);
  // The last run, if any.
  std::optional<MapEntry> Finish();

 private:
  std::optional<MapEntry> cur_;
};

// Walks [start, start + length) (clipped to the image) in windows of `window` bytes and calls
// `emit` for each merged run in order, with `last` set on the final one. If the range is empty,
// emits one zero-length entry at `start`, as qemu-img does. Stops at the first error `emit`
// returns.
using MapEmitFn = std::function<Status(const MapEntry& entry, bool last)>;
Task<Status> WalkMap(BlockDevice& dev, uint64_t start, uint64_t length, uint64_t window,
                     const MapEmitFn& emit);

// `{ "start": 0, "length": 65536, ..., "compressed": false, "offset": 327680}` (QEMU 8.2's
// layout: no trailing comma or newline).
std::string MapEntryJson(const MapEntry& e);
// The human line for a data run (qemu-img's "%#-16x%#-16x%#-16x%s"), no newline.
std::string MapEntryHuman(const MapEntry& e);
// The human header line, no newline.
std::string MapHumanHeader();

}  // namespace qcow2kit::tools
