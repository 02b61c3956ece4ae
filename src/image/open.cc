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

Task<Result<std::string>> ProbeFormat(File* file) {
  uint8_t magic[4] = {};
  auto r = co_await file->ReadAt(std::as_writable_bytes(std::span(magic)), 0);
  if (!r.ok()) co_return r.status();
  if (*r == 4 && format::LoadBE32(magic) == format::kMagic) co_return std::string("qcow2");
  co_return std::string("raw");
}

using FileId = std::pair<dev_t, ino_t>;

Task<Result<std::unique_ptr<FormatDriver>>> OpenLayer(const std::string& path,
                                                      const std::string& format_hint,
                                                      const OpenOptions& options,
                                                      std::set<FileId>* seen,
                                                      std::vector<std::string>* chain,
                                                      unsigned depth) {
  if (depth > options.max_backing_depth) {
    co_return Status::Invalid(
        fmt::format("Backing chain of '{}' is deeper than {} images", chain->front(),
                    options.max_backing_depth));
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
    QK_CO_ASSIGN_OR_RETURN(auto raw, RawImage::Open(std::move(file)));
    co_return std::unique_ptr<FormatDriver>(std::move(raw));
  }
  if (format != "qcow2") {
    co_return Status::Unsupported(fmt::format("Unknown or unsupported format '{}'", format));
  }

  auto opened = co_await Qcow2Image::Open(std::move(file), options);
  if (!opened.ok()) co_return opened.status();
  std::unique_ptr<Qcow2Image> img = std::move(*opened);
  const format::ParsedHeader& ph = img->parsed();

  if (ph.header.has_data_file()) {
    if (!ph.data_file) co_return Status::Invalid("'data-file' is required for this image");
    if (!options.allow_data_file) {
      co_return Status::Error(EPERM, fmt::format("Opening the data file '{}' is not allowed",
                                                 *ph.data_file));
    }
    std::string data_path = ResolveRelative(path, *ph.data_file);
    auto df = File::Open(data_path, writable, options.cache);
    if (!df.ok()) co_return df.status().WithContext("Could not open data file");
    img->set_data_file(std::move(*df));
  }

  if (ph.backing_file) {
    if (!options.allow_backing) {
      co_return Status::Error(EPERM, fmt::format("Opening the backing file '{}' is not allowed",
                                                 *ph.backing_file));
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

std::string ResolveBackingName(const std::string& image_path, const std::string& name) {
  return ResolveRelative(image_path, name);
}

Task<Result<std::unique_ptr<FormatDriver>>> OpenImage(const std::string& path,
                                                      const OpenOptions& options) {
  std::set<FileId> seen;
  std::vector<std::string> chain;
  co_return co_await OpenLayer(path, options.format, options, &seen, &chain, 0);
}

}  // namespace qcow2kit
