// QEMU's renderings of QAPI objects: the pretty JSON of `qemu-img info --output=json` and the
// indented "key: value" dump of its human output ("Format specific information:").
//
// QEMU converts QAPI structs to QDicts, a 512-bucket hash table whose iteration order is the
// order of hash buckets (and, within a bucket, newest first). Matching qemu-img's key order
// therefore means replaying that hash: build objects with keys in QAPI schema order and these
// functions print them in QDict order.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "nlohmann/json.hpp"

namespace qcow2kit::tools {

using Json = nlohmann::ordered_json;

// The QDict bucket of `key`: tdb_hash(key) % 512.
unsigned QdictBucket(std::string_view key);

// The members of `object` in the order QEMU iterates a QDict into which they were inserted
// in `object`'s order.
std::vector<std::pair<const std::string*, const Json*>> QdictOrder(const Json& object);

// `s` as a JSON string literal, escaped as QEMU's JSON writer does (\uXXXX for control and
// non-ASCII characters, invalid UTF-8 as U+FFFD).
std::string QemuJsonQuote(std::string_view s);

// qobject_to_json_pretty(): 4-space indentation, objects in QDict order. No final newline.
std::string QemuJsonPretty(const Json& value);

// dump_qobject() of qemu-img's human output: objects as "key: value" lines (dashes in keys
// shown as spaces), lists as "[i]: value", nested values indented by 4 spaces per level.
std::string QemuHumanDump(const Json& value, int indentation);

// value.dump(indent) that never throws: invalid UTF-8 in strings taken from a (possibly
// hostile) image is replaced by U+FFFD.
std::string JsonDump(const Json& value, int indent = 4);

}  // namespace qcow2kit::tools
