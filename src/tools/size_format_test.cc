#include "tools/size_format.h"

#include "gtest/gtest.h"

namespace qcow2kit::tools {
namespace {

TEST(SizeFormatTest, MatchesQemuSizeToStr) {
  EXPECT_EQ(QemuSizeToStr(0), "0 B");
  EXPECT_EQ(QemuSizeToStr(1), "1 B");
  EXPECT_EQ(QemuSizeToStr(999), "999 B");
  EXPECT_EQ(QemuSizeToStr(1000), "0.977 KiB");  // switches unit at 1000, not 1024
  EXPECT_EQ(QemuSizeToStr(4096), "4 KiB");
  EXPECT_EQ(QemuSizeToStr(200704), "196 KiB");
  EXPECT_EQ(QemuSizeToStr(593920), "580 KiB");
  EXPECT_EQ(QemuSizeToStr(1000 * 1024), "0.977 MiB");
  EXPECT_EQ(QemuSizeToStr(64ull << 20), "64 MiB");
  EXPECT_EQ(QemuSizeToStr(1536ull << 20), "1.5 GiB");
  EXPECT_EQ(QemuSizeToStr(1000000), "977 KiB");
  EXPECT_EQ(QemuSizeToStr(4ull << 40), "4 TiB");
  EXPECT_EQ(QemuSizeToStr(~0ull), "16 EiB");
}

}  // namespace
}  // namespace qcow2kit::tools
