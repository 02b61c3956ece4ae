// Every open-time check of ParseHeader: a valid header written by qemu-img is poked (or
// re-encoded with an odd extension) and the error must name the field and its value.

#include <gtest/gtest.h>

#include "format/endian.h"
#include "format/header.h"
#include "format/test_util.h"

namespace qcow2kit::format {
namespace {

using testutil::FailsWith;

// Byte offsets in the header poked below.
constexpr size_t kVersion = 4, kBackingOffset = 8, kBackingSize = 16, kClusterBits = 20;
constexpr size_t kSize = 24, kCrypt = 32, kL1Size = 36, kL1Offset = 40, kRtOffset = 48;
constexpr size_t kRtClusters = 56, kNbSnapshots = 60, kSnapshotsOffset = 64;
constexpr size_t kIncompat = 72, kAutoclear = 88, kRefcountOrder = 96, kHeaderLength = 100;
constexpr size_t kCompression = 104;
constexpr size_t kFeatureTableLength = 112 + 4;  // the feature table is the first extension

class HeaderValidationTest : public ::testing::Test {
 protected:
  // One qemu-img image (64 MiB, 64 KiB clusters) for the whole suite: file size 0x30008,
  // reftable at 0x10000 (1 cluster), L1 at 0x30000 (1 entry), feature table at 112.
  static void SetUpTestSuite() {
    testutil::TempDir dir;
    ASSERT_TRUE(dir.ok());
    const std::string path = dir.File("base.qcow2");
    ASSERT_TRUE(testutil::QemuImgCreate(path, "64M"));
    file_size_ = testutil::FileSize(path);
    ASSERT_EQ(file_size_, 0x30008u);
    base_ = new std::vector<uint8_t>(testutil::ReadCluster0(path, 65536));
  }
  static void TearDownTestSuite() { delete base_; }

  void SetUp() override { bytes_ = *base_; }

  void Poke32(size_t offset, uint32_t v) { StoreBE32(&bytes_[offset], v); }
  void Poke64(size_t offset, uint64_t v) { StoreBE64(&bytes_[offset], v); }
  Result<ParsedHeader> Parse() const { return ParseHeader(bytes_, file_size_); }
  Status Error() const { return Parse().status(); }

  // The base header, as parsed, for re-encoding with changes.
  static ParsedHeader Base() { return *ParseHeader(*base_, file_size_); }
  // Replaces bytes_ with the encoding of `x`.
  void Use(const ParsedHeader& x) {
    Result<std::vector<uint8_t>> r = EncodeHeader(x);
    ASSERT_TRUE(r.ok()) << r.status().message();
    bytes_ = *r;
  }
  // The base header plus one extension written as given, whatever its type.
  void UseExtension(uint32_t type, std::vector<uint8_t> data) {
    ParsedHeader x = Base();
    x.unknown_extensions.push_back({type, 0, std::move(data)});
    Use(x);
  }

  static inline std::vector<uint8_t>* base_ = nullptr;
  static inline uint64_t file_size_ = 0;
  std::vector<uint8_t> bytes_;
};

TEST_F(HeaderValidationTest, BaseIsValid) {
  Result<ParsedHeader> r = Parse();
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->header.l1_table_offset, 0x30000u);
}

TEST_F(HeaderValidationTest, Magic) {
  bytes_[3] = 0xfc;
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Image is not in qcow2 format (magic 0x514649fc)"));
}

TEST_F(HeaderValidationTest, Version) {
  Poke32(kVersion, 4);
  EXPECT_TRUE(FailsWith(Error(), ENOTSUP, "Unsupported qcow2 version 4"));
  Poke32(kVersion, 1);
  EXPECT_TRUE(FailsWith(Error(), ENOTSUP, "Unsupported qcow2 version 1"));
}

TEST_F(HeaderValidationTest, ClusterBits) {
  Poke32(kClusterBits, 8);
  EXPECT_TRUE(FailsWith(Error(), ENOTSUP, "Unsupported cluster size: 2^8"));
  Poke32(kClusterBits, 22);
  EXPECT_TRUE(FailsWith(Error(), ENOTSUP, "Unsupported cluster size: 2^22"));
}

TEST_F(HeaderValidationTest, HeaderLength) {
  Poke32(kHeaderLength, 96);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "qcow2 header too short (header_length 96"));
  Poke32(kHeaderLength, 0x10008);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "qcow2 header exceeds cluster size"));
  // Not a multiple of 8: QEMU does not refuse it but reads the extensions from there on,
  // here finding an end-marker type whose length runs past the cluster.
  Poke32(kHeaderLength, 108);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Header extension too large"));
}

TEST_F(HeaderValidationTest, MinimalV3HeaderHasNoCompressionField) {
  Poke32(kHeaderLength, 104);  // extensions start at 104: zero bytes, i.e. the end marker
  bytes_[kCompression] = 0;
  Result<ParsedHeader> r = Parse();
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->header.header_length, 104u);
  EXPECT_EQ(r->header.compression_type, CompressionType::kZlib);
  EXPECT_TRUE(r->extensions.empty());
}

TEST_F(HeaderValidationTest, TruncatedFileAndShortBuffer) {
  bytes_.resize(108);
  EXPECT_TRUE(FailsWith(ParseHeader(bytes_, 108).status(), EINVAL,
                        "qcow2 header extends past end of file (header_length 112"));
  // Past the end of the file the header reads as zeros, as in QEMU.
  bytes_.resize(100);
  EXPECT_TRUE(FailsWith(ParseHeader(bytes_, 100).status(), EINVAL,
                        "qcow2 header too short (header_length 0"));
  bytes_.resize(3);
  EXPECT_TRUE(FailsWith(ParseHeader(bytes_, 3).status(), EINVAL, "not in qcow2 format"));
  bytes_ = *base_;
  bytes_.resize(4096);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "needs the first 65536 bytes of the image, got 4096"));
}

TEST_F(HeaderValidationTest, BackingFileOffsetAndName) {
  Poke64(kBackingOffset, 0x10001);
  Poke32(kBackingSize, 4);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Invalid backing file offset 0x10001"));
  Poke64(kBackingOffset, 64);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Invalid backing file offset 0x40 (inside the header"));
  Poke64(kBackingOffset, 0x1000);
  Poke32(kBackingSize, 1024);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Backing file name too long (backing_file_size 1024"));
  Poke64(kBackingOffset, 0xff00);
  Poke32(kBackingSize, 0x101);  // one byte past cluster 0
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Backing file name too long (backing_file_size 257"));
  Poke32(kBackingSize, 0x100);
  Result<ParsedHeader> r = Parse();
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->backing_file, std::string(0x100, '\0'));
}

TEST_F(HeaderValidationTest, BackingNamePastEndOfShortFile) {
  bytes_.resize(0x800);
  Poke64(kBackingOffset, 0x7f0);
  Poke32(kBackingSize, 0x20);
  EXPECT_TRUE(FailsWith(ParseHeader(bytes_, 0x800).status(), EINVAL,
                        "Backing file name (offset 0x7f0, 32 bytes) extends past end of file"));
}

TEST_F(HeaderValidationTest, CompressionType) {
  bytes_[kCompression] = 1;
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "feature bit must be set for compression type zstd"));
  bytes_[kCompression] = 0;
  Poke64(kIncompat, kIncompatCompression);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "feature bit must not be set"));
  bytes_[kCompression] = 2;
  EXPECT_TRUE(FailsWith(Error(), ENOTSUP, "Unknown compression type: 2"));
  bytes_[kCompression] = 1;
  EXPECT_TRUE(Parse().ok());
}

TEST_F(HeaderValidationTest, UnknownIncompatibleFeature) {
  Poke64(kIncompat, 0x20);
  Status s = Error();
  EXPECT_EQ(s.code(), ENOTSUP);
  EXPECT_EQ(s.message(), "Unsupported qcow2 feature(s): Unknown incompatible feature: 20");
}

TEST_F(HeaderValidationTest, UnknownIncompatibleFeatureNamedByImageTable) {
  // Renumber the table's "compression type" entry (the 4th) to bit 5.
  bytes_[120 + 3 * 48 + 1] = 5;
  Poke64(kIncompat, 0x20 | 0x40);
  EXPECT_EQ(Error().message(),
            "Unsupported qcow2 feature(s): compression type, Unknown incompatible feature: 40");
}

TEST_F(HeaderValidationTest, Encryption) {
  Poke32(kCrypt, 1);
  EXPECT_TRUE(FailsWith(Error(), ENOTSUP, "encrypted images are not supported (crypt_method 1"));
  Poke32(kCrypt, 2);
  EXPECT_TRUE(FailsWith(Error(), ENOTSUP, "encrypted images are not supported (crypt_method 2"));
  Poke32(kCrypt, 3);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Unsupported encryption method: 3"));
}

TEST_F(HeaderValidationTest, RefcountOrder) {
  Poke32(kRefcountOrder, 7);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "may not exceed 64 bits (refcount_order 7)"));
  Poke32(kRefcountOrder, 6);
  EXPECT_TRUE(Parse().ok());
}

TEST_F(HeaderValidationTest, ExtendedL2NeedsSubclustersOf512Bytes) {
  Poke32(kClusterBits, 13);
  Poke64(kIncompat, kIncompatExtendedL2);
  EXPECT_TRUE(FailsWith(Error(), ENOTSUP, "Unsupported subcluster size: 256"));
}

TEST_F(HeaderValidationTest, RefcountTable) {
  Poke32(kRtClusters, 0);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "reference count table (refcount_table_clusters 0)"));
  Poke32(kRtClusters, 129);  // 8 MiB of 64 KiB clusters is 128
  EXPECT_TRUE(FailsWith(Error(), EINVAL,
                        "Refcount table too large: refcount_table_clusters 129 exceeds 128"));
  Poke32(kRtClusters, 3);
  EXPECT_TRUE(FailsWith(Error(), EINVAL,
                        "Refcount table (offset 0x10000, 3 clusters) extends past end of file "
                        "(0x30008 bytes)"));
  Poke32(kRtClusters, 1);
  Poke64(kRtOffset, 0x10200);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Refcount table offset 0x10200 is not cluster aligned"));
  Poke64(kRtOffset, 0x7fffffffffff0000);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "lies beyond the largest file offset"));
}

TEST_F(HeaderValidationTest, SnapshotTable) {
  Poke32(kNbSnapshots, 65537);
  EXPECT_TRUE(
      FailsWith(Error(), EINVAL, "Snapshot table too large: nb_snapshots 65537 exceeds 65536"));
  Poke32(kNbSnapshots, 0);
  Poke64(kSnapshotsOffset, 0x30008);  // checked even without snapshots, as QEMU does
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Snapshot table offset 0x30008 is not cluster aligned"));
  Poke32(kNbSnapshots, 1);
  Poke64(kSnapshotsOffset, 0x30000);
  EXPECT_TRUE(FailsWith(Error(), EINVAL,
                        "Snapshot table (offset 0x30000, 1 entry) extends past end of file"));
}

TEST_F(HeaderValidationTest, L1Table) {
  Poke32(kL1Size, 8);
  EXPECT_TRUE(FailsWith(Error(), EINVAL,
                        "L1 table (offset 0x30000, 8 entries) extends past end of file "
                        "(0x30008 bytes)"));
  Poke32(kL1Size, (4u << 20) + 1);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "L1 table too large: l1_size 4194305 exceeds 4194304"));
  Poke32(kL1Size, 1);
  Poke64(kL1Offset, 0x10200);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "L1 table offset 0x10200 is not cluster aligned"));
  Poke64(kL1Offset, 0xffffffffffff0000);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "L1 table (offset 0xffffffffffff0000, 1 entry) lies"));
}

TEST_F(HeaderValidationTest, L1MustCoverTheVirtualSize) {
  Poke32(kL1Size, 0);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "L1 table is too small: l1_size 0"));
  Poke32(kL1Size, 1);
  Poke64(kSize, 512ull << 20);  // one L2 table of 8192 x 64 KiB
  EXPECT_TRUE(Parse().ok());
  Poke64(kSize, (512ull << 20) + 1);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "L1 table is too small: l1_size 1, virtual size"));
  Poke64(kSize, ~0ull);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "L1 table is too small"));
  // Extended L2 tables hold half as many entries.
  Poke64(kIncompat, kIncompatExtendedL2);
  Poke64(kSize, 256ull << 20);
  EXPECT_TRUE(Parse().ok());
  Poke64(kSize, 512ull << 20);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "needs 2 entries"));
}

TEST_F(HeaderValidationTest, ExtensionRunningPastTheArea) {
  Poke32(kFeatureTableLength, 0x10000);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Header extension too large: extension 0x6803f857"));
  bytes_ = *base_;
  // The area ends at the backing name: 4 bytes leave no room for a type and length.
  Poke64(kBackingOffset, 116);
  Poke32(kBackingSize, 0);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Header extension too large"));
  Poke64(kBackingOffset, 200);  // inside the feature table's data
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "Header extension too large"));
}

TEST_F(HeaderValidationTest, FeatureTableLengthMustBeMultipleOf48) {
  Poke32(kFeatureTableLength, 383);  // same padded size, so the end marker still follows
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "length 383 is not a multiple of 48"));
}

TEST_F(HeaderValidationTest, DuplicateKnownExtension) {
  UseExtension(kExtFeatureTable, std::vector<uint8_t>(48));
  EXPECT_TRUE(
      FailsWith(Error(), EINVAL, "Duplicate feature name table header extension at offset 0x1f8"));
}

TEST_F(HeaderValidationTest, UnknownExtensionsMayRepeat) {
  ParsedHeader x = Base();
  x.unknown_extensions = {{0x77, 0, {1}}, {0x77, 0, {2, 3}}};
  Use(x);
  Result<ParsedHeader> r = Parse();
  ASSERT_TRUE(r.ok()) << r.status().message();
  ASSERT_EQ(r->unknown_extensions.size(), 2u);
  EXPECT_EQ(r->unknown_extensions[1].data, (std::vector<uint8_t>{2, 3}));
  EXPECT_EQ(r->unknown_extensions[1].offset, 0x1f8u + 16);
}

TEST_F(HeaderValidationTest, BackingFormatLength) {
  UseExtension(kExtBackingFormat, std::vector<uint8_t>(16, 'f'));
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "backing format name of 16 bytes is too long"));
  UseExtension(kExtBackingFormat, std::vector<uint8_t>(15, 'f'));
  Result<ParsedHeader> r = Parse();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->backing_format, std::string(15, 'f'));
}

std::vector<uint8_t> BitmapsExt(uint32_t nb, uint32_t reserved, uint64_t size, uint64_t offset) {
  std::vector<uint8_t> d(24);
  StoreBE32(&d[0], nb);
  StoreBE32(&d[4], reserved);
  StoreBE64(&d[8], size);
  StoreBE64(&d[16], offset);
  return d;
}

class BitmapsExtTest : public HeaderValidationTest {
 protected:
  // The extension with the autoclear bit that makes it valid.
  Status With(std::vector<uint8_t> ext) {
    ParsedHeader x = Base();
    x.header.autoclear_features = kAutoclearBitmaps;
    x.unknown_extensions.push_back({kExtBitmaps, 0, std::move(ext)});
    Use(x);
    return Error();
  }
};

TEST_F(BitmapsExtTest, Valid) {
  EXPECT_TRUE(With(BitmapsExt(1, 0, 8, 0x20000)).ok());
  Result<ParsedHeader> r = Parse();
  ASSERT_TRUE(r.ok() && r->bitmaps.has_value());
  EXPECT_EQ(*r->bitmaps, (BitmapsExtension{1, 8, 0x20000}));
  EXPECT_FALSE(r->bitmaps_inconsistent);
}

TEST_F(BitmapsExtTest, Errors) {
  std::vector<uint8_t> short_ext = BitmapsExt(1, 0, 8, 0x20000);
  short_ext.resize(16);
  EXPECT_TRUE(FailsWith(With(short_ext), EINVAL, "length 16 (expected 24)"));
  EXPECT_TRUE(FailsWith(With(BitmapsExt(0, 0, 8, 0x20000)), EINVAL, "nb_bitmaps is 0"));
  EXPECT_TRUE(
      FailsWith(With(BitmapsExt(65536, 0, 8, 0x20000)), EINVAL, "nb_bitmaps 65536 exceeds 65535"));
  EXPECT_TRUE(FailsWith(With(BitmapsExt(1, 1, 8, 0x20000)), EINVAL, "reserved field"));
  EXPECT_TRUE(FailsWith(With(BitmapsExt(1, 0, (64 << 20) + 1, 0x20000)), EINVAL,
                        "bitmap directory size 67108865 exceeds 67108864"));
  EXPECT_TRUE(FailsWith(With(BitmapsExt(1, 0, 8, 0x20100)), EINVAL,
                        "bitmap directory offset 0x20100 is not cluster aligned"));
  EXPECT_TRUE(FailsWith(With(BitmapsExt(1, 0, 16, 0x30000)), EINVAL,
                        "bitmap directory (offset 0x30000, 16 bytes) extends past end of file"));
}

TEST_F(BitmapsExtTest, WithoutAutoclearBitTheBitmapsAreInconsistent) {
  UseExtension(kExtBitmaps, BitmapsExt(0, 7, 0, 0x123));  // contents are not looked at
  Result<ParsedHeader> r = Parse();
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(r->bitmaps_inconsistent);
  EXPECT_FALSE(r->bitmaps.has_value());
  // Re-encoding drops the extension, as QEMU's next header update does.
  Result<std::vector<uint8_t>> again = EncodeHeader(*r);
  ASSERT_TRUE(again.ok());
  Result<ParsedHeader> r2 = ParseHeader(*again, file_size_);
  ASSERT_TRUE(r2.ok());
  EXPECT_FALSE(r2->bitmaps_inconsistent);
  EXPECT_EQ(r2->extensions.size(), 1u);
}

TEST_F(HeaderValidationTest, AutoclearBitmapsBitWithoutExtensionIsIgnored) {
  Poke64(kAutoclear, kAutoclearBitmaps);
  Result<ParsedHeader> r = Parse();
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_FALSE(r->bitmaps.has_value());
  EXPECT_FALSE(r->bitmaps_inconsistent);
}

TEST_F(HeaderValidationTest, CryptoExtension) {
  std::vector<uint8_t> crypto(16);
  StoreBE64(&crypto[0], 0x20000);
  StoreBE64(&crypto[8], 0x1000);
  UseExtension(kExtCrypto, crypto);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "only expected with LUKS encryption (crypt_method 0)"));
  Poke32(kCrypt, 2);
  EXPECT_TRUE(FailsWith(Error(), ENOTSUP, "encrypted images are not supported"));
  Poke32(kCrypt, 1);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "only expected with LUKS encryption (crypt_method 1)"));
  UseExtension(kExtCrypto, std::vector<uint8_t>(8));
  Poke32(kCrypt, 2);
  EXPECT_TRUE(FailsWith(Error(), EINVAL,
                        "crypto header extension at offset 0x1f8: length 8 (expected 16)"));
  StoreBE64(&crypto[0], 0x20200);
  UseExtension(kExtCrypto, crypto);
  Poke32(kCrypt, 2);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "encryption header offset 0x20200 is not cluster"));
}

TEST_F(HeaderValidationTest, ExternalDataFileConsistency) {
  UseExtension(kExtDataFile, {'d', '.', 'r', 'a', 'w'});
  EXPECT_TRUE(FailsWith(Error(), EINVAL,
                        "data file name present but the external data file feature is not set"));
  Poke64(kIncompat, kIncompatDataFile);
  Result<ParsedHeader> r = Parse();
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->data_file, "d.raw");

  bytes_ = *base_;
  Poke64(kAutoclear, kAutoclearDataFileRaw);
  EXPECT_TRUE(FailsWith(Error(), EINVAL, "data-file-raw requires a data file"));
  // The bit without a name is fine here: the caller must then be given the data file.
  Poke64(kIncompat, kIncompatDataFile);
  r = Parse();
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_FALSE(r->data_file.has_value());
}

}  // namespace
}  // namespace qcow2kit::format
