#include "tools/size_format.h"

#include <cmath>
#include <cstdio>

namespace qcow2kit::tools {

std::string QemuSizeToStr(uint64_t bytes) {
  static const char* const kSuffixes[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
  // frexp() gives floor(log2(bytes * 1024 / 1000)) + 1: switching units at 1000 rather than
  // 1024 keeps "1000 KiB" from being printed as such (QEMU commit e41b509d68af).
  int exponent = 0;
  std::frexp(static_cast<double>(bytes) / (1000.0 / 1024.0), &exponent);
  int unit = (exponent - 1) / 10;
  if (unit < 0) unit = 0;
  if (unit > 6) unit = 6;
  const double div = static_cast<double>(1ull << (unit * 10));
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%0.3g %sB", static_cast<double>(bytes) / div,
                kSuffixes[unit]);
  return buf;
}

}  // namespace qcow2kit::tools
