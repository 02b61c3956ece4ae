// CreateImage: checks the options in qemu-img's order and with its messages, plans a qcow2
// layout (create_layout.h) and writes it, or sizes a raw file.
#include "image/create.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <memory>
#include <vector>

#include "format/endian.h"
#include "format/entries.h"
#include "format/header.h"
#include "image/create_layout.h"
#include "qcow2kit/file.h"
#include "qcow2kit/image.h"

namespace qcow2kit {
namespace {

using create_internal::Layout;
using create_internal::LayoutParams;

constexpr const char* kNeedV3 = " (use version=v3 or greater)";

Status TooLarge(const std::string& format) {
  return Status::Error(EFBIG, "The image size is too large for file format '" + format + "'" +
                                  (format == "qcow2" ? " (try using a larger cluster size)" : ""));
}

// qcow2_co_create's checks, in its order. Turns preallocation on for data_file_raw.
Status ValidateQcow2(CreateOptions* o) {
  if (o->version != 2 && o->version != 3) {
    return Status::Invalid("Invalid compatibility level: " + std::to_string(o->version));
  }
  if (o->extended_l2 && o->version < 3) {
    return Status::Invalid(
        std::string("Extended L2 entries are only supported with compatibility level 1.1 and "
                    "above") +
        kNeedV3);
  }
  if (o->cluster_size < 512 || o->cluster_size > (2u << 20) ||
      !std::has_single_bit(o->cluster_size)) {
    return Status::Invalid("Cluster size must be a power of two between 512 and 2048k");
  }
  if (o->extended_l2 && o->cluster_size < 16384) {
    return Status::Invalid(
        "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
  }
  if (o->backing_file && o->preallocation != Preallocation::kOff && !o->extended_l2) {
    return Status::Invalid(
        "Backing file and preallocation can only be used at the same time if extended_l2 is "
        "on");
  }
  if (o->backing_format && !o->backing_file) {
    return Status::Invalid("Backing format cannot be used without backing file");
  }
  if (o->lazy_refcounts && o->version < 3) {
    return Status::Invalid(
        std::string("Lazy refcounts only supported with compatibility level 1.1 and above") +
        kNeedV3);
  }
  if (o->refcount_bits > 64 || !std::has_single_bit(o->refcount_bits)) {
    return Status::Invalid("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (o->version < 3 && o->refcount_bits != 16) {
    return Status::Invalid(
        std::string("Different refcount widths than 16 bits require compatibility level 1.1 "
                    "or above") +
        kNeedV3);
  }
  if (o->data_file_raw && !o->data_file) return Status::Invalid("data-file-raw requires data-file");
  if (o->data_file_raw && o->backing_file) {
    return Status::Invalid("Backing file and data-file-raw cannot be used at the same time");
  }
  // The data file must read as the image, so the mapping has to exist from the start.
  if (o->data_file_raw && o->preallocation == Preallocation::kOff) {
    o->preallocation = Preallocation::kMetadata;
  }
  if (o->data_file && o->version < 3) {
    return Status::Invalid(
        std::string("External data files are only supported with compatibility level 1.1 and "
                    "above") +
        kNeedV3);
  }
  if (o->compression_type != format::CompressionType::kZlib && o->version < 3) {
    return Status::Invalid(
        std::string("Non-zlib compression type is only supported with compatibility level 1.1 "
                    "and above") +
        kNeedV3);
  }
  if (o->backing_file && o->backing_file->empty()) {
    return Status::Invalid("Expected backing file name, got empty string");
  }
  if (o->backing_file && *o->backing_file == o->filename) {
    return Status::Invalid(
        "Error: Trying to create an image with the same filename as the backing file");
  }
  return Status::Ok();
}

// Cluster 0 for the planned layout, or qemu-img's error when the names do not fit.
Result<std::vector<uint8_t>> EncodeCluster0(const CreateOptions& o, uint64_t size,
                                            const Layout& layout) {
  format::ParsedHeader ph;
  format::Header& h = ph.header;
  h.version = o.version;
  h.cluster_bits = static_cast<uint32_t>(std::countr_zero(o.cluster_size));
  h.size = size;
  h.l1_size = layout.l1_size;
  h.l1_table_offset = layout.l1_offset;
  h.refcount_table_offset = layout.reftable_offset;
  h.refcount_table_clusters = layout.reftable_clusters;
  if (o.version >= 3) {
    h.refcount_order = static_cast<uint32_t>(std::countr_zero(o.refcount_bits));
    h.header_length = 112;
    h.compression_type = o.compression_type;
    if (o.data_file) h.incompatible_features |= format::kIncompatDataFile;
    if (o.compression_type != format::CompressionType::kZlib) {
      h.incompatible_features |= format::kIncompatCompression;
    }
    if (o.extended_l2) h.incompatible_features |= format::kIncompatExtendedL2;
    if (o.lazy_refcounts) h.compatible_features |= format::kCompatLazyRefcounts;
    if (o.data_file_raw) h.autoclear_features |= format::kAutoclearDataFileRaw;
  } else {
    h.refcount_order = 4;
    h.header_length = format::kV2HeaderLength;
  }
  ph.data_file = o.data_file;
  if (!EncodeHeader(ph).ok()) {
    return Status::Error(ENOSPC, "Could not update qcow2 header: No space left on device");
  }
  if (!o.backing_file) return EncodeHeader(ph);
  ph.backing_file = o.backing_file;
  ph.backing_format = o.backing_format;
  auto encoded = EncodeHeader(ph);
  if (encoded.ok()) return encoded;
  const bool too_long = o.backing_file->size() > format::kMaxBackingNameLength;
  return Status::Error(too_long ? EINVAL : ENOSPC,
                       "Could not assign backing file '" + *o.backing_file + "' with format '" +
                           o.backing_format.value_or("(null)") +
                           "': " + (too_long ? "Invalid argument" : "No space left on device"));
}

// Creates or truncates `path` the way QEMU's file protocol does (open, then truncate to 0).
Result<std::unique_ptr<File>> CreateFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, "Could not create '" + path + "'");
  if (::ftruncate(fd, 0) != 0) {
    int err = errno;
    ::close(fd);
    return Status::FromErrno(err, "Could not resize file");
  }
  return File::Adopt(path, fd, /*writable=*/true, /*direct=*/false);
}

Task<Status> WriteZeros(File* f, uint64_t offset, uint64_t length) {
  const std::vector<std::byte> zeros(length);
  co_return co_await f->WriteAt(zeros, offset);
}

Task<Status> WriteBytes(File* f, const std::vector<uint8_t>& bytes, uint64_t offset) {
  co_return co_await f->WriteAt(std::as_bytes(std::span(bytes)), offset);
}

Task<Status> WriteQcow2(File* f, const Layout& layout, const LayoutParams& params,
                        const std::vector<uint8_t>& cluster0) {
  if (!params.external_data) {
    QK_CO_RETURN_IF_ERROR(
        co_await f->Truncate(layout.grow_to, params.preallocation));
  }
  if (!params.external_data && layout.tail_length) {
    QK_CO_RETURN_IF_ERROR(co_await WriteZeros(f, layout.tail_offset, layout.tail_length));
  }
  for (const auto& [offset, bytes] : layout.refcount_writes) {
    QK_CO_RETURN_IF_ERROR(co_await WriteBytes(f, bytes, offset));
  }
  std::vector<uint8_t> l1(layout.l1.size() * 8);
  for (size_t i = 0; i < layout.l1.size(); ++i) {
    format::StoreBE64(&l1[i * 8], layout.l1[i]);
    if (!layout.l1[i]) continue;
    QK_CO_RETURN_IF_ERROR(co_await WriteBytes(f, create_internal::BuildL2Table(layout, params, i),
                                              layout.l1[i] & format::kL1OffsetMask));
  }
  if (!l1.empty()) QK_CO_RETURN_IF_ERROR(co_await WriteBytes(f, l1, layout.l1_offset));
  if (::ftruncate(f->fd(), static_cast<off_t>(layout.file_length)) != 0) {
    co_return Status::FromErrno(errno, "Could not resize file");
  }
  // The header last: until it is there the file is not a qcow2 image.
  QK_CO_RETURN_IF_ERROR(co_await WriteBytes(f, cluster0, 0));
  co_return co_await f->Sync();
}

uint64_t RoundUp512(uint64_t n) {
  return (n + 511) & ~511ull;
}

Task<Status> CreateQcow2(CreateOptions o) {
  // qemu-img looks at the backing file before the format checks the options.
  QK_CO_ASSIGN_OR_RETURN(uint64_t requested,
                         co_await ResolveCreateSize(o.filename, o.backing_file, o.backing_format,
                                                    o.open_backing, o.size));
  QK_CO_RETURN_IF_ERROR(ValidateQcow2(&o));
  if (requested > INT64_MAX) co_return TooLarge("qcow2");
  const uint64_t size = RoundUp512(requested);
  LayoutParams params;
  params.cluster_bits = static_cast<uint32_t>(std::countr_zero(o.cluster_size));
  params.refcount_order = static_cast<uint32_t>(std::countr_zero(o.refcount_bits));
  params.extended_l2 = o.extended_l2;
  params.external_data = o.data_file.has_value();
  params.size = size;
  params.preallocation = o.preallocation;
  auto layout = create_internal::PlanQcow2Layout(params);
  if (!layout.ok()) {
    if (layout.status().code() == EFBIG) co_return TooLarge("qcow2");
    co_return layout.status();
  }
  QK_CO_ASSIGN_OR_RETURN(auto cluster0, EncodeCluster0(o, size, *layout));

  QK_CO_ASSIGN_OR_RETURN(auto file, CreateFile(o.filename));
  Status s = co_await WriteQcow2(file.get(), *layout, params, cluster0);
  if (s.ok() && o.data_file) {
    auto data = CreateFile(*o.data_file);
    if (!data.ok()) {
      s = data.status();
    } else {
      // The data file gets what preallocation asks for; "metadata" only maps it.
      Preallocation mode =
          o.preallocation == Preallocation::kMetadata ? Preallocation::kOff : o.preallocation;
      if (layout->tail_length) {
        s = co_await WriteZeros(data->get(), layout->tail_offset, layout->tail_length);
      }
      if (s.ok()) {
        s = co_await data->get()->Truncate(layout->data_grow_to, mode);
      }
      if (s.ok()) s = co_await (*data)->Sync();
    }
    if (!s.ok()) ::unlink(o.data_file->c_str());
  }
  if (!s.ok()) ::unlink(o.filename.c_str());
  co_return s;
}

Task<Status> CreateRaw(const CreateOptions& o) {
  if (o.backing_file) {
    co_return Status::Invalid("Backing file not supported for file format 'raw'");
  }
  if (o.preallocation == Preallocation::kMetadata) {
    co_return Status::Unsupported("Unsupported preallocation mode: metadata");
  }
  if (!o.size) co_return Status::Invalid("Image creation needs a size parameter");
  if (*o.size > INT64_MAX) co_return TooLarge("raw");
  QK_CO_ASSIGN_OR_RETURN(auto file, CreateFile(o.filename));
  Status s = co_await file.get()->Truncate(RoundUp512(*o.size), o.preallocation);
  if (s.ok()) s = co_await file->Sync();
  if (!s.ok()) ::unlink(o.filename.c_str());
  if (s.code() == EFBIG) co_return TooLarge("raw");
  co_return s;
}

}  // namespace

Task<Result<uint64_t>> ResolveCreateSize(const std::string& filename,
                                         const std::optional<std::string>& backing_file,
                                         const std::optional<std::string>& backing_format,
                                         bool open_backing, std::optional<uint64_t> size) {
  if (backing_file && open_backing) {
    OpenOptions open;
    open.format = backing_format.value_or("");
    open.force_share = true;
    auto backing = co_await OpenImage(ResolveBackingName(filename, *backing_file), open);
    if (!backing.ok()) {
      co_return Status::Error(backing.status().code(),
                              backing.status().ToString() + "\nCould not open backing image.");
    }
    if (!backing_format) {
      co_return Status::Invalid(
          "Backing file specified without backing format\nDetected format of " +
          std::string((*backing)->format_name()) + ".");
    }
    if (!size) size = (*backing)->size();
  } else if (backing_file && !backing_format) {
    co_return Status::Invalid("Backing file specified without backing format");
  }
  if (!size) co_return Status::Invalid("Image creation needs a size parameter");
  co_return *size;
}

Task<Status> CreateImage(const CreateOptions& o) {
  if (o.format == "raw") co_return co_await CreateRaw(o);
  if (o.format != "qcow2") co_return Status::Invalid("Unknown file format '" + o.format + "'");
  co_return co_await CreateQcow2(o);
}

}  // namespace qcow2kit
