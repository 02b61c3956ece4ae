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

namespace qcow2kit::tools {
namespace {

TEST(SizeFormatTest, ParsesLikeQemuStrtosz) {
  auto value = [](const char* text) -> int64_t {
    auto r = ParseQemuSizeText(text);
    return r.ok() ? static_cast<int64_t>(*r) : -r.status().code();
  };
  EXPECT_EQ(value("0"), 0);
  EXPECT_EQ(value("4096"), 4096);
  EXPECT_EQ(value("64k"), 65536);
  EXPECT_EQ(value("1.5k"), 1536);
  EXPECT_EQ(value("0x10"), 16);
  EXPECT_EQ(value("0x1e"), 30);  // hex digits, not an exponent
  EXPECT_EQ(value("0x1.8k"), -EINVAL);
  EXPECT_EQ(value("0x10k"), -EINVAL);
  EXPECT_EQ(value("1.5"), -EINVAL);
  EXPECT_EQ(value("12Q"), -EINVAL);
  EXPECT_EQ(value("-1"), -EINVAL);
  EXPECT_EQ(value("99999999999999999999"), -ERANGE);
  EXPECT_EQ(value("16E"), -ERANGE);
  EXPECT_EQ(value("0x10000000000000000"), -ERANGE);
}

}  // namespace
}  // namespace qcow2kit::tools
