// Options of image creation, and their qemu-img spelling: the `-o key=value,...` string, the
// option help, and the "Formatting ..." line qemu-img prints before it creates an image.
//
// qemu-img handles options in two stages, and so do we: ParseOptionString / ParseCreateRequest
// reject what cannot be parsed at all (unknown names, malformed numbers and booleans, a size
// given twice) before anything is printed; ResolveCreateOptions then turns the request into
// typed CreateOptions, rejecting bad enumeration values (compat=0.11), and CreateImage checks
// the combinations (reference §3.1).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "format/header.h"
#include "qcow2kit/file.h"
#include "qcow2kit/status.h"

namespace qcow2kit {


// What CreateImage makes. Defaults are qemu-img 7.2's.
struct CreateOptions {
  std::string filename;
  std::string format = "qcow2";  // "qcow2" or "raw"
  // Virtual size in bytes, rounded up to 512 by CreateImage. May be absent for a qcow2 image
  // with a backing file: the backing image's size is used.
  std::optional<uint64_t> size;
  uint32_t version = 3;  // compat: 2 (0.10 / v2) or 3 (1.1 / v3)
  uint64_t cluster_size = 65536;
  uint64_t refcount_bits = 16;  // checked by CreateImage (power of two, <= 64)
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  format::CompressionType compression_type = format::CompressionType::kZlib;
  Preallocation preallocation = Preallocation::kOff;
  std::optional<std::string> backing_file;    // stored as given
  std::optional<std::string> backing_format;  // backing format extension
  std::optional<std::string> data_file;       // created (or truncated) as given, relative to cwd
  bool data_file_raw = false;
  bool open_backing = true;  // false: -u, do not open the backing file
};

// `-o` as parsed: every key=value in order (a bare key means "on"), later ones winning.
using OptionList = std::vector<std::pair<std::string, std::string>>;

// The value of `name` in `list`, if given.
std::optional<std::string> OptionValue(const OptionList& list, const std::string& name);

// Splits "a=b,c=d" with QEMU's escaping (",," is a literal comma). Does not check names.
OptionList ParseOptionString(const std::string& text);
// True if the option string asks for help ("help" or "?" as an element).
bool WantsOptionHelp(const std::string& text);
// qemu-img's `-o help` text for `format` ("qcow2" or "raw"); with_protocol gives the merged
// list qemu-img prints when a file name is given. Options we do not implement (encryption,
// the file protocol's nocow and extent_size_hint) are not listed.
Result<std::string> OptionHelp(const std::string& format, bool with_protocol);

// The command line of `create`, before any option is interpreted.
struct CreateRequest {
  std::string filename;
  std::string format = "raw";                 // qemu-img's default
  std::string options;                        // the -o strings joined with ","
  std::optional<uint64_t> size;               // the SIZE argument, parsed
  std::optional<std::string> backing_file;    // -b
  std::optional<std::string> backing_format;  // -F
  bool unsafe = false;                        // -u
};

// A request whose options parsed: the values qemu-img would print, typed where QEMU parses
// them at once (sizes, numbers, booleans).
struct ParsedRequest {
  std::string filename;
  std::string format;
  OptionList options;  // deduplicated, raw strings, in the order given
  std::optional<uint64_t> size;
  bool unsafe = false;
};

// The checks qemu-img makes before printing anything: known format and option names, value
// syntax, size given once and well formed, backing file allowed for the format and not empty
// or the image itself. Messages are qemu-img's (multi-line where it adds a hint).
Result<ParsedRequest> ParseCreateRequest(const CreateRequest& request);

// qemu-img's "Formatting 'FILE', fmt=... size=..." line (without a newline): the options in
// QEMU's order, defaults included, numbers as parsed, strings with commas doubled.
std::string FormattingLine(const ParsedRequest& request);

// The typed options. Fails on values QEMU only rejects while creating (enumerations).
Result<CreateOptions> ResolveCreateOptions(const ParsedRequest& request);

}  // namespace qcow2kit
