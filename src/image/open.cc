// OpenImage: probes the format, opens the data file and the backing chain under the caller's
// policy, resolving names the way QEMU does and refusing loops.
#include <sys/stat.h>

#include <set>
#include <utility>

#include "fmt/format.h"
#include "format/endian.h"
#include "format/header.h"
#include "image/qcow2_image.h"
#include "image/raw_image.h"
#include "io/image_lock.h"
#include "qcow2kit/image.h"

namespace qcow2kit {
namespace {

// QEMU's path_combine: a relative name is taken relative to the directory part of `base`.
std::string ResolveRelative(const std::string& base, const std::string& name) {
  if (name.empty() || name[0] == '/') return name;
  auto slash = base.rfind('/');
  if (slash == std::string::npos) return name;
  return base.substr(0, slash + 1) + name;
}

using FileId = std::pair<dev_t, ino_t>;

constexpr const char* kForceShareWritable = "force-share=on can only be used with read-only images";

// The permissions QEMU 7.2's block layer claims on the file-posix node under each role, as
// bdrv_default_perms_for_storage (block.c) derives them for a qemu-img / qemu-io open:
//  - a qcow2 image file is the format's metadata child: it needs consistent reads, may write
//    and grow the file when writable, and never lets others write or resize it (qemu-io: bytes
//    100 101 103 201 203; qemu-io -r, qemu-img map/check: 100 201 203);
//  - a raw image passes its user's permissions through and a qemu-img / qemu-io user shares
//    everything (qemu-io: 100 101; -r: 100);
//  - a data file is a data child: writing may grow it, and only resizing is denied to others
//    (qemu-io: 100 101 103 203; -r: 100 203).
// Backing files are opened read-only, so they lock as read-only images of their format.
LockPerms PermsFor(ImageFileRole role, bool writable) {
  uint8_t held = kPermConsistentRead;
  switch (role) {
    case ImageFileRole::kQcow2:
      if (writable) held |= kPermWrite | kPermResize;
      return {held, kPermWrite | kPermResize};
    case ImageFileRole::kRaw:
      if (writable) held |= kPermWrite;
      return {held, 0};
    case ImageFileRole::kDataFile:
      if (writable) held |= kPermWrite | kPermResize;
      return {held, kPermResize};
  }
  return {held, 0};
}

Task<Result<std::unique_ptr<FormatDriver>>> OpenLayer(
    const std::string& path, const std::string& format_hint, const OpenOptions& options,
    std::set<FileId>* seen, std::vector<std::string>* chain, unsigned depth) {
  if (depth > options.max_backing_depth) {
    co_return Status::Invalid(fmt::format("Backing chain of '{}' is deeper than {} images",
                                          chain->front(), options.max_backing_depth));
  }
  // Only the top image is opened for writing; backing files are read-only.
  bool writable = options.writable && depth == 0;
  QK_CO_ASSIGN_OR_RETURN(auto file, File::Open(path, writable, options.cache));
  struct stat st;
  if (::fstat(file->fd(), &st) == 0) {
    if (!seen->insert({st.st_dev, st.st_ino}).second) {
      std::string loop;
      for (auto& c : *chain) loop += "'" + c + "' -> ";
      co_return Status::Invalid(fmt::format("Backing file loop detected: {}'{}'", loop, path));
    }
  }
  chain->push_back(path);

  std::string format = format_hint;
  if (format.empty()) {
    QK_CO_ASSIGN_OR_RETURN(format, co_await ProbeFormat(file.get()));
  }
  if (format == "raw") {
    QK_CO_RETURN_IF_ERROR(LockImageFile(*file, ImageFileRole::kRaw, options.force_share));
    QK_CO_ASSIGN_OR_RETURN(auto raw, RawImage::Open(std::move(file)));
    co_return std::unique_ptr<FormatDriver>(std::move(raw));
  }
  if (format != "qcow2") {
    co_return Status::Unsupported(fmt::format("Unknown or unsupported format '{}'", format));
  }

  // Before the driver reads the header: what it reads must not be changing under it.
  QK_CO_RETURN_IF_ERROR(LockImageFile(*file, ImageFileRole::kQcow2, options.force_share));
  auto opened = co_await Qcow2Image::Open(std::move(file), options);
  if (!opened.ok()) co_return opened.status();
  std::unique_ptr<Qcow2Image> img = std::move(*opened);
  const format::ParsedHeader& ph = img->parsed();

  if (ph.header.has_data_file()) {
    if (!ph.data_file) co_return Status::Invalid("'data-file' is required for this image");
    if (!options.allow_data_file) {
      co_return Status::Error(
          EPERM, fmt::format("Opening the data file '{}' is not allowed", *ph.data_file));
    }
    std::string data_path = ResolveRelative(path, *ph.data_file);
    auto df = File::Open(data_path, writable, options.cache);
    if (!df.ok()) co_return df.status().WithContext("Could not open data file");
    Status locked = LockImageFile(**df, ImageFileRole::kDataFile, options.force_share);
    if (!locked.ok()) co_return locked.WithContext("Could not open data file");
    img->set_data_file(std::move(*df));
  }

  if (ph.backing_file) {
    if (!options.allow_backing) {
      co_return Status::Error(
          EPERM, fmt::format("Opening the backing file '{}' is not allowed", *ph.backing_file));
    }
    std::string backing_path = ResolveRelative(path, *ph.backing_file);
    std::string backing_format = ph.backing_format.value_or("");
    auto backing =
        co_await OpenLayer(backing_path, backing_format, options, seen, chain, depth + 1);
    if (!backing.ok()) {
      co_return backing.status().WithContext(
          fmt::format("Could not open backing file '{}'", backing_path));
    }
    img->set_backing(std::move(*backing));
  }
  co_return std::unique_ptr<FormatDriver>(std::move(img));
}

}  // namespace

Task<Result<std::string>> ProbeFormat(File* file) {
  uint8_t head[8] = {};
  auto r = co_await file->ReadAt(std::as_writable_bytes(std::span(head)), 0);
  if (!r.ok()) co_return r.status();
  if (format::LoadBE32(head) == format::kMagic && format::LoadBE32(head + 4) >= 2) {
    co_return std::string("qcow2");
  }
  co_return std::string("raw");
}


Status LockImageFile(File& file, ImageFileRole role, bool force_share) {
  if (force_share) {
    if (file.writable()) return Status::Invalid(kForceShareWritable);
    return Status::Ok();
  }
  if (role == ImageFileRole::kDataFile && file.writable()) {
    // QEMU attaches a data file before the write permissions of its users reach it, so it
    // claims the read-only permissions first. Check those first too, so that a conflict is
    // reported as qemu-img reports it (shared "resize" rather than "resize").
    auto first = ImageLock::Acquire(file.fd(), file.path(), PermsFor(role, false));
    if (!first.ok()) return first.status();
  }  // dropped here, before the full claim: one ImageLock per open file description
  auto lock = ImageLock::Acquire(file.fd(), file.path(), PermsFor(role, file.writable()));
  if (!lock.ok()) return lock.status();
  file.HoldLock(std::move(*lock));
  return Status::Ok();
}

std::string ResolveBackingName(const std::string& image_path, const std::string& name) {
  return ResolveRelative(image_path, name);
}

Task<Result<std::unique_ptr<FormatDriver>>> OpenImage(const std::string& path,
                                                      const OpenOptions& options) {
  if (options.force_share && options.writable) co_return Status::Invalid(kForceShareWritable);
  std::set<FileId> seen;
  std::vector<std::string> chain;
  co_return co_await OpenLayer(path, options.format, options, &seen, &chain, 0);
}

}  // namespace qcow2kit
