// Opening one image file by itself, for the inspection commands (info, dump, stats): they
// describe the file they are given and, like qemu-img info, must work when its backing file
// or data file is missing or hostile.
#pragma once

#include <memory>
#include <string>

#include "qcow2kit/driver.h"
#include "qcow2kit/image.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit::tools {

// Opens `path` as options.format ("" probes: qcow2 magic, else raw) without opening the
// backing chain or an external data file. Errors are "Could not open '<path>': <reason>".
Task<Result<std::unique_ptr<FormatDriver>>> OpenSingleLayer(const std::string& path,
                                                            const OpenOptions& options);

// OpenImage() with the same "Could not open '<path>': " prefix on errors.
Task<Result<std::unique_ptr<FormatDriver>>> OpenImageChain(const std::string& path,
                                                           const OpenOptions& options);

// qemu-img's -l: makes `top` read a snapshot instead of its active layer. `spec` is
// "snapshot.id=ID,snapshot.name=NAME" (either or both, each must match) or a plain ID or name
// (IDs first). Errors are "Failed to load snapshot: <reason>".
Task<Status> LoadSnapshotForReading(FormatDriver& top, const std::string& spec);

}  // namespace qcow2kit::tools
