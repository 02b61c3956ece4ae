#include <cmath>
#include <cstdlib>

#include "qcow2kit/image.h"

namespace qcow2kit {

Result<uint64_t> ParseSize(const std::string& text) {
  auto bad = [&] { return Status::Invalid("Invalid size specified: '" + text + "'"); };
  if (text.empty() || text[0] == '-' || text[0] == '+') return bad();
  if (text.size() > 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
    // Hexadecimal, as QEMU's qemu_strtosz accepts: whole bytes, no suffix.
    char* hex_end = nullptr;
    errno = 0;
    const uint64_t v = std::strtoull(text.c_str() + 2, &hex_end, 16);
    if (errno != 0 || hex_end == text.c_str() + 2 || *hex_end != '\0') return bad();
    return v;
  }
  char* end = nullptr;
  errno = 0;
  double value = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || errno != 0 || !(value >= 0)) return bad();
  bool fractional = text.find_first_of(".eE") < static_cast<size_t>(end - text.c_str());
  std::string suffix(end);
  int shift = 0;
  if (!suffix.empty()) {
    switch (suffix[0]) {
      case 'b': case 'B': shift = 0; break;
      case 'k': case 'K': shift = 10; break;
      case 'm': case 'M': shift = 20; break;
      case 'g': case 'G': shift = 30; break;
      case 't': case 'T': shift = 40; break;
      case 'p': case 'P': shift = 50; break;
      case 'e': case 'E': shift = 60; break;
      default: return bad();
    }
    if (suffix.size() > 1) return bad();
  }
  if (fractional && shift == 0) return bad();  // "1.5" bytes makes no sense
  double bytes = std::ldexp(value, shift);
  if (bytes >= 18446744073709551616.0) return bad();
  if (!fractional) {
    uint64_t whole = std::strtoull(text.c_str(), nullptr, 10);
    if (shift && whole > (UINT64_MAX >> shift)) return bad();
    return whole << shift;
  }
  return static_cast<uint64_t>(bytes);
}

}  // namespace qcow2kit
