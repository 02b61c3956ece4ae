#include "image/metadata_map.h"

#include "gtest/gtest.h"

namespace qcow2kit {
namespace {

using K = MetadataMap::Kind;

TEST(MetadataMapTest, FindsWhatAWriteWouldHitInQemuOrder) {
  MetadataMap m(16);  // 64 KiB clusters
  m.AddRange(K::kHeader, 0, 0x10000);
  m.AddRange(K::kRefcountTable, 0x10000, 0x10000);
  m.AddRange(K::kActiveL1, 0x30000, 16);  // a partial cluster protects all of it
  m.AddTable(K::kRefcountBlock, 0x20000);
  m.AddTable(K::kActiveL2, 0x40000);
  EXPECT_EQ(m.Find(0x50000, 0x10000), K::kNone);
  EXPECT_EQ(m.Find(0x100, 1), K::kHeader);
  EXPECT_EQ(m.Find(0x3f000, 0x1000), K::kActiveL1);
  EXPECT_EQ(m.Find(0x4ffff, 1), K::kActiveL2);
  EXPECT_EQ(m.Find(0x2f000, 0x2000), K::kActiveL1);  // spans block and L1: L1 comes first
  EXPECT_EQ(m.Find(0x20000, 0x1000), K::kRefcountBlock);
  EXPECT_EQ(m.Find(0x20000, 0x1000, MetadataMap::Bit(K::kRefcountBlock)), K::kNone);
  EXPECT_EQ(m.Find(0x60000, 0), K::kNone);
  EXPECT_STREQ(MetadataMap::Name(K::kRefcountBlock), "refcount block");
  m.Clear();
  EXPECT_EQ(m.Find(0, 0x100000), K::kNone);
}

TEST(MetadataMapTest, ATableAtAnUnalignedOffsetCoversBothClusters) {
  MetadataMap m(16);
  m.AddTable(K::kActiveL2, 0x50200);
  EXPECT_EQ(m.Find(0x50000, 512), K::kActiveL2);
  EXPECT_EQ(m.Find(0x60000, 512), K::kActiveL2);
  EXPECT_EQ(m.Find(0x70000, 512), K::kNone);
}

TEST(MetadataMapTest, OneClusterTwoRoles) {
  MetadataMap m(9);
  m.AddTable(K::kActiveL2, 0x1000);
  m.AddTable(K::kRefcountBlock, 0x1000);  // a damaged image
  EXPECT_EQ(m.Find(0x1000, 1), K::kActiveL2);
  EXPECT_EQ(m.Find(0x1000, 1, MetadataMap::Bit(K::kActiveL2)), K::kRefcountBlock);
}

}  // namespace
}  // namespace qcow2kit
