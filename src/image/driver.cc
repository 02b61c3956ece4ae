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
