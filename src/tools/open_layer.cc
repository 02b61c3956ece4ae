#include "tools/open_layer.h"

#include "fmt/format.h"
#include "format/endian.h"
#include "format/header.h"
#include "image/create_options.h"
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
    QK_CO_ASSIGN_OR_RETURN(format, co_await ProbeFormat(file.get()));
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

Task<Status> LoadSnapshotForReading(FormatDriver& top, const std::string& spec) {
  auto* qcow2 = dynamic_cast<Qcow2Image*>(&top);
  if (!qcow2) {
    co_return Status::Unsupported(
        fmt::format("Failed to load snapshot: Block format '{}' used by device '' does not support "
                    "internal snapshots",
                    top.format_name()));
  }
  Status s;
  if (spec.rfind("snapshot.", 0) == 0) {
    const OptionList keys = ParseOptionString(spec);
    s = co_await qcow2->LoadSnapshotForReading(OptionValue(keys, "snapshot.id"),
                                               OptionValue(keys, "snapshot.name"));
  } else {
    s = co_await qcow2->LoadSnapshotForReading(spec, std::nullopt);
    if (s.code() == ENOENT) s = co_await qcow2->LoadSnapshotForReading(std::nullopt, spec);
  }
  if (s.ok()) co_return s;
  co_return Status::Error(s.code(), "Failed to load snapshot: " + s.message());
}

}  // namespace qcow2kit::tools
