#include "image/refcount_array.h"

#include "format/refcount.h"
#include "gtest/gtest.h"

namespace qcow2kit {
namespace {

TEST(RefcountArrayTest, CountsGrowsAndSaturatesAtTheWidth) {
  // 1-bit refcounts, 512-byte clusters: 4096 entries per block.
  RefcountArray a({9, 0}, 10);
  EXPECT_EQ(a.clusters(), 10u);
  EXPECT_TRUE(a.Increment(3));
  EXPECT_FALSE(a.Increment(3));  // the maximum of a 1-bit refcount
  EXPECT_EQ(a.Get(3), 1u);
  EXPECT_TRUE(a.Increment(5000));  // past the end: grows into a second block
  EXPECT_EQ(a.clusters(), 5001u);
  EXPECT_EQ(a.Get(5000), 1u);
  EXPECT_EQ(a.Get(99999), 0u);
  EXPECT_TRUE(a.RangeFree(4, 100));
  EXPECT_FALSE(a.RangeFree(0, 4));
  a.Clear();
  EXPECT_EQ(a.Get(3), 0u);
  EXPECT_EQ(a.clusters(), 5001u);
}

TEST(RefcountArrayTest, ABlockIsARefcountBlockOnDisk) {
  const format::RefcountGeometry g{12, 4};  // 4 KiB clusters, 16-bit refcounts
  RefcountArray a(g, 0);
  a.Set(2, 7);
  a.Set(g.block_entries() + 1, 513);  // second block
  auto b0 = a.Block(0);
  auto b1 = a.Block(1);
  ASSERT_EQ(b0.size(), 4096u);
  EXPECT_EQ(format::GetRefcount(b0, 2, 4), 7u);
  EXPECT_EQ(format::GetRefcount(b1, 1, 4), 513u);
  // Asking for a block past the end does not change how many clusters are counted.
  const uint64_t before = a.clusters();
  EXPECT_EQ(a.Block(5).size(), 4096u);
  EXPECT_EQ(a.clusters(), before);
}

}  // namespace
}  // namespace qcow2kit
