// `dump`: the qcow2 metadata of an image, section by section, as JSON values (numbers as
// integers, entries also as "0x..." hex strings) and as text for people.
//
// Only the image file itself is read (no backing or data file), so damaged chains can still
// be inspected. Entries are shown as stored; invalid ones are labelled, not refused.
#pragma once

#include <string>

#include "image/qcow2_image.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"
#include "tools/qemu_json.h"

namespace qcow2kit::tools {

// Header fields with names as in the spec (magic, version, ..., header_length), feature bits
// decoded by name, the backing file name.
Json DumpHeader(const Qcow2Image& img);
// Each header extension: type, name, offset, length and its decoded content.
Json DumpExtensions(const Qcow2Image& img);
// The active L1 table: offset, size and the non-zero entries.
Json DumpL1(const Qcow2Image& img);
// For each allocated L1 entry, the non-zero entries of its L2 table with their type (or an
// "error" for a table that cannot be read).
Task<Result<Json>> DumpL2(Qcow2Image& img);
// The refcount table's non-zero entries and the refcounts of the file's clusters as runs of
// equal non-zero values ("errors" lists refcount blocks that cannot be read).
Task<Result<Json>> DumpRefcounts(Qcow2Image& img);
// The snapshot table.
Json DumpSnapshots(const Qcow2Image& img);
// The bitmaps extension and the bitmap directory.
Json DumpBitmaps(const Qcow2Image& img);

// Text for one section, named as the JSON key ("header", "extensions", "l1", "l2",
// "refcounts", "snapshots", "bitmaps"), ending in a newline.
std::string DumpSectionText(const std::string& section, const Json& value);

// "normal", "compressed", "zero-plain", "zero-alloc", "unallocated".
const char* ClusterTypeName(format::ClusterType t);

// Per-subcluster summary of an extended L2 bitmap: 32 characters, subcluster 0 first,
// 'D' allocated (data), 'Z' zero, '.' unallocated, '!' both bits set (invalid).
std::string SubclusterMap(uint64_t bitmap);

}  // namespace qcow2kit::tools
