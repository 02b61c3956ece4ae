#include "tools/hexdump.h"

#include <cstring>

#include "fmt/format.h"

namespace qcow2kit::tools {

std::string HexdumpLine(uint64_t offset, std::span<const uint8_t> bytes) {
  // Fixed width: the ASCII column of a short last line starts where a full line's does.
  std::string s = fmt::format("{:08x}  ", offset);
  for (size_t i = 0; i < 16; ++i) {
    s += i < bytes.size() ? fmt::format("{:02x} ", bytes[i]) : "   ";
    if (i == 7) s += ' ';
  }
  s += " |";
  for (uint8_t b : bytes) s += (b >= 0x20 && b < 0x7f) ? static_cast<char>(b) : '.';
  s += '|';
  return s;
}

void Hexdumper::EmitLine(std::string* out) {
  const bool full = fill_ == line_.size();
  if (full && have_previous_ && line_ == previous_) {
    if (!squeezing_) *out += "*\n";
    squeezing_ = true;
  } else {
    *out += HexdumpLine(offset_, std::span(line_.data(), fill_));
    *out += '\n';
    squeezing_ = false;
  }
  previous_ = line_;
  have_previous_ = full;
  offset_ += fill_;
  fill_ = 0;
}

void Hexdumper::Feed(std::span<const std::byte> data, std::string* out) {
  if (!data.empty()) any_ = true;
  while (!data.empty()) {
    size_t n = std::min(data.size(), line_.size() - fill_);
    std::memcpy(line_.data() + fill_, data.data(), n);
    fill_ += n;
    data = data.subspan(n);
    if (fill_ == line_.size()) EmitLine(out);
  }
}

void Hexdumper::Finish(std::string* out) {
  if (!any_) return;
  if (fill_ > 0) EmitLine(out);
  *out += fmt::format("{:08x}\n", offset_);
}

}  // namespace qcow2kit::tools
