#include "qcow2kit/driver.h"

#include "qcow2kit/mapping.h"

namespace qcow2kit {

const char* ExtentKindName(ExtentKind k) {
  switch (k) {
    case ExtentKind::kData:
      return "data";
    case ExtentKind::kZero:
      return "zero";
    case ExtentKind::kUnallocated:
      return "unallocated";
    case ExtentKind::kCompressed:
      return "compressed";
  }
  return "?";
}

Task<Status> FormatDriver::ReadCompressed(const Extent&, uint64_t, std::span<std::byte>) {
  co_return Status::Unsupported(std::string(format_name()) + " images have no compressed data");
}

}  // namespace qcow2kit

namespace qcow2kit {

void FormatDriver::EndIo(uint64_t epoch) {
  for (auto it = io_in_epoch_.begin(); it != io_in_epoch_.end(); ++it) {
    if (it->first != epoch) continue;
    if (--it->second == 0) io_in_epoch_.erase(it);
    return;
  }
}

Task<std::unique_ptr<FormatDriver::RangeGuard>> FormatDriver::LockRange(uint64_t, uint64_t) {
  co_return std::make_unique<RangeGuard>();
}

Task<Result<FormatDriver::Reservation>> FormatDriver::Reserve(uint64_t, uint64_t) {
  co_return Status::Unsupported(std::string(format_name()) + ": allocation is not supported");
}

Task<Status> FormatDriver::Commit(std::span<const MappingUpdate>) {
  co_return Status::Unsupported(std::string(format_name()) + ": mapping changes not supported");
}

Task<Status> FormatDriver::Resize(uint64_t, Preallocation) {
  co_return Status::Unsupported(std::string(format_name()) + ": resize not supported");
}

Task<Status> FormatDriver::GuardDataWrite(uint8_t, uint64_t, uint64_t) {
  co_return Status::Ok();
}

Result<size_t> FormatDriver::CompressCluster(std::span<const std::byte>,
                                             std::span<std::byte>) const {
  return Status::Unsupported(std::string(format_name()) + ": compressed writes are not supported");
}

Task<Status> FormatDriver::WriteCompressed(uint64_t, std::span<const std::byte>) {
  co_return Status::Unsupported(std::string(format_name()) +
                                ": compressed writes are not supported");
}

Task<Status> FormatDriver::Flush() {
  for (uint8_t i = 0; i < 2; ++i) {
    if (File* f = file(i); f && f->writable()) QK_CO_RETURN_IF_ERROR(co_await f->Sync());
  }
  co_return Status::Ok();
}

}  // namespace qcow2kit
