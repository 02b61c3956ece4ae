#include "tools/map.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <vector>

#include "fmt/format.h"

namespace qcow2kit::tools {

MapEntry ToMapEntry(const BlockStatusExtent& e) {
  MapEntry m;
  m.start = e.start;
  m.length = e.length;
  m.depth = e.depth;
  m.present = e.present;
  m.zero = e.zero;
  m.data = e.data;
  m.compressed = e.compressed;
  m.has_offset = e.offset != Extent::kNoHost;
  if (m.has_offset) {
    m.offset = e.offset;
    if (e.file) m.filename = e.file->path();
  }
  return m;
}

bool MapEntriesMergeable(const MapEntry& cur, const MapEntry& next) {
  if (cur.length == 0) return false;
  if (cur.zero != next.zero || cur.data != next.data || cur.compressed != next.compressed ||
      cur.depth != next.depth || cur.present != next.present || cur.has_offset != next.has_offset ||
      cur.filename != next.filename) {
    return false;
  }
  return !cur.has_offset || cur.offset + cur.length == next.offset;
}

std::optional<MapEntry> MapMerger::Push(const MapEntry& next) {
  if (cur_ && MapEntriesMergeable(*cur_, next)) {
    cur_->length += next.length;
    return std::nullopt;
  }
  std::optional<MapEntry> done = std::move(cur_);
  cur_ = next;
  return done;
}

std::optional<MapEntry> MapMerger::Finish() {
  return std::exchange(cur_, std::nullopt);
}

Task<Status> WalkMap(BlockDevice& dev, uint64_t start, uint64_t length, uint64_t window,
                     const MapEmitFn& emit) {
  const uint64_t end = start < dev.size() ? start + std::min(length, dev.size() - start) : start;
  MapMerger merger;
  // One finished run is held back until we know whether another follows it.
  std::optional<MapEntry> pending;
  auto push = [&](std::optional<MapEntry> done) -> Status {
    if (!done) return Status::Ok();
    if (pending) QK_RETURN_IF_ERROR(emit(*pending, false));
    pending = std::move(done);
    return Status::Ok();
  };
  std::vector<BlockStatusExtent> runs;
  for (uint64_t pos = start; pos < end;) {
    const uint64_t n = std::min(window, end - pos);
    runs.clear();
    QK_CO_RETURN_IF_ERROR(co_await dev.BlockStatus(pos, n, &runs));
    if (runs.empty()) co_return Status::IoError(fmt::format("No block status at {:#x}", pos));
    for (const BlockStatusExtent& r : runs) {
      QK_CO_RETURN_IF_ERROR(push(merger.Push(ToMapEntry(r))));
    }
    pos = runs.back().start + runs.back().length;
  }
  QK_CO_RETURN_IF_ERROR(push(merger.Finish()));
  if (!pending) {
    MapEntry empty;
    empty.start = start;
    pending = empty;
  }
  co_return emit(*pending, true);
}

std::string MapEntryJson(const MapEntry& e) {
  auto b = [](bool v) { return v ? "true" : "false"; };
  std::string s = fmt::format(
      "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, "
      "\"data\": {}, \"compressed\": {}",
      e.start, e.length, e.depth, b(e.present), b(e.zero), b(e.data), b(e.compressed));
  if (e.has_offset) s += fmt::format(", \"offset\": {}", e.offset);
  return s + "}";
}

std::string MapEntryHuman(const MapEntry& e) {
  char buf[128];
  std::snprintf(buf, sizeof(buf), "%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64, e.start, e.length,
                e.has_offset ? e.offset : uint64_t{0});
  return buf + e.filename;
}

std::string MapHumanHeader() {
  return fmt::format("{:<16}{:<16}{:<16}{}", "Offset", "Length", "Mapped to", "File");
}

}  // namespace qcow2kit::tools
