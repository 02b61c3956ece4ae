// qemu-img's create options: parsing `-o`, the help text and the "Formatting" line.
#include "image/create_options.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <span>

#include "qcow2kit/image.h"

namespace qcow2kit {
namespace {

enum class Type { kString, kBool, kNumber, kSize };

struct OptionDesc {
  const char* name;
  Type type;
  const char* default_value;  // printed in the "Formatting" line when not given
  const char* help;
};

// In QEMU's create_opts order, which is the order of the "Formatting" line. qemu-img also
// knows encrypt.*, nocow and extent_size_hint; we do not implement them.
constexpr OptionDesc kQcow2Options[] = {
    {"cluster_size", Type::kSize, "65536", "qcow2 cluster size"},
    {"extended_l2", Type::kBool, "off", "Extended L2 tables"},
    {"preallocation", Type::kString, nullptr,
     "Preallocation mode (allowed values: off, metadata, falloc, full)"},
    {"compression_type", Type::kString, "zlib",
     "Compression method used for image cluster compression"},
    {"size", Type::kSize, nullptr, "Virtual disk size"},
    {"compat", Type::kString, nullptr, "Compatibility level (v2 [0.10] or v3 [1.1])"},
    {"backing_file", Type::kString, nullptr, "File name of a base image"},
    {"backing_fmt", Type::kString, nullptr, "Image format of the base image"},
    {"data_file", Type::kString, nullptr, "File name of an external data file"},
    {"data_file_raw", Type::kBool, nullptr,
     "The external data file must stay valid as a raw image"},
    {"lazy_refcounts", Type::kBool, "off", "Postpone refcount updates"},
    {"refcount_bits", Type::kNumber, "16", "Width of a reference count entry in bits"},
};
constexpr OptionDesc kRawOptions[] = {
    {"size", Type::kSize, nullptr, "Virtual disk size"},
    {"preallocation", Type::kString, nullptr,
     "Preallocation mode (allowed values: off, falloc, full)"},
};

// The names QAPI's BlockdevDriver enumeration accepts for backing_fmt.
constexpr const char* kBlockDrivers[] = {
    "blkdebug",     "blklogwrites", "blkreplay",   "blkverify",
    "bochs",        "cloop",        "compress",    "copy-before-write",
    "copy-on-read", "dmg",          "file",        "snapshot-access",
    "ftp",          "ftps",         "gluster",     "host_cdrom",
    "host_device",  "http",         "https",       "iscsi",
    "luks",         "nbd",          "nfs",         "null-aio",
    "null-co",      "nvme",         "parallels",   "preallocate",
    "qcow",         "qcow2",        "qed",         "quorum",
    "raw",          "rbd",          "replication", "ssh",
    "throttle",     "vdi",          "vhdx",        "vmdk",
    "vpc",          "vvfat"};

std::span<const OptionDesc> OptionsOf(const std::string& format) {
  if (format == "qcow2") return kQcow2Options;
  return kRawOptions;
}

const OptionDesc* FindOption(const std::string& format, const std::string& name) {
  for (const OptionDesc& d : OptionsOf(format)) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

const char* TypeName(Type t) {
  switch (t) {
    case Type::kString:
      return "str";
    case Type::kBool:
      return "bool (on/off)";
    case Type::kNumber:
      return "num";
    case Type::kSize:
      return "size";
  }
  return "";
}

Result<bool> ParseBool(const std::string& name, const std::string& v) {
  if (v == "on" || v == "yes" || v == "true" || v == "y") return true;
  if (v == "off" || v == "no" || v == "false" || v == "n") return false;
  return Status::Invalid("Parameter '" + name + "' expects 'on' or 'off'");
}

// qemu_strtou64 with base 0: decimal, 0x hex or 0 octal, the whole string.
Result<uint64_t> ParseNumber(const std::string& name, const std::string& v) {
  auto bad = [&] { return Status::Invalid("Parameter '" + name + "' expects a number"); };
  if (v.empty() || v[0] == '-' || v[0] == '+' || v[0] == ' ') return bad();
  errno = 0;
  char* end = nullptr;
  uint64_t n = std::strtoull(v.c_str(), &end, 0);
  if (errno != 0 || *end != '\0') return bad();
  return n;
}

Result<uint64_t> ParseSizeOption(const std::string& name, const std::string& v) {
  auto n = ParseSize(v);
  if (!n.ok()) {
    return Status::Invalid("Parameter '" + name +
                           "' expects a non-negative number below 2^64\n"
                           "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                           "tera-, peta-\nand exabytes, respectively.");
  }
  return *n;
}

// Checks the syntax of one value; returns its numeric value for sizes and numbers.
Result<std::optional<uint64_t>> CheckValue(const OptionDesc& d, const std::string& v) {
  switch (d.type) {
    case Type::kString:
      return std::optional<uint64_t>();
    case Type::kBool: {
      QK_ASSIGN_OR_RETURN(bool b, ParseBool(d.name, v));
      (void)b;
      return std::optional<uint64_t>();
    }
    case Type::kNumber: {
      QK_ASSIGN_OR_RETURN(uint64_t n, ParseNumber(d.name, v));
      return std::optional<uint64_t>(n);
    }
    case Type::kSize: {
      QK_ASSIGN_OR_RETURN(uint64_t n, ParseSizeOption(d.name, v));
      return std::optional<uint64_t>(n);
    }
  }
  return std::optional<uint64_t>();
}

const std::string* Find(const OptionList& list, const std::string& name) {
  for (const auto& [k, v] : list) {
    if (k == name) return &v;
  }
  return nullptr;
}

void Set(OptionList* list, const std::string& name, const std::string& value) {
  for (auto& [k, v] : *list) {
    if (k == name) {
      v = value;
      return;
    }
  }
  list->emplace_back(name, value);
}

std::string DoubleCommas(const std::string& s) {
  std::string out;
  for (char c : s) {
    out += c;
    if (c == ',') out += ',';
  }
  return out;
}

Status EnumError(const std::string& param, const std::string& value) {
  return Status::Invalid("Parameter '" + param + "' does not accept value '" + value + "'");
}

}  // namespace


std::optional<std::string> OptionValue(const OptionList& list, const std::string& name) {
  const std::string* v = Find(list, name);
  return v ? std::optional<std::string>(*v) : std::nullopt;
}

OptionList ParseOptionString(const std::string& text) {
  OptionList out;
  size_t i = 0;
  while (i < text.size()) {
    // One element runs to the next single comma; ",," stands for a comma.
    std::string element;
    for (; i < text.size(); ++i) {
      if (text[i] == ',') {
        if (i + 1 < text.size() && text[i + 1] == ',') {
          element += ',';
          ++i;
          continue;
        }
        break;
      }
      element += text[i];
    }
    ++i;  // the separating comma
    size_t eq = element.find('=');
    if (eq == std::string::npos) {
      out.emplace_back(element, "on");  // a bare name switches a boolean on
    } else {
      out.emplace_back(element.substr(0, eq), element.substr(eq + 1));
    }
  }
  return out;
}

bool WantsOptionHelp(const std::string& text) {
  for (const auto& [key, value] : ParseOptionString(text)) {
    if ((key == "help" || key == "?") && value == "on") return true;
  }
  return false;
}

Result<std::string> OptionHelp(const std::string& format, bool with_protocol) {
  if (format != "qcow2" && format != "raw") {
    return Status::Invalid("Unknown file format '" + format + "'");
  }
  std::vector<const OptionDesc*> sorted;
  for (const OptionDesc& d : OptionsOf(format)) sorted.push_back(&d);
  std::sort(sorted.begin(), sorted.end(), [](const OptionDesc* a, const OptionDesc* b) {
    return std::string(a->name) < b->name;
  });
  std::string out = with_protocol ? "Supported options:\n" : "Supported " + format + " options:\n";
  for (const OptionDesc* d : sorted) {
    if (!with_protocol && format == "raw" && std::string(d->name) == "preallocation") {
      continue;  // raw's preallocation belongs to the file protocol
    }
    std::string head = std::string(d->name) + "=<" + TypeName(d->type) + ">";
    if (head.size() < 22) head.resize(22, ' ');
    out += "  " + head + " - " + d->help + "\n";
  }
  if (!with_protocol) {
    out +=
        "\nThe protocol level may support further options.\n"
        "Specify the target filename to include those options.\n";
  }
  return out;
}

Result<ParsedRequest> ParseCreateRequest(const CreateRequest& request) {
  if (request.format != "qcow2" && request.format != "raw") {
    return Status::Invalid("Unknown file format '" + request.format + "'");
  }
  ParsedRequest out;
  out.filename = request.filename;
  out.format = request.format;
  out.unsafe = request.unsafe;
  for (const auto& [key, value] : ParseOptionString(request.options)) {
    const OptionDesc* d = FindOption(request.format, key);
    if (!d) return Status::Invalid("Invalid parameter '" + key + "'");
    QK_ASSIGN_OR_RETURN(auto number, CheckValue(*d, value));
    if (key == "size") {
      out.size = *number;
    } else {
      Set(&out.options, key, value);
    }
  }
  if (out.size && request.size) {
    return Status::Invalid("The image size must be specified only once");
  }
  if (request.size) out.size = request.size;
  if (request.backing_file) {
    if (request.format != "qcow2") {
      return Status::Invalid("Backing file not supported for file format '" + request.format + "'");
    }
    Set(&out.options, "backing_file", *request.backing_file);
  }
  if (request.backing_format) {
    if (request.format != "qcow2") {
      return Status::Invalid("Backing file format not supported for file format '" +
                             request.format + "'");
    }
    Set(&out.options, "backing_fmt", *request.backing_format);
  }
  if (const std::string* backing = Find(out.options, "backing_file")) {
    if (*backing == out.filename) {
      return Status::Invalid(
          "Error: Trying to create an image with the same filename as the backing file");
    }
    if (backing->empty()) return Status::Invalid("Expected backing file name, got empty string");
  }
  return out;
}

std::string FormattingLine(const ParsedRequest& r) {
  std::string line = "Formatting '" + r.filename + "', fmt=" + r.format;
  for (const OptionDesc& d : OptionsOf(r.format)) {
    std::string name = d.name;
    std::string value;
    if (name == "size") {
      if (!r.size) continue;
      value = std::to_string(*r.size);
    } else if (const std::string* given = Find(r.options, name)) {
      value = *given;
      // QEMU prints sizes and numbers as it parsed them (4k -> 4096).
      if (d.type == Type::kSize || d.type == Type::kNumber) {
        auto n = CheckValue(d, value);
        if (n.ok() && n->has_value()) value = std::to_string(**n);
      } else if (d.type == Type::kString) {
        value = DoubleCommas(value);
      }
    } else if (d.default_value) {
      value = d.default_value;
    } else {
      continue;
    }
    line += " " + name + "=" + value;
  }
  return line;
}

Result<CreateOptions> ResolveCreateOptions(const ParsedRequest& r) {
  CreateOptions o;
  o.filename = r.filename;
  o.format = r.format;
  o.size = r.size;
  o.open_backing = !r.unsafe;
  auto get = [&](const char* name) { return Find(r.options, name); };
  auto number = [&](const char* name, uint64_t* out) {
    if (const std::string* v = get(name)) *out = **CheckValue(*FindOption(r.format, name), *v);
  };
  auto boolean = [&](const char* name, bool* out) {
    if (const std::string* v = get(name)) *out = *ParseBool(name, *v);
  };
  // Errors in the order QEMU's QAPI visitor meets the fields.
  if (const std::string* v = get("compat")) {
    if (*v == "0.10" || *v == "v2") {
      o.version = 2;
    } else if (*v == "1.1" || *v == "v3") {
      o.version = 3;
    } else {
      return EnumError("version", *v);
    }
  }
  if (const std::string* v = get("backing_file")) o.backing_file = *v;
  if (const std::string* v = get("backing_fmt")) {
    if (std::find_if(std::begin(kBlockDrivers), std::end(kBlockDrivers),
                     [&](const char* n) { return *v == n; }) == std::end(kBlockDrivers)) {
      return EnumError("backing-fmt", *v);
    }
    o.backing_format = *v;
  }
  if (const std::string* v = get("preallocation")) {
    if (*v == "off") {
      o.preallocation = Preallocation::kOff;
    } else if (*v == "metadata") {
      o.preallocation = Preallocation::kMetadata;
    } else if (*v == "falloc") {
      o.preallocation = Preallocation::kFalloc;
    } else if (*v == "full") {
      o.preallocation = Preallocation::kFull;
    } else if (r.format == "raw") {
      return Status::Invalid("invalid parameter value: " + *v);
    } else {
      return EnumError("preallocation", *v);
    }
  }
  if (const std::string* v = get("compression_type")) {
    if (*v == "zlib") {
      o.compression_type = format::CompressionType::kZlib;
    } else if (*v == "zstd") {
      o.compression_type = format::CompressionType::kZstd;
    } else {
      return EnumError("compression-type", *v);
    }
  }
  number("cluster_size", &o.cluster_size);
  number("refcount_bits", &o.refcount_bits);
  boolean("lazy_refcounts", &o.lazy_refcounts);
  boolean("extended_l2", &o.extended_l2);
  boolean("data_file_raw", &o.data_file_raw);
  if (const std::string* v = get("data_file")) o.data_file = *v;
  return o;
}

}  // namespace qcow2kit
