// dump: the header and its extensions.
#include <cstring>

#include "format/endian.h"
#include "format/hex.h"
#include "tools/dump.h"

namespace qcow2kit::tools {
namespace {

const std::vector<format::FeatureName>& FeatureTable(const Qcow2Image& img) {
  const auto& own = img.parsed().feature_names;
  return own.empty() ? format::StandardFeatureNames() : own;
}

Json FeatureNames(const Qcow2Image& img, uint64_t mask, uint8_t type) {
  Json names = Json::array();
  for (int bit = 0; bit < 64; ++bit) {
    if (mask & (1ull << bit)) {
      names.push_back(format::DescribeFeatures(1ull << bit, type, FeatureTable(img)));
    }
  }
  return names;
}

const char* ExtensionName(uint32_t type) {
  switch (type) {
    case format::kExtBackingFormat:
      return "backing format";
    case format::kExtFeatureTable:
      return "feature name table";
    case format::kExtBitmaps:
      return "bitmaps";
    case format::kExtCrypto:
      return "full disk encryption header pointer";
    case format::kExtDataFile:
      return "external data file name";
    default:
      return "unknown";
  }
}

std::string HexBytes(const std::vector<uint8_t>& data, size_t limit) {
  static const char kDigits[] = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < data.size() && i < limit; ++i) {
    s += kDigits[data[i] >> 4];
    s += kDigits[data[i] & 15];
  }
  if (data.size() > limit) s += "...";
  return s;
}

// The content of one extension, decoded where its type is known and its length right.
Json ExtensionContent(const format::RawExtension& e) {
  const std::vector<uint8_t>& d = e.data;
  Json c = Json::object();
  switch (e.type) {
    case format::kExtBackingFormat:
      c["format"] = std::string(d.begin(), d.end());
      return c;
    case format::kExtDataFile:
      c["filename"] = std::string(d.begin(), d.end());
      return c;
    case format::kExtFeatureTable: {
      static const char* const kKinds[] = {"incompatible", "compatible", "autoclear"};
      Json list = Json::array();
      for (size_t pos = 0; pos + 48 <= d.size(); pos += 48) {
        const char* name = reinterpret_cast<const char*>(&d[pos + 2]);
        Json f = Json::object();
        f["type"] = d[pos] < 3 ? kKinds[d[pos]] : std::to_string(d[pos]);
        f["bit"] = d[pos + 1];
        f["name"] = std::string(name, strnlen(name, 46));
        list.push_back(std::move(f));
      }
      c["features"] = std::move(list);
      return c;
    }
    case format::kExtBitmaps:
      if (d.size() == 24) {
        c["nb_bitmaps"] = format::LoadBE32(&d[0]);
        c["reserved"] = format::LoadBE32(&d[4]);
        c["directory_size"] = format::LoadBE64(&d[8]);
        c["directory_offset"] = format::LoadBE64(&d[16]);
        return c;
      }
      break;
    case format::kExtCrypto:
      if (d.size() == 16) {
        c["offset"] = format::LoadBE64(&d[0]);
        c["length"] = format::LoadBE64(&d[8]);
        return c;
      }
      break;
    default:
      break;
  }
  c["data"] = HexBytes(d, 64);
  return c;
}

}  // namespace

Json DumpHeader(const Qcow2Image& img) {
  const format::Header& h = img.header();
  const format::ParsedHeader& p = img.parsed();
  Json j = Json::object();
  j["magic"] = format::kMagic;
  j["version"] = h.version;
  j["backing_file_offset"] = h.backing_file_offset;
  j["backing_file_size"] = h.backing_file_size;
  j["cluster_bits"] = h.cluster_bits;
  j["cluster_size"] = h.cluster_size();
  j["size"] = h.size;
  j["crypt_method"] = h.crypt_method;
  j["l1_size"] = h.l1_size;
  j["l1_table_offset"] = h.l1_table_offset;
  j["refcount_table_offset"] = h.refcount_table_offset;
  j["refcount_table_clusters"] = h.refcount_table_clusters;
  j["nb_snapshots"] = h.nb_snapshots;
  j["snapshots_offset"] = h.snapshots_offset;
  j["incompatible_features"] = h.incompatible_features;
  j["incompatible_feature_names"] = FeatureNames(img, h.incompatible_features, 0);
  j["compatible_features"] = h.compatible_features;
  j["compatible_feature_names"] = FeatureNames(img, h.compatible_features, 1);
  j["autoclear_features"] = h.autoclear_features;
  j["autoclear_feature_names"] = FeatureNames(img, h.autoclear_features, 2);
  j["refcount_order"] = h.refcount_order;
  j["refcount_bits"] = h.refcount_bits();
  j["header_length"] = h.header_length;
  j["compression_type"] = static_cast<unsigned>(h.compression_type);
  j["compression_type_name"] = format::CompressionTypeName(h.compression_type);
  if (p.backing_file) j["backing_file"] = *p.backing_file;
  return j;
}

Json DumpExtensions(const Qcow2Image& img) {
  Json list = Json::array();
  for (const format::RawExtension& e : img.parsed().extensions) {
    Json x = Json::object();
    x["type"] = e.type;
    x["type_hex"] = format::Hex(e.type);
    x["name"] = ExtensionName(e.type);
    x["offset"] = e.offset;
    x["length"] = e.data.size();
    x["content"] = ExtensionContent(e);
    list.push_back(std::move(x));
  }
  return list;
}

}  // namespace qcow2kit::tools
