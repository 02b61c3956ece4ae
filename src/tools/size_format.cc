#include "tools/size_format.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "qcow2kit/image.h"

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
  std::snprintf(buf, sizeof(buf), "%0.3g %sB", static_cast<double>(bytes) / div, kSuffixes[unit]);
  return buf;
}

namespace {

bool IsDigit(char c) {
  return c >= '0' && c <= '9';
}

// Decimal digits, optionally ".digits" and then one unit suffix (required after a fraction):
// a size that ParseSize() can only refuse for being too large.
bool IsWellFormedDecimal(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && IsDigit(text[i])) ++i;
  if (i == 0) return false;
  bool fraction = false;
  if (i < text.size() && text[i] == '.') {
    size_t start = ++i;
    while (i < text.size() && IsDigit(text[i])) ++i;
    if (i == start) return false;
    fraction = true;
  }
  if (i < text.size() && std::string_view("bBkKmMgGtTpPeE").find(text[i]) != std::string::npos) {
    return i + 1 == text.size();
  }
  return i == text.size() && !fraction;
}

}  // namespace

Result<uint64_t> ParseQemuSizeText(const std::string& text) {
  const Status invalid = Status::Invalid("Invalid size specified: '" + text + "'");
  if (text.size() > 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
    if (!std::isxdigit(static_cast<unsigned char>(text[2]))) return invalid;
    errno = 0;
    char* end = nullptr;
    unsigned long long v = std::strtoull(text.c_str(), &end, 16);
    if (*end != '\0') return invalid;  // QEMU allows neither a fraction nor a suffix here
    if (errno == ERANGE) return Status::Error(ERANGE, "Size '" + text + "' is too large");
    return uint64_t{v};
  }
  auto v = ParseSize(text);
  if (!v.ok() && IsWellFormedDecimal(text)) {
    return Status::Error(ERANGE, "Size '" + text + "' is too large");
  }
  return v;
}

}  // namespace qcow2kit::tools
