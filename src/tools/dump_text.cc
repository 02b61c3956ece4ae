// dump: the text rendering of each section's JSON.
#include "fmt/format.h"
#include "tools/dump.h"

namespace qcow2kit::tools {
namespace {

std::string Hex(const Json& v) {
  return fmt::format("{:#x}", v.get<uint64_t>());
}

bool ShownInHex(const std::string& key) {
  return key == "magic" || key.ends_with("_offset") || key.ends_with("_features");
}

std::string Joined(const Json& list) {
  std::string s;
  for (const Json& x : list) s += (s.empty() ? "" : ", ") + x.get<std::string>();
  return s;
}

std::string HeaderText(const Json& h) {
  std::string out = "Header:\n";
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& key = it.key();
    if (key.ends_with("_feature_names")) continue;  // shown with the mask
    std::string value;
    if (it->is_string()) {
      value = it->get<std::string>();
    } else if (ShownInHex(key)) {
      value = Hex(*it);
    } else {
      value = std::to_string(it->get<uint64_t>());
    }
    if (key.ends_with("_features")) {
      const std::string names = Joined(h[key.substr(0, key.size() - 1) + "_names"]);
      if (!names.empty()) value += " (" + names + ")";
    }
    out += fmt::format("    {:<27} {}\n", key, value);
  }
  return out;
}

std::string ExtensionsText(const Json& list) {
  std::string out = fmt::format("Header extensions: {}\n", list.size());
  for (const Json& e : list) {
    out += fmt::format("    {} ({}) at {}, {} bytes\n", e["type_hex"].get<std::string>(),
                       e["name"].get<std::string>(), Hex(e["offset"]), e["length"].get<uint64_t>());
    const Json& c = e["content"];
    for (auto it = c.begin(); it != c.end(); ++it) {
      if (it.key() == "features") {
        for (const Json& f : *it) {
          out += fmt::format("        {} bit {}: {}\n", f["type"].get<std::string>(),
                             f["bit"].get<unsigned>(), f["name"].get<std::string>());
        }
      } else if (it->is_string()) {
        out += fmt::format("        {}: {}\n", it.key(), it->get<std::string>());
      } else {
        out += fmt::format("        {}: {}\n", it.key(),
                           ShownInHex(it.key()) ? Hex(*it) : std::to_string(it->get<uint64_t>()));
      }
    }
  }
  return out;
}

std::string L1Text(const Json& l1) {
  std::string out = fmt::format("L1 table at {}: {} entries, {} in use\n", Hex(l1["offset"]),
                                l1["size"].get<uint64_t>(), l1["used"].get<uint64_t>());
  if (l1["entries"].empty()) return out;
  out += fmt::format("    {:<8} {:<18} {:<18} {:<18} {}\n", "index", "guest offset", "entry",
                     "L2 table", "copied");
  for (const Json& e : l1["entries"]) {
    out += fmt::format("    {:<8} {:<18} {:<18} {:<18} {}{}\n", e["index"].get<uint64_t>(),
                       Hex(e["guest_offset"]), e["entry"].get<std::string>(), Hex(e["offset"]),
                       e["copied"].get<bool>() ? "yes" : "no",
                       e.contains("error") ? " INVALID: " + e["error"].get<std::string>() : "");
  }
  return out;
}

std::string L2EntryText(const Json& e) {
  std::string where;
  if (e.contains("compressed")) {
    const Json& c = e["compressed"];
    where = fmt::format("{} (+{} sectors, <= {} bytes)", Hex(c["host_offset"]),
                        c["extra_sectors"].get<uint64_t>(), c["max_length"].get<uint64_t>());
  } else {
    where = e.contains("host_offset") ? Hex(e["host_offset"]) : "-";
    if (e["copied"].get<bool>()) where += " copied";
  }
  std::string line = fmt::format("    {:<8} {:<18} {:<18} {:<12} {}", e["index"].get<uint64_t>(),
                                 Hex(e["guest_offset"]), e["entry"].get<std::string>(),
                                 e["type"].get<std::string>(), where);
  if (e.contains("bitmap")) {
    line += fmt::format(" bitmap {}", e["bitmap"].get<std::string>());
    if (e.contains("subclusters")) line += " [" + e["subclusters"].get<std::string>() + "]";
  }
  if (e.contains("error")) line += " INVALID: " + e["error"].get<std::string>();
  return line + "\n";
}

std::string L2Text(const Json& tables) {
  std::string out = fmt::format("L2 tables: {}\n", tables.size());
  for (const Json& t : tables) {
    out += fmt::format("L2 table at {} (L1 index {}, guest offset {}): {} non-zero entries\n",
                       Hex(t["offset"]), t["l1_index"].get<uint64_t>(), Hex(t["guest_offset"]),
                       t.contains("entries") ? t["entries"].size() : 0);
    if (t.contains("error")) out += "    UNREADABLE: " + t["error"].get<std::string>() + "\n";
    if (!t.contains("entries") || t["entries"].empty()) continue;
    out += fmt::format("    {:<8} {:<18} {:<18} {:<12} {}\n", "index", "guest offset", "entry",
                       "type", "host offset");
    for (const Json& e : t["entries"]) out += L2EntryText(e);
  }
  return out;
}

std::string RefcountsText(const Json& r) {
  std::string out =
      fmt::format("Refcount table at {} ({} clusters), {}-bit refcounts\n", Hex(r["table_offset"]),
                  r["table_clusters"].get<uint64_t>(), r["refcount_bits"].get<unsigned>());
  out += fmt::format("    {:<8} {:<18} {:<18} {}\n", "index", "entry", "block offset",
                     "first cluster");
  for (const Json& e : r["table"]) {
    out += fmt::format("    {:<8} {:<18} {:<18} {}\n", e["index"].get<uint64_t>(),
                       e["entry"].get<std::string>(), Hex(e["offset"]),
                       e["first_cluster"].get<uint64_t>());
  }
  out += fmt::format("Refcounts of the {} clusters in the file (zero runs omitted):\n",
                     r["file_clusters"].get<uint64_t>());
  out += fmt::format("    {:<24} {:<18} {}\n", "clusters", "host offset", "refcount");
  for (const Json& run : r["runs"]) {
    const uint64_t first = run["first_cluster"].get<uint64_t>();
    const uint64_t n = run["clusters"].get<uint64_t>();
    std::string range = n == 1 ? std::to_string(first) : fmt::format("{}-{}", first, first + n - 1);
    out += fmt::format("    {:<24} {:<18} {}\n", range, Hex(run["host_offset"]),
                       run["refcount"].get<uint64_t>());
  }
  if (r.contains("errors")) {
    for (const Json& e : r["errors"]) {
      out += fmt::format("    UNREADABLE from cluster {}: {}\n", e["first_cluster"].get<uint64_t>(),
                         e["error"].get<std::string>());
    }
  }
  return out;
}

// Objects of plain values, one "key: value" line each, indented.
std::string FieldsText(const Json& obj, const std::string& indent) {
  std::string out;
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    std::string value;
    if (it->is_string()) {
      value = it->get<std::string>();
    } else if (it->is_boolean()) {
      value = it->get<bool>() ? "true" : "false";
    } else if (it->is_array()) {
      value = Joined(*it);
    } else {
      value = ShownInHex(it.key()) ? Hex(*it) : std::to_string(it->get<uint64_t>());
    }
    out += fmt::format("{}{}: {}\n", indent, it.key(), value);
  }
  return out;
}

std::string SnapshotsText(const Json& s) {
  std::string out = fmt::format("Snapshot table at {}: {} snapshots\n", Hex(s["offset"]),
                                s["count"].get<uint64_t>());
  for (const Json& x : s["snapshots"]) {
    out += fmt::format("    Snapshot {}:\n", x["index"].get<uint64_t>());
    out += FieldsText(x, "        ");
  }
  return out;
}

std::string BitmapsText(const Json& b) {
  Json head = b;
  head.erase("bitmaps");
  std::string out = "Bitmaps:\n" + FieldsText(head, "    ");
  for (const Json& x : b["bitmaps"]) {
    out += fmt::format("    Bitmap '{}':\n", x["name"].get<std::string>());
    out += FieldsText(x, "        ");
  }
  return out;
}

}  // namespace

std::string DumpSectionText(const std::string& section, const Json& value) {
  if (section == "header") return HeaderText(value);
  if (section == "extensions") return ExtensionsText(value);
  if (section == "l1") return L1Text(value);
  if (section == "l2") return L2Text(value);
  if (section == "refcounts") return RefcountsText(value);
  if (section == "snapshots") return SnapshotsText(value);
  if (section == "bitmaps") return BitmapsText(value);
  return JsonDump(value) + "\n";
}

}  // namespace qcow2kit::tools
