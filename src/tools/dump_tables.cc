// dump: the L1 table, the L2 tables and the refcounts.
#include <algorithm>

#include "format/hex.h"
#include "tools/dump.h"

namespace qcow2kit::tools {
namespace {

// One non-zero L2 entry.
Json L2Entry(const Qcow2Image& img, uint64_t index, uint64_t guest, uint64_t entry,
             uint64_t bitmap) {
  const format::Geometry& g = img.geometry();
  const format::ClusterType type = format::ClassifyCluster(entry, g);
  Json e = Json::object();
  e["index"] = index;
  e["guest_offset"] = guest;
  e["entry"] = format::HexEntry(entry);
  if (g.extended_l2) e["bitmap"] = format::HexEntry(bitmap);
  e["type"] = ClusterTypeName(type);
  if (type == format::ClusterType::kCompressed) {
    const format::CompressedDescriptor d = format::DecodeCompressed(entry, g.cluster_bits);
    e["compressed"] = {{"host_offset", d.host_offset},
                       {"extra_sectors", d.extra_sectors},
                       {"max_length", d.read_bound()}};
  } else {
    if (format::L2EntryOffset(entry) != 0) e["host_offset"] = format::L2EntryOffset(entry);
    e["copied"] = (entry & format::kOflagCopied) != 0;
    if (g.extended_l2) e["subclusters"] = SubclusterMap(bitmap);
  }
  Status valid = format::ValidateL2Entry(entry, bitmap, guest, img.header().version, g);
  if (!valid.ok()) e["error"] = valid.message();
  return e;
}

}  // namespace

const char* ClusterTypeName(format::ClusterType t) {
  switch (t) {
    case format::ClusterType::kUnallocated:
      return "unallocated";
    case format::ClusterType::kZeroPlain:
      return "zero-plain";
    case format::ClusterType::kZeroAlloc:
      return "zero-alloc";
    case format::ClusterType::kNormal:
      return "normal";
    case format::ClusterType::kCompressed:
      return "compressed";
  }
  return "invalid";
}

std::string SubclusterMap(uint64_t bitmap) {
  std::string s;
  for (int i = 0; i < 32; ++i) {
    const bool alloc = bitmap & (1ull << i);
    const bool zero = bitmap & (1ull << (32 + i));
    s += alloc && zero ? '!' : alloc ? 'D' : zero ? 'Z' : '.';
  }
  return s;
}

Json DumpL1(const Qcow2Image& img) {
  const format::Geometry& g = img.geometry();
  Json entries = Json::array();
  for (uint64_t i = 0; i < img.l1_table().size(); ++i) {
    const uint64_t e = img.l1_table()[i];
    if (e == 0) continue;
    Json x = Json::object();
    x["index"] = i;
    x["guest_offset"] = i * g.l2_coverage();
    x["entry"] = format::HexEntry(e);
    x["offset"] = format::L1EntryOffset(e);
    x["copied"] = (e & format::kOflagCopied) != 0;
    if (Status v = format::ValidateL1Entry(e, i, g); !v.ok()) x["error"] = v.message();
    entries.push_back(std::move(x));
  }
  Json j = Json::object();
  j["offset"] = img.header().l1_table_offset;
  j["size"] = img.header().l1_size;
  j["used"] = entries.size();
  j["entries"] = std::move(entries);
  return j;
}

Task<Result<Json>> DumpL2(Qcow2Image& img) {
  const format::Geometry& g = img.geometry();
  const uint64_t words = g.l2_entry_bytes() / 8;
  Json tables = Json::array();
  for (uint64_t i = 0; i < img.l1_table().size(); ++i) {
    const uint64_t l2_offset = format::L1EntryOffset(img.l1_table()[i]);
    if (l2_offset == 0) continue;
    // An invalid L1 entry is shown (with its error) by the L1 section; its table is not read.
    if (!format::ValidateL1Entry(img.l1_table()[i], i, g).ok()) continue;
    Json t = Json::object();
    t["l1_index"] = i;
    t["offset"] = l2_offset;
    t["guest_offset"] = i * g.l2_coverage();
    // A table that cannot be read is reported in its place: the rest is still worth seeing.
    auto table = co_await img.ReadL2Table(l2_offset);
    if (!table.ok()) {
      t["error"] = table.status().ToString();
      tables.push_back(std::move(t));
      continue;
    }
    Json entries = Json::array();
    for (uint64_t j = 0; j < g.l2_entries(); ++j) {
      const uint64_t entry = (*table)[j * words];
      const uint64_t bitmap = words > 1 ? (*table)[j * words + 1] : 0;
      if (entry == 0 && bitmap == 0) continue;
      const uint64_t guest = (i * g.l2_entries() + j) << g.cluster_bits;
      entries.push_back(L2Entry(img, j, guest, entry, bitmap));
    }
    t["entries"] = std::move(entries);
    tables.push_back(std::move(t));
  }
  co_return tables;
}

Task<Result<Json>> DumpRefcounts(Qcow2Image& img) {
  const format::Header& h = img.header();
  const uint64_t cs = img.geometry().cluster_size();
  Json table = Json::array();
  for (uint64_t i = 0; i < img.refcount_table().size(); ++i) {
    const uint64_t e = img.refcount_table()[i];
    if (e == 0) continue;
    table.push_back({{"index", i},
                     {"entry", format::HexEntry(e)},
                     {"offset", e & format::kRefcountTableOffsetMask},
                     {"first_cluster", i * img.refcount_geometry().block_entries()}});
  }
  // Refcounts of the clusters the file holds, as runs of equal non-zero values.
  QK_CO_ASSIGN_OR_RETURN(uint64_t file_size, img.file(0)->Size());
  const uint64_t clusters = (file_size + cs - 1) / cs;
  Json runs = Json::array();
  uint64_t run_start = 0, run_len = 0, run_value = 0;
  auto flush = [&] {
    if (run_len && run_value) {
      runs.push_back({{"first_cluster", run_start},
                      {"clusters", run_len},
                      {"host_offset", run_start * cs},
                      {"refcount", run_value}});
    }
  };
  Json errors = Json::array();
  const uint64_t per_block = img.refcount_geometry().block_entries();
  for (uint64_t c = 0; c < clusters; ++c) {
    auto rc = co_await img.Refcount(c * cs);
    if (!rc.ok()) {
      // An unreadable refcount block: note it and go on with the next one.
      flush();
      run_len = 0;
      errors.push_back({{"first_cluster", c}, {"error", rc.status().ToString()}});
      c = (c / per_block + 1) * per_block - 1;
      continue;
    }
    if (run_len && *rc == run_value) {
      ++run_len;
      continue;
    }
    flush();
    run_start = c;
    run_len = 1;
    run_value = *rc;
  }
  flush();
  Json j = Json::object();
  j["refcount_bits"] = h.refcount_bits();
  j["table_offset"] = h.refcount_table_offset;
  j["table_clusters"] = h.refcount_table_clusters;
  j["table"] = std::move(table);
  j["file_clusters"] = clusters;
  j["runs"] = std::move(runs);
  if (!errors.empty()) j["errors"] = std::move(errors);
  co_return j;
}

}  // namespace qcow2kit::tools
