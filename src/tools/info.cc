#include "tools/info.h"

#include <ctime>

#include "fmt/format.h"
#include "image/qcow2_image.h"
#include "qcow2kit/image.h"
#include "tools/size_format.h"

namespace qcow2kit::tools {
namespace {

constexpr uint64_t kNanosPerSecond = 1000000000;

// QAPI SnapshotInfo.
Json SnapshotInfo(const format::Snapshot& s) {
  Json j = Json::object();
  j["id"] = s.id;
  j["name"] = s.name;
  j["vm-state-size"] = s.vm_state_size;
  j["date-sec"] = s.date_sec;
  j["date-nsec"] = s.date_nsec;
  j["vm-clock-sec"] = s.vm_clock_nsec / kNanosPerSecond;
  j["vm-clock-nsec"] = s.vm_clock_nsec % kNanosPerSecond;
  // QEMU stores "no icount" as -1 (or leaves the field out of old entries).
  if (s.icount && *s.icount != ~uint64_t{0}) j["icount"] = *s.icount;
  return j;
}

// QAPI Qcow2BitmapInfo. Flags other than in-use and auto are not reported, as in QEMU.
Json BitmapInfo(const format::BitmapInfo& b) {
  Json flags = Json::array();
  if (b.flags & 1) flags.push_back("in-use");
  if (b.flags & 2) flags.push_back("auto");
  Json j = Json::object();
  j["name"] = b.name;
  j["granularity"] = uint64_t{1} << b.granularity_bits;
  j["flags"] = std::move(flags);
  return j;
}

// QAPI ImageInfoSpecificQCow2, with the members qcow2_get_specific_info() fills in.
Json Qcow2Specific(const Qcow2Image& img) {
  const format::Header& h = img.header();
  const format::ParsedHeader& p = img.parsed();
  Json d = Json::object();
  if (h.version == 2) {
    d["compat"] = "0.10";
    d["refcount-bits"] = h.refcount_bits();
    d["compression-type"] = format::CompressionTypeName(h.compression_type);
    return d;
  }
  d["compat"] = "1.1";
  if (p.data_file) d["data-file"] = *p.data_file;
  if (h.has_data_file()) d["data-file-raw"] = h.data_file_raw();
  d["extended-l2"] = h.extended_l2();
  d["lazy-refcounts"] = h.lazy_refcounts();
  d["corrupt"] = h.corrupt();
  d["refcount-bits"] = h.refcount_bits();
  if (!img.bitmaps().empty()) {
    Json list = Json::array();
    for (const auto& b : img.bitmaps()) list.push_back(BitmapInfo(b));
    d["bitmaps"] = std::move(list);
  }
  d["compression-type"] = format::CompressionTypeName(h.compression_type);
  return d;
}

std::string LocalDate(uint32_t seconds) {
  std::time_t t = seconds;
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

}  // namespace

Result<Json> ImageInfo(const FormatDriver& layer) {
  const auto* qcow2 = dynamic_cast<const Qcow2Image*>(&layer);
  Json j = Json::object();
  j["filename"] = layer.filename();
  j["format"] = layer.format_name();
  j["dirty-flag"] = qcow2 ? qcow2->header().dirty() : false;
  auto allocated = layer.file(0)->AllocatedBytes();
  if (!allocated.ok()) return allocated.status();
  j["actual-size"] = *allocated;
  j["virtual-size"] = layer.size();
  if (!qcow2) return j;

  const format::ParsedHeader& p = qcow2->parsed();
  j["cluster-size"] = p.header.cluster_size();
  if (p.backing_file) {
    j["backing-filename"] = *p.backing_file;
    j["full-backing-filename"] = ResolveBackingName(layer.filename(), *p.backing_file);
    if (p.backing_format) j["backing-filename-format"] = *p.backing_format;
  }
  if (!qcow2->snapshots().empty()) {
    Json list = Json::array();
    for (const auto& s : qcow2->snapshots()) list.push_back(SnapshotInfo(s));
    j["snapshots"] = std::move(list);
  }
  Json specific = Json::object();
  specific["type"] = "qcow2";
  specific["data"] = Qcow2Specific(*qcow2);
  j["format-specific"] = std::move(specific);
  return j;
}

std::string SnapshotTableRow(const Json& s) {
  if (s.is_null()) {
    return fmt::format("{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}", "ID", "TAG", "VM SIZE", "DATE",
                       "VM CLOCK", "ICOUNT");
  }
  uint64_t clock_ns =
      s["vm-clock-sec"].get<uint64_t>() * kNanosPerSecond + s["vm-clock-nsec"].get<uint64_t>();
  uint64_t secs = clock_ns / kNanosPerSecond;
  std::string clock = fmt::format("{:02}:{:02}:{:02}.{:03}", secs / 3600, (secs / 60) % 60,
                                  secs % 60, (clock_ns / 1000000) % 1000);
  std::string icount = s.contains("icount") ? std::to_string(s["icount"].get<uint64_t>()) : "";
  return fmt::format("{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}", s["id"].get<std::string>(),
                     s["name"].get<std::string>(),
                     QemuSizeToStr(s["vm-state-size"].get<uint64_t>()),
                     LocalDate(s["date-sec"].get<uint32_t>()), clock, icount);
}

std::string ImageInfoHuman(const Json& info) {
  const uint64_t vsize = info["virtual-size"].get<uint64_t>();
  std::string out =
      fmt::format("image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
                  info["filename"].get<std::string>(), info["format"].get<std::string>(),
                  QemuSizeToStr(vsize), vsize,
                  info.contains("actual-size") ? QemuSizeToStr(info["actual-size"].get<uint64_t>())
                                               : "unavailable");
  if (info.contains("cluster-size")) {
    out += fmt::format("cluster_size: {}\n", info["cluster-size"].get<uint64_t>());
  }
  if (info.value("dirty-flag", false)) out += "cleanly shut down: no\n";
  if (info.contains("backing-filename")) {
    const std::string name = info["backing-filename"].get<std::string>();
    out += "backing file: " + name;
    if (!info.contains("full-backing-filename")) {
      out += " (cannot determine actual path)";
    } else if (info["full-backing-filename"].get<std::string>() != name) {
      out += " (actual path: " + info["full-backing-filename"].get<std::string>() + ")";
    }
    out += "\n";
    if (info.contains("backing-filename-format")) {
      out += "backing file format: " + info["backing-filename-format"].get<std::string>() + "\n";
    }
  }
  if (info.contains("snapshots")) {
    out += "Snapshot list:\n" + SnapshotTableRow(Json()) + "\n";
    for (const Json& s : info["snapshots"]) out += SnapshotTableRow(s) + "\n";
  }
  if (info.contains("format-specific")) {
    out += "Format specific information:\n";
    out += QemuHumanDump(info["format-specific"]["data"], 1);
  }
  return out;
}

}  // namespace qcow2kit::tools
