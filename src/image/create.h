// Creating images, as `qemu-img create` does: qcow2 (every option of qemu-img 7.2 except
// encryption) and raw.
//
//   CreateOptions o;
//   o.filename = "disk.qcow2";
//   o.size = 64 << 30;
//   o.preallocation = Preallocation::kMetadata;
//   Status s = reactor->BlockOn(CreateImage(o));
//
// A qcow2 image gets the layout qemu-img gives it for the same options, byte for byte: the
// same header and extensions, refcount table and blocks, L1 table, and for preallocation the
// same L2 tables and data cluster placement (see create_layout.h for how).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "image/create_options.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

// Creates (or truncates) o.filename, and o.data_file if given. Checks the options as
// qemu-img does, with its messages, before touching any file; if creating fails half way,
// the files it created are removed. EFBIG errors read "The image size is too large for file
// format '...'".
Task<Status> CreateImage(const CreateOptions& o);

// What qemu-img does with a backing file before anything is created or printed: unless
// `open_backing` is false, opens it (a relative name is relative to the new image's
// directory; as `backing_format` if given, else probed) and takes its virtual size when `size`
// is absent; insists on a backing format. Returns the size the image will have, or "Image
// creation needs a size parameter". Multi-line messages carry qemu-img's hint lines.
Task<Result<uint64_t>> ResolveCreateSize(const std::string& filename,
                                         const std::optional<std::string>& backing_file,
                                         const std::optional<std::string>& backing_format,
                                         bool open_backing, std::optional<uint64_t> size);

}  // namespace qcow2kit
