// Refcount entries of every width: bit layout, independence of neighbours, and refcount
// blocks written by qemu-img.

#include "format/refcount.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "format/endian.h"
#include "format/entries.h"
#include "format/test_util.h"

namespace qcow2kit::format {
namespace {

TEST(RefcountTest, ByteLayoutOfEachWidth) {
  struct Case {
    uint32_t order;
    uint64_t index;
    uint64_t value;
    std::vector<uint8_t> bytes;  // the first bytes of the block afterwards
  } cases[] = {
      {0, 1, 1, {0x02, 0x00}},  // LSB first inside the byte
      {0, 9, 1, {0x00, 0x02}},
      {1, 1, 3, {0x0c, 0x00}},
      {1, 6, 2, {0x00, 0x20}},
      {2, 1, 0xa, {0xa0, 0x00}},
      {2, 2, 0x5, {0x00, 0x05}},
      {3, 2, 0xab, {0x00, 0x00, 0xab, 0x00}},
      {4, 1, 0x1234, {0x00, 0x00, 0x12, 0x34}},  // big-endian from 8 bits up
      {5, 1, 0x12345678, {0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78}},
      {6, 1, 0x0102030405060708, {0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8}},
  };
  for (const Case& c : cases) {
    std::vector<uint8_t> block(64);
    SetRefcount(block, c.index, c.order, c.value);
    EXPECT_TRUE(std::equal(c.bytes.begin(), c.bytes.end(), block.begin()))
        << "order " << c.order << " index " << c.index;
    EXPECT_EQ(GetRefcount(block, c.index, c.order), c.value);
  }
}

// Writes a different value into every entry, then rewrites each one and checks that no other
// entry changed.
TEST(RefcountTest, EntriesAreIndependent) {
  for (uint32_t order = 0; order <= 6; ++order) {
    SCOPED_TRACE(order);
    const RefcountGeometry g{9, order};
    const uint64_t n = g.block_entries();
    const uint64_t max = g.max_refcount();
    std::vector<uint8_t> block(512);
    auto pattern = [&](uint64_t i) { return (i * 0x9e3779b97f4a7c15ull) & max; };
    for (uint64_t i = 0; i < n; ++i) SetRefcount(block, i, order, pattern(i));
    for (uint64_t i = 0; i < n; i += 7) {
      SetRefcount(block, i, order, max - pattern(i));
      for (uint64_t j = 0; j < n; ++j) {
        const uint64_t want = j == i ? max - pattern(i) : pattern(j);
        ASSERT_EQ(GetRefcount(block, j, order), want) << "set " << i << " read " << j;
      }
      SetRefcount(block, i, order, pattern(i));
    }
  }
}

TEST(RefcountTest, MaximumValuesAndGeometry) {
  const uint64_t maxima[] = {1, 3, 15, 255, 65535, 0xffffffff, ~0ull};
  for (uint32_t order = 0; order <= 6; ++order) {
    const RefcountGeometry g{16, order};
    EXPECT_EQ(g.max_refcount(), maxima[order]);
    EXPECT_EQ(g.block_entries(), (65536ull * 8) >> order);
    std::vector<uint8_t> block(65536);
    SetRefcount(block, g.block_entries() - 1, order, g.max_refcount());
    EXPECT_EQ(GetRefcount(block, g.block_entries() - 1, order), g.max_refcount());
    EXPECT_EQ(GetRefcount(block, g.block_entries() - 2, order), 0u);
  }
  // 16-bit refcounts, 64 KiB clusters: 32768 clusters (2 GiB) per block.
  const RefcountGeometry g{16, 4};
  EXPECT_EQ(g.table_index(0x80000000), 1u);
  EXPECT_EQ(g.block_index(0x80000000), 0u);
  EXPECT_EQ(g.block_index(0x80050000), 5u);
  EXPECT_EQ(g.table_index(0x7fff0000), 0u);
  EXPECT_EQ(g.block_index(0x7fff0000), 32767u);
}

// qemu-img's refcount blocks for every width: the 4 metadata clusters of a fresh image and
// one data cluster have refcount 1; after an internal snapshot the data cluster has 2.
TEST(RefcountTest, ReadsQemuRefcountBlocks) {
  testutil::TempDir dir;
  ASSERT_TRUE(dir.ok());
  for (uint32_t order = 0; order <= 6; ++order) {
    SCOPED_TRACE(order);
    const std::string path = dir.File("r" + std::to_string(order) + ".qcow2");
    ASSERT_TRUE(
        testutil::QemuImgCreate(path, "64M", "refcount_bits=" + std::to_string(1u << order)));
    ASSERT_TRUE(testutil::RunCommand("qemu-io -c 'write -P 7 0 64k' '" + path + "'"));
    if (order > 0) {  // a 1-bit refcount cannot count a shared cluster
      ASSERT_TRUE(testutil::RunCommand("qemu-img snapshot -c s '" + path + "'"));
    }

    auto u64_at = [&](uint64_t off) { return LoadBE64(testutil::ReadFile(path, off, 8).data()); };
    const uint64_t reftable = u64_at(48);
    const uint64_t refblock = u64_at(reftable) & kRefcountTableOffsetMask;
    const uint64_t l2 = L1EntryOffset(u64_at(u64_at(40)));
    const uint64_t data = L2EntryOffset(u64_at(l2));
    ASSERT_NE(data, 0u);
    std::vector<uint8_t> block = testutil::ReadFile(path, refblock, 65536);
    ASSERT_EQ(block.size(), 65536u);
    for (uint64_t c = 0; c < 4; ++c) EXPECT_EQ(GetRefcount(block, c, order), 1u) << c;
    EXPECT_EQ(GetRefcount(block, data >> 16, order), order > 0 ? 2u : 1u);
    EXPECT_EQ(GetRefcount(block, 1000, order), 0u);
  }
}

}  // namespace
}  // namespace qcow2kit::format
