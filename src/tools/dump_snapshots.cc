// dump: the internal snapshot table and the bitmap directory.
#include "tools/dump.h"

namespace qcow2kit::tools {

Json DumpSnapshots(const Qcow2Image& img) {
  Json list = Json::array();
  uint32_t index = 0;
  for (const format::Snapshot& s : img.snapshots()) {
    Json x = Json::object();
    x["index"] = index++;
    x["id"] = s.id;
    x["name"] = s.name;
    x["l1_table_offset"] = s.l1_table_offset;
    x["l1_size"] = s.l1_size;
    x["date_sec"] = s.date_sec;
    x["date_nsec"] = s.date_nsec;
    x["vm_clock_nsec"] = s.vm_clock_nsec;
    x["vm_state_size"] = s.vm_state_size;
    if (s.disk_size) x["disk_size"] = *s.disk_size;
    if (s.icount && *s.icount != ~uint64_t{0}) x["icount"] = *s.icount;
    x["extra_data_size"] = s.extra_data.size();
    list.push_back(std::move(x));
  }
  Json j = Json::object();
  j["offset"] = img.header().snapshots_offset;
  j["count"] = img.header().nb_snapshots;
  j["snapshots"] = std::move(list);
  return j;
}

Json DumpBitmaps(const Qcow2Image& img) {
  const format::ParsedHeader& p = img.parsed();
  Json j = Json::object();
  if (p.bitmaps) {
    j["nb_bitmaps"] = p.bitmaps->nb_bitmaps;
    j["directory_offset"] = p.bitmaps->directory_offset;
    j["directory_size"] = p.bitmaps->directory_size;
  }
  // An extension without the autoclear bit: written to by a program unaware of bitmaps.
  j["inconsistent"] = p.bitmaps_inconsistent;
  Json list = Json::array();
  for (const format::BitmapInfo& b : img.bitmaps()) {
    Json flags = Json::array();
    if (b.flags & 1) flags.push_back("in-use");
    if (b.flags & 2) flags.push_back("auto");
    if (b.flags & 4) flags.push_back("extra-data-compatible");
    Json x = Json::object();
    x["name"] = b.name;
    x["table_offset"] = b.table_offset;
    x["table_size"] = b.table_size;
    x["flags"] = b.flags;
    x["flag_names"] = std::move(flags);
    x["type"] = b.type;
    x["granularity_bits"] = b.granularity_bits;
    x["granularity"] = uint64_t{1} << std::min<uint8_t>(b.granularity_bits, 63);
    list.push_back(std::move(x));
  }
  j["bitmaps"] = std::move(list);
  return j;
}

}  // namespace qcow2kit::tools
