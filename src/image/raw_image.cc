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

}  // namespace qcow2kit
