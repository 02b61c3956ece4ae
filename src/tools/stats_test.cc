#include "tools/stats.h"

#include "gtest/gtest.h"

namespace qcow2kit::tools {
namespace {

constexpr uint64_t kCopied = format::kOflagCopied;

TEST(StatsTest, CountsClusterKindsAndFragmentationLikeQemuCheck) {
  format::Geometry g{16, false, false};
  ClusterCounter c(g);
  c.StartTable();
  c.Add(kCopied | 0x50000, 0);                       // normal
  c.Add(kCopied | 0x60000, 0);                       // contiguous
  c.Add(kCopied | 0x90000, 0);                       // fragmented
  c.Add(0, 0);                                       // unallocated
  c.Add(format::kOflagZero, 0);                      // zero, no host cluster
  c.Add(kCopied | 0xa0000 | format::kOflagZero, 0);  // zero, preallocated: contiguous
  c.Add(format::EncodeCompressed(0x123456, 700, 16), 0);
  c.StartTable();
  c.Add(kCopied | 0x200000, 0);  // the first of a table is never fragmented
  c.AddUnallocated(10);
  const ClusterCounts& n = c.counts();
  EXPECT_EQ(n.normal, 4u);
  EXPECT_EQ(n.zero_plain, 1u);
  EXPECT_EQ(n.zero_alloc, 1u);
  EXPECT_EQ(n.compressed, 1u);
  EXPECT_EQ(n.unallocated, 11u);
  EXPECT_EQ(n.check_allocated, 6u);
  EXPECT_EQ(n.fragmented, 2u);  // 0x90000 and the compressed cluster
}

TEST(StatsTest, ExtendedL2AllZeroClustersCountAsZero) {
  format::Geometry g{16, true, false};
  ClusterCounter c(g);
  c.Add(0, 0xffffffff00000000ull);                  // all subclusters zero, no host
  c.Add(kCopied | 0x50000, 0xffffffff00000000ull);  // all zero, host reserved
  c.Add(kCopied | 0x60000, 0x00000000ffffffffull);  // all allocated
  c.Add(0, 0x0000000100000000ull);                  // partly zero: reads from backing
  EXPECT_EQ(c.counts().zero_plain, 1u);
  EXPECT_EQ(c.counts().zero_alloc, 1u);
  EXPECT_EQ(c.counts().normal, 1u);
  EXPECT_EQ(c.counts().unallocated, 1u);
}

}  // namespace
}  // namespace qcow2kit::tools
