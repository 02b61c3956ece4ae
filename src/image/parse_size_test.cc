// ParseSize against the sizes qemu-img accepts and refuses.
#include "gtest/gtest.h"
#include "qcow2kit/image.h"

namespace qcow2kit {
namespace {

TEST(ParseSize, AcceptsWhatQemuImgAccepts) {
  EXPECT_EQ(*ParseSize("0"), 0u);
  EXPECT_EQ(*ParseSize("512"), 512u);
  EXPECT_EQ(*ParseSize("16M"), 16u << 20);
  EXPECT_EQ(*ParseSize("1.5M"), 3u << 19);
  EXPECT_EQ(*ParseSize("2T"), 2ull << 40);
  EXPECT_EQ(*ParseSize("0x10"), 16u);
  EXPECT_EQ(*ParseSize("0x1e"), 30u);  // hex digits, not an exabyte suffix
  EXPECT_EQ(*ParseSize("0X1000"), 4096u);
}

TEST(ParseSize, RefusesWhatQemuImgRefuses) {
  for (const char* bad : {"", "-1", "+5", "1e3", "12Q", "1.5", "16MB", "0x", "0xg", "0x10M",
                          "99999999999999999999", "20E"}) {
    EXPECT_FALSE(ParseSize(bad).ok()) << bad;
  }
}

}  // namespace
}  // namespace qcow2kit
