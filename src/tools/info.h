// `info`: what qemu-img info reports about one image layer (QAPI ImageInfo), as JSON and in
// qemu-img's human layout.
#pragma once

#include <string>

#include "qcow2kit/driver.h"
#include "qcow2kit/status.h"
#include "tools/qemu_json.h"

namespace qcow2kit::tools {

// ImageInfo of `layer` alone (its backing layers are not described), keys in QAPI schema
// order: print with QemuJsonPretty() to get qemu-img's key order. Only fstat()s the file.
Result<Json> ImageInfo(const FormatDriver& layer);

// qemu-img's human rendering of an ImageInfo (bdrv_image_info_dump): "image: ...",
// "virtual size: 64 MiB (67108864 bytes)", the snapshot table, "Format specific information:".
// Snapshot dates are shown in local time, as QEMU does.
std::string ImageInfoHuman(const Json& info);

// One row of qemu-img's snapshot table (bdrv_snapshot_dump) for a SnapshotInfo object, or the
// header row for a null value. No newline.
std::string SnapshotTableRow(const Json& snapshot);

}  // namespace qcow2kit::tools
