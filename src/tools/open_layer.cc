#include "tools/open_layer.h"

#include "format/endian.h"
#include "format/header.h"
#include "image/qcow2_image.h"
#include "image/raw_image.h"

namespace qcow2kit::tools {
namespace {

Status OpenError(const std::string& path, const Status& s) {
  return s.WithContext("Could not open '" + path + "'");
}

Task<Result<std::unique_ptr<FormatDriver>>> Open(const std::string& path,
                                                 const OpenOptions& options) {
  QK_CO_ASSIGN_OR_RETURN(auto file, File::Open(path, options.writable, options.cache));
  std::string format = options.format;
  if (format.empty()) {
    uint8_t magic[4] = {};
    auto got = co_await file->ReadAt(std::as_writable_bytes(std::span(magic)), 0);
    if (!got.ok()) co_return got.status();
    format = *got == 4 && format::LoadBE32(magic) == format::kMagic ? "qcow2" : "raw";
  }
  if (format == "raw") {
    QK_CO_RETURN_IF_ERROR(LockImageFile(*file, ImageFileRole::kRaw, options.force_share));
    QK_CO_ASSIGN_OR_RETURN(auto raw, RawImage::Open(std::move(file)));
    co_return std::unique_ptr<FormatDriver>(std::move(raw));
  }
  if (format != "qcow2") {
    co_return Status::Unsupported("Unknown or unsupported format '" + format + "'");
  }
  QK_CO_RETURN_IF_ERROR(LockImageFile(*file, ImageFileRole::kQcow2, options.force_share));
  auto img = co_await Qcow2Image::Open(std::move(file), options);
  if (!img.ok()) co_return img.status();
  co_return std::unique_ptr<FormatDriver>(std::move(*img));
}

}  // namespace

Task<Result<std::unique_ptr<FormatDriver>>> OpenSingleLayer(const std::string& path,
                                                            const OpenOptions& options) {
  auto r = co_await Open(path, options);
  if (!r.ok()) co_return OpenError(path, r.status());
  co_return std::move(*r);
}

Task<Result<std::unique_ptr<FormatDriver>>> OpenImageChain(const std::string& path,
                                                           const OpenOptions& options) {
  auto r = co_await OpenImage(path, options);
  if (!r.ok()) co_return OpenError(path, r.status());
  co_return std::move(*r);
}

}  // namespace qcow2kit::tools
