#include "image/raw_image.h"

#include <algorithm>

namespace qcow2kit {

Result<std::unique_ptr<RawImage>> RawImage::Open(std::unique_ptr<File> file) {
  QK_ASSIGN_OR_RETURN(uint64_t size, file->Size());
  return std::unique_ptr<RawImage>(new RawImage(std::move(file), (size + 511) / 512 * 512));
}

Task<Status> RawImage::Fetch(uint64_t offset, uint64_t length, std::vector<Extent>* out) {
  Extent e;
  e.guest_offset = offset;
  e.length = std::min(length, size_ - offset);
  e.kind = ExtentKind::kData;
  e.host_offset = offset;
  e.writable = file_->writable();
  out->push_back(e);
  co_return Status::Ok();
}

Task<Status> RawImage::Resize(uint64_t new_size, Preallocation prealloc) {
  if (!file_->writable()) co_return Status::Error(EROFS, "the image is opened read-only");
  if (new_size < size_ && prealloc != Preallocation::kOff) {
    co_return Status::Unsupported("Preallocation can't be used for shrinking an image");
  }
  const Preallocation mode = prealloc == Preallocation::kMetadata ? Preallocation::kOff : prealloc;
  QK_CO_RETURN_IF_ERROR(co_await file_->Truncate(new_size, mode));
  size_ = new_size;
  co_return Status::Ok();
}

}  // namespace qcow2kit
