// A streaming `hexdump -C`: offset, 16 bytes in two groups of 8, the printable characters
// between bars; runs of identical full lines collapsed into one "*" line; the end offset on a
// line of its own.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace qcow2kit::tools {

class Hexdumper {
 public:
  // Offsets printed are `start` + position in the stream, as `hexdump -C -s start` does.
  explicit Hexdumper(uint64_t start) : offset_(start) {}

  // Appends the text of the complete lines `data` finishes to `out`.
  void Feed(std::span<const std::byte> data, std::string* out);
  // Appends the last (possibly short) line and the end offset. Nothing for an empty stream.
  void Finish(std::string* out);

 private:
  void EmitLine(std::string* out);

  uint64_t offset_;  // of the first byte of line_
  std::array<uint8_t, 16> line_{};
  size_t fill_ = 0;
  std::array<uint8_t, 16> previous_{};
  bool have_previous_ = false;
  bool squeezing_ = false;
  bool any_ = false;
};

// One `hexdump -C` line for up to 16 bytes at `offset`, no newline.
std::string HexdumpLine(uint64_t offset, std::span<const uint8_t> bytes);

}  // namespace qcow2kit::tools
