#include "tools/qemu_json.h"

#include <algorithm>
#include <cstdint>

#include "fmt/format.h"

namespace qcow2kit::tools {
namespace {

constexpr unsigned kQdictBuckets = 512;

std::string Indent(int level) {
  return std::string(static_cast<size_t>(level) * 4, ' ');
}

// Decodes one UTF-8 sequence at `p` as QEMU's mod_utf8_codepoint() does for well-formed input;
// anything malformed (or overlong, or a surrogate) yields -1 and consumes one byte.
int DecodeUtf8(std::string_view s, size_t* pos) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  unsigned char c = byte(*pos);
  if (c < 0x80) {
    ++*pos;
    return c;
  }
  int len = c >= 0xf0 && c < 0xf8 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 0;
  if (len == 0 || *pos + len > s.size()) {
    ++*pos;
    return -1;
  }
  int cp = c & (0x7f >> len);
  for (int i = 1; i < len; ++i) {
    unsigned char cc = byte(*pos + i);
    if ((cc & 0xc0) != 0x80) {
      ++*pos;
      return -1;
    }
    cp = (cp << 6) | (cc & 0x3f);
  }
  static constexpr int kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
    ++*pos;
    return -1;
  }
  *pos += len;
  return cp;
}

void WritePretty(const Json& v, int depth, std::string* out) {
  switch (v.type()) {
    case Json::value_t::object:
    case Json::value_t::array: {
      const bool object = v.is_object();
      *out += object ? '{' : '[';
      bool first = true;
      auto member = [&](const std::string* key, const Json& value) {
        *out += first ? "\n" : ",\n";
        first = false;
        *out += Indent(depth + 1);
        if (key) *out += QemuJsonQuote(*key) + ": ";
        WritePretty(value, depth + 1, out);
      };
      if (object) {
        for (auto& [key, value] : QdictOrder(v)) member(key, *value);
      } else {
        for (const Json& value : v) member(nullptr, value);
      }
      *out += "\n" + Indent(depth) + (object ? '}' : ']');
      break;
    }
    case Json::value_t::string:
      *out += QemuJsonQuote(v.get_ref<const std::string&>());
      break;
    case Json::value_t::boolean:
      *out += v.get<bool>() ? "true" : "false";
      break;
    case Json::value_t::number_integer:
      *out += std::to_string(v.get<int64_t>());
      break;
    case Json::value_t::number_unsigned:
      *out += std::to_string(v.get<uint64_t>());
      break;
    case Json::value_t::number_float:
      *out += fmt::format("{:.17g}", v.get<double>());
      break;
    default:
      *out += "null";
      break;
  }
}

std::string Scalar(const Json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  return v.dump();
}

void WriteHuman(const Json& v, int indentation, std::string* out) {
  auto member = [&](const std::string& label, const Json& value) {
    bool composite = value.is_object() || value.is_array();
    *out += Indent(indentation) + label + ":" + (composite ? '\n' : ' ');
    if (composite) {
      WriteHuman(value, indentation + 1, out);
    } else {
      *out += Scalar(value) + "\n";
    }
  };
  if (v.is_object()) {
    for (auto& [key, value] : QdictOrder(v)) {
      std::string label = *key;
      std::replace(label.begin(), label.end(), '-', ' ');
      member(label, *value);
    }
  } else if (v.is_array()) {
    int i = 0;
    for (const Json& value : v) member(fmt::format("[{}]", i++), value);
  } else {
    *out += Scalar(v);
  }
}

}  // namespace

unsigned QdictBucket(std::string_view key) {
  uint32_t value = 0x238F13AFu * static_cast<uint32_t>(key.size());
  for (size_t i = 0; i < key.size(); ++i) {
    value += static_cast<uint32_t>(static_cast<unsigned char>(key[i])) << (i * 5 % 24);
  }
  return (1103515243u * value + 12345u) % kQdictBuckets;
}

std::vector<std::pair<const std::string*, const Json*>> QdictOrder(const Json& object) {
  struct Member {
    unsigned bucket;
    size_t index;
    const std::string* key;
    const Json* value;
  };
  std::vector<Member> members;
  for (auto it = object.begin(); it != object.end(); ++it) {
    members.push_back({QdictBucket(it.key()), members.size(), &it.key(), &it.value()});
  }
  // Buckets in order; inside one, the most recently inserted key comes first.
  std::sort(members.begin(), members.end(), [](const Member& a, const Member& b) {
    return a.bucket != b.bucket ? a.bucket < b.bucket : a.index > b.index;
  });
  std::vector<std::pair<const std::string*, const Json*>> out;
  out.reserve(members.size());
  for (const Member& m : members) out.emplace_back(m.key, m.value);
  return out;
}

std::string QemuJsonQuote(std::string_view s) {
  std::string out = "\"";
  for (size_t pos = 0; pos < s.size();) {
    int cp = DecodeUtf8(s, &pos);
    switch (cp) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (cp < 0) cp = 0xfffd;
        if (cp > 0xffff) {
          out += fmt::format("\\u{:04X}\\u{:04X}", 0xd800 + ((cp - 0x10000) >> 10),
                             0xdc00 + ((cp - 0x10000) & 0x3ff));
        } else if (cp < 0x20 || cp >= 0x7f) {
          out += fmt::format("\\u{:04X}", cp);
        } else {
          out += static_cast<char>(cp);
        }
    }
  }
  return out + "\"";
}

std::string QemuJsonPretty(const Json& value) {
  std::string out;
  WritePretty(value, 0, &out);
  return out;
}

std::string JsonDump(const Json& value, int indent) {
  return value.dump(indent, ' ', false, Json::error_handler_t::replace);
}

std::string QemuHumanDump(const Json& value, int indentation) {
  std::string out;
  WriteHuman(value, indentation, &out);
  return out;
}

}  // namespace qcow2kit::tools
