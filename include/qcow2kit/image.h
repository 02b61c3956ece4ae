// Opening images: the entry point of the library.
//
//   auto reactor = *Reactor::Create();
//   auto img = reactor->BlockOn(OpenImage("disk.qcow2", {}));
//   BlockDevice dev(std::move(*img));
//   reactor->BlockOn(dev.Read(0, buffer));
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "qcow2kit/driver.h"
#include "qcow2kit/file.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

struct OpenOptions {
  bool writable = false;
  CacheMode cache = CacheMode::kWriteback;
  bool force_share = false;     // -U: take and check no image locks; refused if writable
  // Opened to be checked (and repaired if writable): a corrupt image may be opened
  // read-write, a dirty one is left for the check to repair.
  bool check = false;
  std::string format;           // "qcow2", "raw", or "" to probe (qcow2 magic, else raw)
  // Policy for files an image names: an image may be hostile, so a caller can refuse to let
  // it open other files (as imago does). Refused backing files read as absent (zeros) is NOT
  // done: opening fails with an error naming the file.
  bool allow_backing = true;
  bool allow_data_file = true;
  uint64_t l2_cache_bytes = 0;        // 0: enough to map the whole disk, at most 32 MiB
  uint32_t l2_slice_bytes = 0;        // 0: 4 KiB (the cluster size if that is smaller)
  uint64_t refcount_cache_bytes = 0;  // 0: 4 clusters
  unsigned max_backing_depth = 256;   // longer chains are refused
};

// Opens `path` and, as the image names them and the policy allows, its data file and its
// backing chain (relative names resolved against the image's directory, the backing format
// honoured, loops detected).
Task<Result<std::unique_ptr<FormatDriver>>> OpenImage(const std::string& path,
                                                      const OpenOptions& options);

// The format QEMU probes `file` as: "qcow2" for the qcow2 magic with a version of at least 2,
// else "raw" (bytes past the end of a short file read as zeros).
Task<Result<std::string>> ProbeFormat(File* file);

// The part a file plays in an image: it decides which permissions its image locks claim.
enum class ImageFileRole {
  kQcow2,     // a qcow2 image (top or backing): its metadata must not change under us
  kRaw,       // a raw image (top or backing)
  kDataFile,  // the external data file of a qcow2 image
};

// Takes the byte-range locks QEMU (file-posix) takes on a file in `role`, opened read-only or
// read-write as `file` is, and keeps them until the file is closed: while they are held QEMU
// cannot open the image in a conflicting way, and taking them fails ("Failed to get shared
// "write" lock ... Is another process using the image [PATH]?") while QEMU holds it so. With
// `force_share` (-U) no locks are taken or checked; that is refused for a writable file.
// OpenImage does this for every file it opens; code that opens an image file by hand calls it
// before reading the file.
Status LockImageFile(File& file, ImageFileRole role, bool force_share);

// The path QEMU opens for backing name `name` of the image at `image_path` ("full backing
// filename"): absolute names as they are, relative ones against the image's directory.
std::string ResolveBackingName(const std::string& image_path, const std::string& name);

// Parses qemu-img size strings: plain bytes or a k/K/M/G/T/P/E suffix (powers of 1024),
// optional "B"/"b"; fractional values with a suffix ("1.5G"). Errors name the text.
Result<uint64_t> ParseSize(const std::string& text);

}  // namespace qcow2kit
