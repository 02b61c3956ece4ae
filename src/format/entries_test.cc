// L1/L2 entry classification and validation, and compressed descriptors: tables from the
// reference and entries read back from images written by qemu-img / qemu-io.

#include "format/entries.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "format/endian.h"
#include "format/test_util.h"

namespace qcow2kit::format {
namespace {

using testutil::FailsWith;

constexpr Geometry kStd{16, false, false};
constexpr Geometry kExt{16, true, false};
constexpr Geometry kStdDataFile{16, false, true};
constexpr Geometry kExtDataFile{16, true, true};

TEST(ClassifyClusterTest, StandardL2) {
  struct Case {
    uint64_t entry;
    Geometry g;
    ClusterType want;
  } cases[] = {
      {0, kStd, ClusterType::kUnallocated},
      {kOflagCopied, kStd, ClusterType::kUnallocated},
      {kOflagCopied, kStdDataFile, ClusterType::kNormal},  // data at offset 0 of the data file
      {0, kStdDataFile, ClusterType::kUnallocated},
      {0x1, kStd, ClusterType::kZeroPlain},
      {0x50001, kStd, ClusterType::kZeroAlloc},
      {0x8000000000050001, kStd, ClusterType::kZeroAlloc},
      {0x8000000000050000, kStd, ClusterType::kNormal},
      {0x50000, kStd, ClusterType::kNormal},
      {0x4800000000050000, kStd, ClusterType::kCompressed},
      {0x4000000000000001, kStd, ClusterType::kCompressed},  // compressed wins over bit 0
      // With extended L2 entries bit 0 is not a zero flag.
      {0x1, kExt, ClusterType::kUnallocated},
      {0x50001, kExt, ClusterType::kNormal},
      {0x8000000000050000, kExt, ClusterType::kNormal},
      {kOflagCopied, kExtDataFile, ClusterType::kNormal},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(ClassifyCluster(c.entry, c.g), c.want) << std::hex << c.entry;
  }
}

TEST(ClassifySubclusterTest, StandardEntryIsOneSubcluster) {
  EXPECT_EQ(ClassifySubcluster(0x50001, 0, 0, kStd), SubclusterType::kZeroAlloc);
  EXPECT_EQ(ClassifySubcluster(0x1, 0, 0, kStd), SubclusterType::kZeroPlain);
  EXPECT_EQ(ClassifySubcluster(0x50000, ~0ull, 0, kStd), SubclusterType::kNormal);  // no bitmap
  EXPECT_EQ(ClassifySubcluster(0, 0, 0, kStd), SubclusterType::kUnallocatedPlain);
  EXPECT_EQ(ClassifySubcluster(kOflagCompressed | 5, 0, 0, kStd), SubclusterType::kCompressed);
  EXPECT_EQ(ClassifySubcluster(0x50000, 0, 1, kStd), SubclusterType::kInvalid);
}

// Reference §1.7, observed with qemu-io: 2 KiB written at 4 KiB and 32..36 KiB zeroed.
TEST(ClassifySubclusterTest, ObservedExtendedEntry) {
  const uint64_t entry = 0x8000000000050000, bitmap = 0x0003000000000004;
  for (uint32_t i = 0; i < 32; ++i) {
    SubclusterType want = SubclusterType::kUnallocatedAlloc;
    if (i == 2) want = SubclusterType::kNormal;
    if (i == 16 || i == 17) want = SubclusterType::kZeroAlloc;
    EXPECT_EQ(ClassifySubcluster(entry, bitmap, i, kExt), want) << i;
  }
  EXPECT_EQ(ClassifySubcluster(entry, bitmap, 32, kExt), SubclusterType::kInvalid);
  EXPECT_TRUE(ValidateL2Entry(entry, bitmap, 0, 3, kExt).ok());
}

TEST(ClassifySubclusterTest, ExtendedRules) {
  // No host cluster: zero bits make zero-plain subclusters, alloc bits are invalid.
  EXPECT_EQ(ClassifySubcluster(0, 1ull << 32, 0, kExt), SubclusterType::kZeroPlain);
  EXPECT_EQ(ClassifySubcluster(0, 1ull << 32, 1, kExt), SubclusterType::kUnallocatedPlain);
  EXPECT_EQ(ClassifySubcluster(0, 1ull << 31, 0, kExt), SubclusterType::kInvalid);
  // ... unless the entry is data at offset 0 of an external data file.
  EXPECT_EQ(ClassifySubcluster(kOflagCopied, 1, 0, kExtDataFile), SubclusterType::kNormal);
  // A subcluster both allocated and zero makes the whole entry invalid.
  const uint64_t both = (1ull << 32) | 1;
  EXPECT_EQ(ClassifySubcluster(0x50000, both, 5, kExt), SubclusterType::kInvalid);
  EXPECT_EQ(ClassifySubcluster(0x50000, 0xffffffffull, 31, kExt), SubclusterType::kNormal);
  EXPECT_EQ(ClassifySubcluster(0x50000, 0xffffffff00000000, 31, kExt), SubclusterType::kZeroAlloc);
  // Compressed clusters have no subclusters.
  EXPECT_EQ(ClassifySubcluster(kOflagCompressed | 5, 0, 7, kExt), SubclusterType::kCompressed);
  EXPECT_EQ(ClassifySubcluster(kOflagCompressed | 5, 1, 7, kExt), SubclusterType::kInvalid);
}

TEST(ValidateL1EntryTest, ReservedBitsAndAlignment) {
  EXPECT_TRUE(ValidateL1Entry(0x8000000000050000, 0, kStd).ok());
  EXPECT_TRUE(ValidateL1Entry(0, 0, kStd).ok());
  EXPECT_TRUE(FailsWith(ValidateL1Entry(0x8000000000050001, 3, kStd), EUCLEAN,
                        "L1 entry 3 (0x8000000000050001) has reserved bits set"));
  EXPECT_TRUE(FailsWith(ValidateL1Entry(0x0100000000050000, 0, kStd), EUCLEAN, "reserved bits"));
  EXPECT_TRUE(FailsWith(ValidateL1Entry(0x50200, 9, kStd), EUCLEAN,
                        "L1 entry 9 (0x0000000000050200): L2 table offset 0x50200 is not "
                        "cluster aligned"));
  EXPECT_TRUE(ValidateL1Entry(0x50200, 9, Geometry{9, false, false}).ok());
}

TEST(ValidateL2EntryTest, StandardEntries) {
  EXPECT_TRUE(ValidateL2Entry(0x8000000000050000, 0, 0, 3, kStd).ok());
  EXPECT_TRUE(ValidateL2Entry(0x1, 0, 0, 3, kStd).ok());
  EXPECT_TRUE(FailsWith(ValidateL2Entry(0x50002, 0, 0x20000, 3, kStd), EUCLEAN,
                        "L2 entry 0x0000000000050002 for guest offset 0x20000: reserved bits"));
  EXPECT_TRUE(FailsWith(ValidateL2Entry(0x0200000000050000, 0, 0, 3, kStd), EUCLEAN, "reserved"));
  EXPECT_TRUE(FailsWith(ValidateL2Entry(0x50200, 0, 0, 3, kStd), EUCLEAN,
                        "host offset 0x50200 is not cluster aligned"));
  EXPECT_TRUE(FailsWith(ValidateL2Entry(0x1, 0, 0x10000, 2, kStd), EUCLEAN,
                        "zero cluster in a version 2 image"));
  // Bit 0 is reserved with extended L2 entries.
  EXPECT_TRUE(FailsWith(ValidateL2Entry(0x50001, 0, 0, 3, kExt), EUCLEAN, "reserved bits"));
}

TEST(ValidateL2EntryTest, SubclusterBitmaps) {
  EXPECT_TRUE(FailsWith(ValidateL2Entry(0x50000, (1ull << 40) | (1ull << 8), 0, 3, kExt), EUCLEAN,
                        "subcluster bitmap 0x0000010000000100 marks subclusters both allocated "
                        "and zero"));
  EXPECT_TRUE(FailsWith(ValidateL2Entry(0, 0x4, 0, 3, kExt), EUCLEAN,
                        "allocates subclusters of a cluster without a host offset"));
  EXPECT_TRUE(ValidateL2Entry(0, 0xffffffff00000000, 0, 3, kExt).ok());
  EXPECT_TRUE(ValidateL2Entry(kOflagCopied, 0x1, 0, 3, kExtDataFile).ok());
}

TEST(ValidateL2EntryTest, CompressedEntries) {
  EXPECT_TRUE(ValidateL2Entry(0x4800000000050000, 0, 0, 3, kStd).ok());
  EXPECT_TRUE(FailsWith(ValidateL2Entry(0x4800000000050000, 0, 0, 3, kStdDataFile), EUCLEAN,
                        "compressed cluster in an image with an external data file"));
  EXPECT_TRUE(FailsWith(ValidateL2Entry(0xc800000000050000, 0, 0, 3, kStd), EUCLEAN,
                        "compressed cluster has the COPIED flag"));
  EXPECT_TRUE(FailsWith(ValidateL2Entry(0x4800000000050000, 1, 0, 3, kExt), EUCLEAN,
                        "non-zero subcluster bitmap"));
  // 512-byte clusters: 61 offset bits, of which 56..60 must be zero.
  const Geometry small{9, false, false};
  EXPECT_TRUE(ValidateL2Entry(kOflagCompressed | 0x00ffffffffffffff, 0, 0, 3, small).ok());
  EXPECT_TRUE(FailsWith(ValidateL2Entry(kOflagCompressed | (1ull << 57), 0, 0, 3, small), EUCLEAN,
                        "compressed cluster offset 0x200000000000000 is not below 2^56"));
  // With 64 KiB clusters bit 57 belongs to the sector count.
  EXPECT_TRUE(ValidateL2Entry(kOflagCompressed | (1ull << 57), 0, 0, 3, kStd).ok());
}

// Reference §1.6: four 64 KiB clusters compressed into host cluster 5.
TEST(CompressedDescriptorTest, ObservedDescriptor) {
  CompressedDescriptor d = DecodeCompressed(0x4800000000050000, 16);
  EXPECT_EQ(d.host_offset, 0x50000u);
  EXPECT_EQ(d.extra_sectors, 32u);
  EXPECT_EQ(d.read_bound(), 16896u);
  EXPECT_EQ(EncodeCompressed(0x50000, 16400, 16), 0x4800000000050000u);
  EXPECT_EQ(EncodeCompressed(0x50000, 16384, 16), 0x47c0000000050000u);  // 31 extra sectors
}

TEST(CompressedDescriptorTest, ReadBoundOfUnalignedStream) {
  // A stream starting 0x1f0 into a sector, 0x20 bytes long: spans 2 sectors.
  const uint64_t e = EncodeCompressed(0x123451f0, 0x20, 16);
  CompressedDescriptor d = DecodeCompressed(e, 16);
  EXPECT_EQ(d.host_offset, 0x123451f0u);
  EXPECT_EQ(d.extra_sectors, 1u);
  EXPECT_EQ(d.read_bound(), 1024u - 0x1f0);
}

TEST(CompressedDescriptorTest, RoundTripsForEveryClusterSize) {
  for (uint32_t cb = 9; cb <= 21; ++cb) {
    const uint32_t offset_bits = std::min(70 - cb, 56u);
    const uint64_t cluster = 1ull << cb;
    const uint64_t highest = (uint64_t{1} << offset_bits) - cluster - 1;
    for (uint64_t offset : {uint64_t{0}, uint64_t{0x200}, uint64_t{0x12345}, highest}) {
      for (uint64_t length : {uint64_t{1}, uint64_t{511}, cluster / 2 + 3, cluster - 1, cluster}) {
        const uint64_t e = EncodeCompressed(offset, length, cb);
        EXPECT_EQ(ClassifyCluster(e, Geometry{cb, false, false}), ClusterType::kCompressed);
        EXPECT_TRUE(ValidateL2Entry(e, 0, 0, 3, Geometry{cb, false, false}).ok());
        const CompressedDescriptor d = DecodeCompressed(e, cb);
        ASSERT_EQ(d.host_offset, offset) << cb << " " << length;
        EXPECT_EQ(d.extra_sectors, (offset + length - 1) / 512 - offset / 512);
        // The bound covers the stream and ends at the end of its last sector.
        EXPECT_GE(d.read_bound(), length);
        EXPECT_EQ((offset + d.read_bound()) % 512, 0u);
      }
    }
  }
}

// Entries written by qemu-io: a data cluster, a zero cluster and a compressed cluster, then
// the subcluster example of the reference.
class QemuEntriesTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(dir_.ok()); }

  // Runs qemu-io commands on a new image and returns the first L2 table's entries.
  std::vector<uint8_t> FirstL2Table(const std::string& options, const std::string& commands) {
    const std::string path = dir_.File("t.qcow2");
    EXPECT_TRUE(testutil::QemuImgCreate(path, "1M", options));
    EXPECT_TRUE(testutil::RunCommand("qemu-io " + commands + " '" + path + "'"));
    const uint64_t l1_offset = LoadBE64(testutil::ReadFile(path, 40, 8).data());
    const uint64_t l1_entry = LoadBE64(testutil::ReadFile(path, l1_offset, 8).data());
    EXPECT_TRUE(ValidateL1Entry(l1_entry, 0, kStd).ok());
    return testutil::ReadFile(path, L1EntryOffset(l1_entry), 65536);
  }

  testutil::TempDir dir_;
};

TEST_F(QemuEntriesTest, StandardClusterKinds) {
  std::vector<uint8_t> l2 =
      FirstL2Table("", "-c 'write -P 1 0 64k' -c 'write -z 64k 64k' -c 'write -c -P 2 128k 64k'");
  ASSERT_EQ(l2.size(), 65536u);
  const uint64_t e0 = LoadBE64(&l2[0]), e1 = LoadBE64(&l2[8]), e2 = LoadBE64(&l2[16]);
  EXPECT_EQ(ClassifyCluster(e0, kStd), ClusterType::kNormal);
  EXPECT_TRUE(e0 & kOflagCopied);
  EXPECT_EQ(ClassifyCluster(e1, kStd), ClusterType::kZeroPlain);
  EXPECT_EQ(ClassifyCluster(e2, kStd), ClusterType::kCompressed);
  EXPECT_EQ(ClassifyCluster(LoadBE64(&l2[24]), kStd), ClusterType::kUnallocated);
  for (uint64_t i = 0; i < 4; ++i) {
    EXPECT_TRUE(ValidateL2Entry(LoadBE64(&l2[i * 8]), 0, i << 16, 3, kStd).ok()) << i;
  }
  // The compressed stream sits right after the data cluster's host cluster.
  const CompressedDescriptor d = DecodeCompressed(e2, 16);
  EXPECT_EQ(d.host_offset, L2EntryOffset(e0) + 0x10000);
  EXPECT_LT(d.read_bound(), 65536u);
}

TEST_F(QemuEntriesTest, ObservedSubclusterBitmap) {
  std::vector<uint8_t> l2 =
      FirstL2Table("extended_l2=on", "-c 'write -P 0x11 4k 2k' -c 'write -z 32k 4k'");
  ASSERT_EQ(l2.size(), 65536u);
  const uint64_t entry = LoadBE64(&l2[0]), bitmap = LoadBE64(&l2[8]);
  EXPECT_EQ(entry, 0x8000000000050000u);
  EXPECT_EQ(bitmap, 0x0003000000000004u);
  EXPECT_EQ(ClassifySubcluster(entry, bitmap, 2, kExt), SubclusterType::kNormal);
  EXPECT_EQ(ClassifySubcluster(entry, bitmap, 16, kExt), SubclusterType::kZeroAlloc);
  EXPECT_EQ(ClassifySubcluster(entry, bitmap, 0, kExt), SubclusterType::kUnallocatedAlloc);
  EXPECT_EQ(kExt.l2_entries(), 4096u);
  EXPECT_EQ(kExt.subcluster_size(), 2048u);
}

}  // namespace
}  // namespace qcow2kit::format
