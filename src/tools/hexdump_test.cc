#include "tools/hexdump.h"

#include <string_view>
#include <vector>

#include "gtest/gtest.h"

namespace qcow2kit::tools {
namespace {

std::string Dump(uint64_t start, const std::vector<uint8_t>& data, size_t piece = 7) {
  Hexdumper h(start);
  std::string out;
  // Fed in odd-sized pieces: lines must not depend on how the stream is chunked.
  for (size_t i = 0; i < data.size(); i += piece) {
    size_t n = std::min(piece, data.size() - i);
    h.Feed(std::as_bytes(std::span(data.data() + i, n)), &out);
  }
  h.Finish(&out);
  return out;
}

std::vector<uint8_t> Bytes(std::string_view s) {
  return {s.begin(), s.end()};
}

TEST(HexdumpTest, LikeHexdumpC) {
  EXPECT_EQ(Dump(0, Bytes("hello world, this is a test")),
            "00000000  68 65 6c 6c 6f 20 77 6f  72 6c 64 2c 20 74 68 69  |hello world, thi|\n"
            "00000010  73 20 69 73 20 61 20 74  65 73 74                 |s is a test|\n"
            "0000001b\n");
}

TEST(HexdumpTest, ShortLineUnderEightBytes) {
  EXPECT_EQ(Dump(0, Bytes("abc")),
            "00000000  61 62 63                                          |abc|\n"
            "00000003\n");
}

TEST(HexdumpTest, SqueezesRepeatedLines) {
  std::vector<uint8_t> data(80, 0);
  data[79] = 1;
  EXPECT_EQ(Dump(0, data),
            "00000000  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|\n"
            "*\n"
            "00000040  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 01  |................|\n"
            "00000050\n");
  EXPECT_EQ(Dump(0, std::vector<uint8_t>(64, 0)),
            "00000000  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|\n"
            "*\n"
            "00000040\n");
}

TEST(HexdumpTest, OffsetsStartAtTheStartOffset) {
  EXPECT_EQ(Dump(0x12345, Bytes("\x01\xff")),
            "00012345  01 ff                                             |..|\n"
            "00012347\n");
}

TEST(HexdumpTest, EmptyStreamPrintsNothing) {
  EXPECT_EQ(Dump(5, {}), "");
}

}  // namespace
}  // namespace qcow2kit::tools
