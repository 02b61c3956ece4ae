// ParseHeader against headers written by the real qemu-img, and EncodeHeader round trips:
// our encoding of what we parsed must be byte-identical to QEMU's cluster 0.

#include "format/header.h"

#include <gtest/gtest.h>

#include "format/endian.h"
#include "format/test_util.h"

namespace qcow2kit::format {
namespace {

using testutil::FailsWith;
using testutil::QemuImgCreate;
using testutil::ReadCluster0;
using testutil::ReadFile;
using testutil::RunCommand;
using testutil::TempDir;

struct Image {
  std::string path;
  std::vector<uint8_t> cluster0;
  uint64_t file_size = 0;
};

// Reads cluster 0 of an image the way an opener would: 24 bytes first, then the cluster.
Image Load(const std::string& path) {
  Image img{path, {}, testutil::FileSize(path)};
  Result<uint64_t> cluster_size = HeaderReadSize(ReadFile(path, 0, 24));
  EXPECT_TRUE(cluster_size.ok()) << cluster_size.status().message();
  if (cluster_size.ok()) img.cluster0 = ReadCluster0(path, *cluster_size);
  return img;
}

ParsedHeader MustParse(const Image& img) {
  Result<ParsedHeader> r = ParseHeader(img.cluster0, img.file_size);
  EXPECT_TRUE(r.ok()) << img.path << ": " << r.status().message();
  return r.ok() ? *r : ParsedHeader{};
}

class QemuHeaderTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(dir_.ok()); }

  Image Create(const std::string& size, const std::string& options = "") {
    const std::string path = dir_.File("t" + std::to_string(count_++) + ".qcow2");
    EXPECT_TRUE(QemuImgCreate(path, size, options)) << "qemu-img create " << options;
    return Load(path);
  }

  TempDir dir_;
  int count_ = 0;
};

TEST_F(QemuHeaderTest, DefaultV3Image) {
  Image img = Create("64M");
  ParsedHeader p = MustParse(img);
  const Header& h = p.header;
  EXPECT_EQ(h.version, 3u);
  EXPECT_EQ(h.cluster_bits, 16u);
  EXPECT_EQ(h.size, 64ull << 20);
  EXPECT_EQ(h.crypt_method, 0u);
  EXPECT_EQ(h.l1_size, 1u);
  EXPECT_EQ(h.l1_table_offset, 0x30000u);
  EXPECT_EQ(h.refcount_table_offset, 0x10000u);
  EXPECT_EQ(h.refcount_table_clusters, 1u);
  EXPECT_EQ(h.nb_snapshots, 0u);
  EXPECT_EQ(h.incompatible_features, 0u);
  EXPECT_EQ(h.refcount_order, 4u);
  EXPECT_EQ(h.refcount_bits(), 16u);
  EXPECT_EQ(h.header_length, 112u);
  EXPECT_EQ(h.compression_type, CompressionType::kZlib);
  EXPECT_TRUE(h.unknown_header_fields.empty());
  EXPECT_EQ(img.file_size, 0x30008u);  // the L1 cluster is not padded
  // The 8-entry feature table (384 bytes) right after the 112-byte header.
  ASSERT_EQ(p.extensions.size(), 1u);
  EXPECT_EQ(p.extensions[0].type, kExtFeatureTable);
  EXPECT_EQ(p.extensions[0].offset, 112u);
  EXPECT_EQ(p.extensions[0].data.size(), 384u);
  EXPECT_EQ(p.feature_names, StandardFeatureNames());
  EXPECT_FALSE(p.backing_file || p.backing_format || p.data_file || p.bitmaps || p.crypto);
  EXPECT_TRUE(p.unknown_extensions.empty());
}

TEST_F(QemuHeaderTest, EmptyImageHasNoL1Entries) {
  Image img = Create("0");
  ParsedHeader p = MustParse(img);
  EXPECT_EQ(p.header.size, 0u);
  EXPECT_EQ(p.header.l1_size, 0u);
  EXPECT_EQ(p.header.l1_table_offset, 0u);  // qemu-img allocates no L1 table at all
  EXPECT_EQ(img.file_size, 0x30000u);
}

TEST_F(QemuHeaderTest, V2Image) {
  ParsedHeader p = MustParse(Create("64M", "compat=0.10"));
  EXPECT_EQ(p.header.version, 2u);
  EXPECT_EQ(p.header.header_length, 72u);
  EXPECT_EQ(p.header.refcount_order, 4u);
  EXPECT_TRUE(p.extensions.empty());  // QEMU writes no feature table in v2
  EXPECT_TRUE(p.feature_names.empty());
}

TEST_F(QemuHeaderTest, SmallClustersHaveNoFeatureTable) {
  for (const char* cs : {"512", "4k"}) {
    ParsedHeader p = MustParse(Create("1G", std::string("cluster_size=") + cs));
    EXPECT_TRUE(p.extensions.empty()) << cs;
    EXPECT_EQ(p.header.cluster_size(), std::stoull(cs) * (cs[1] == 'k' ? 1024 : 1));
  }
}

TEST_F(QemuHeaderTest, BackingFileAndFormat) {
  ASSERT_TRUE(QemuImgCreate(dir_.File("base.qcow2"), "64M"));
  ParsedHeader p = MustParse(Create("", "backing_file=base.qcow2,backing_fmt=qcow2"));
  ASSERT_TRUE(p.backing_file.has_value());
  EXPECT_EQ(*p.backing_file, "base.qcow2");
  EXPECT_EQ(p.backing_format, "qcow2");
  EXPECT_EQ(p.header.backing_file_size, 10u);
  // Backing format ext, feature table, end marker (8 bytes), then the name.
  ASSERT_EQ(p.extensions.size(), 2u);
  EXPECT_EQ(p.extensions[0].type, kExtBackingFormat);
  EXPECT_EQ(p.extensions[0].offset, 112u);
  EXPECT_EQ(p.extensions[1].type, kExtFeatureTable);
  EXPECT_EQ(p.extensions[1].offset, 128u);
  EXPECT_EQ(p.header.backing_file_offset, 128u + 8 + 384 + 8);
}

TEST_F(QemuHeaderTest, ExternalDataFile) {
  const std::string data = dir_.File("data.raw");
  ParsedHeader p = MustParse(Create("1M", "data_file=" + data + ",data_file_raw=on"));
  EXPECT_TRUE(p.header.has_data_file());
  EXPECT_TRUE(p.header.data_file_raw());
  EXPECT_EQ(p.data_file, data);
  ASSERT_FALSE(p.extensions.empty());
  EXPECT_EQ(p.extensions[0].type, kExtDataFile);
}

TEST_F(QemuHeaderTest, ZstdExtendedL2Refcount1Lazy) {
  ParsedHeader p = MustParse(
      Create("1M", "compression_type=zstd,extended_l2=on,refcount_bits=1,lazy_refcounts=on"));
  EXPECT_EQ(p.header.compression_type, CompressionType::kZstd);
  EXPECT_EQ(p.header.incompatible_features, kIncompatCompression | kIncompatExtendedL2);
  EXPECT_TRUE(p.header.extended_l2());
  EXPECT_TRUE(p.header.lazy_refcounts());
  EXPECT_EQ(p.header.refcount_order, 0u);
}

TEST_F(QemuHeaderTest, BitmapsExtension) {
  Image img = Create("64M");
  ASSERT_TRUE(RunCommand("qemu-img bitmap --add -g 65536 '" + img.path + "' bm0"));
  ParsedHeader p = MustParse(Load(img.path));
  EXPECT_TRUE(p.header.autoclear_features & kAutoclearBitmaps);
  ASSERT_TRUE(p.bitmaps.has_value());
  EXPECT_EQ(p.bitmaps->nb_bitmaps, 1u);
  EXPECT_EQ(p.bitmaps->directory_offset % 65536, 0u);
  EXPECT_GT(p.bitmaps->directory_size, 24u);
  EXPECT_FALSE(p.bitmaps_inconsistent);
  ASSERT_EQ(p.extensions.size(), 2u);
  EXPECT_EQ(p.extensions[1].type, kExtBitmaps);
}

TEST_F(QemuHeaderTest, SnapshotTablePointer) {
  Image img = Create("64M");
  ASSERT_TRUE(RunCommand("qemu-img snapshot -c snap1 '" + img.path + "'"));
  ParsedHeader p = MustParse(Load(img.path));
  EXPECT_EQ(p.header.nb_snapshots, 1u);
  EXPECT_NE(p.header.snapshots_offset, 0u);
  EXPECT_EQ(p.header.snapshots_offset % 65536, 0u);
}

// EncodeHeader(ParseHeader(qemu's cluster 0)) reproduces qemu's cluster 0 byte for byte, and
// parsing that gives the same ParsedHeader.
TEST_F(QemuHeaderTest, EncodeReproducesQemuClusterZero) {
  ASSERT_TRUE(QemuImgCreate(dir_.File("base.qcow2"), "64M"));
  const std::vector<std::string> options = {
      "",
      "compat=0.10",
      "cluster_size=512",
      "cluster_size=4k",
      "cluster_size=2M",
      "cluster_size=8k,backing_file=base.qcow2,backing_fmt=qcow2",
      "compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2",
      "data_file=" + dir_.File("data.raw") + ",data_file_raw=on",
      "data_file=" + dir_.File("data2.raw") + ",backing_file=base.qcow2,backing_fmt=qcow2",
      "compression_type=zstd,extended_l2=on,refcount_bits=64,lazy_refcounts=on",
  };
  for (const std::string& opt : options) {
    SCOPED_TRACE(opt);
    const bool backed = opt.find("backing") != std::string::npos;
    Image img = Create(backed ? "" : "1G", opt);
    ParsedHeader p = MustParse(img);
    Result<std::vector<uint8_t>> encoded = EncodeHeader(p);
    ASSERT_TRUE(encoded.ok()) << encoded.status().message();
    ASSERT_EQ(encoded->size(), p.header.cluster_size());
    EXPECT_TRUE(std::equal(img.cluster0.begin(), img.cluster0.end(), encoded->begin()));
    Result<ParsedHeader> again = ParseHeader(*encoded, img.file_size);
    ASSERT_TRUE(again.ok()) << again.status().message();
    EXPECT_EQ(*again, p);
  }
}

TEST_F(QemuHeaderTest, EncodeReproducesBitmapsAndSnapshots) {
  Image img = Create("64M");
  ASSERT_TRUE(RunCommand("qemu-img bitmap --add '" + img.path + "' b1"));
  ASSERT_TRUE(RunCommand("qemu-img snapshot -c s1 '" + img.path + "'"));
  img = Load(img.path);
  ParsedHeader p = MustParse(img);
  Result<std::vector<uint8_t>> encoded = EncodeHeader(p);
  ASSERT_TRUE(encoded.ok()) << encoded.status().message();
  EXPECT_TRUE(std::equal(img.cluster0.begin(), img.cluster0.end(), encoded->begin()));
}

// A header with everything we preserve but QEMU would never write reaches a fixed point after
// one encode: Parse(Encode(y)) == y.
TEST_F(QemuHeaderTest, RoundTripOfPreservedUnknowns) {
  ParsedHeader x = MustParse(Create("64M"));
  x.header.unknown_header_fields = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  x.header.autoclear_features = kAutoclearBitmaps | (1ull << 7);
  x.header.compatible_features = 1ull << 9;
  x.unknown_extensions = {{0x12345678, 0, {'a', 'b', 'c', 'd', 'e'}}, {0x0badf00d, 0, {}}};
  x.bitmaps = BitmapsExtension{2, 48, 0x20000};
  x.backing_file = "base image.qcow2";
  x.backing_format = "raw";
  Result<std::vector<uint8_t>> first = EncodeHeader(x);
  ASSERT_TRUE(first.ok()) << first.status().message();
  Result<ParsedHeader> y = ParseHeader(*first, 0x30008);
  ASSERT_TRUE(y.ok()) << y.status().message();
  EXPECT_EQ(y->header.header_length, 128u);
  EXPECT_EQ(y->header.unknown_header_fields, x.header.unknown_header_fields);
  EXPECT_EQ(y->header.autoclear_features, x.header.autoclear_features);
  EXPECT_EQ(y->bitmaps, x.bitmaps);
  EXPECT_EQ(y->backing_file, x.backing_file);
  EXPECT_EQ(y->backing_format, x.backing_format);
  ASSERT_EQ(y->unknown_extensions.size(), 2u);
  EXPECT_EQ(y->unknown_extensions[0].type, 0x12345678u);
  EXPECT_EQ(y->unknown_extensions[0].data, x.unknown_extensions[0].data);
  EXPECT_EQ(y->unknown_extensions[1].type, 0x0badf00du);
  // QEMU's order: backing format, feature table, bitmaps, unknown extensions.
  std::vector<uint32_t> types;
  for (const RawExtension& e : y->extensions) types.push_back(e.type);
  EXPECT_EQ(types, (std::vector<uint32_t>{kExtBackingFormat, kExtFeatureTable, kExtBitmaps,
                                          0x12345678, 0x0badf00d}));
  Result<std::vector<uint8_t>> second = EncodeHeader(*y);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(*second, *first);
  Result<ParsedHeader> z = ParseHeader(*second, 0x30008);
  ASSERT_TRUE(z.ok());
  EXPECT_EQ(*z, *y);
}

TEST_F(QemuHeaderTest, EncodeWritesCryptoExtensionBeforeFeatureTable) {
  ParsedHeader x = MustParse(Create("64M"));
  x.header.crypt_method = 2;
  x.crypto = CryptoExtension{0x40000, 0x2000};
  Result<std::vector<uint8_t>> bytes = EncodeHeader(x);
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(LoadBE32(&(*bytes)[112]), kExtCrypto);
  EXPECT_EQ(LoadBE32(&(*bytes)[116]), 16u);
  EXPECT_EQ(LoadBE64(&(*bytes)[120]), 0x40000u);
  EXPECT_EQ(LoadBE64(&(*bytes)[128]), 0x2000u);
  EXPECT_EQ(LoadBE32(&(*bytes)[136]), kExtFeatureTable);
  // The result parses up to the point where encryption is refused.
  EXPECT_TRUE(FailsWith(ParseHeader(*bytes, 0x30008).status(), ENOTSUP,
                        "encrypted images are not supported"));
}

TEST_F(QemuHeaderTest, EncodeRefusesWhatDoesNotFit) {
  ParsedHeader x = MustParse(Create("64M", "cluster_size=512"));
  x.backing_file = std::string(300, 'b');  // 112 + 8 (end marker) + 300 bytes
  EXPECT_TRUE(EncodeHeader(x).ok());
  x.unknown_extensions = {{0x11111111, 0, std::vector<uint8_t>(100)}};  // + 8 + 104
  EXPECT_TRUE(FailsWith(EncodeHeader(x).status(), EINVAL,
                        "does not fit in one cluster (532 bytes needed, cluster size 512)"));
}

TEST_F(QemuHeaderTest, EncodeRefusesInconsistentHeaders) {
  ParsedHeader v2 = MustParse(Create("64M", "compat=0.10"));
  v2.header.compatible_features = kCompatLazyRefcounts;
  EXPECT_TRUE(FailsWith(EncodeHeader(v2).status(), EINVAL, "version 2"));

  ParsedHeader x = MustParse(Create("64M"));
  x.header.compression_type = CompressionType::kZstd;
  EXPECT_TRUE(FailsWith(EncodeHeader(x).status(), EINVAL, "compression type"));
  x.header.incompatible_features |= kIncompatCompression;
  EXPECT_TRUE(EncodeHeader(x).ok());

  x.data_file = "data.raw";
  EXPECT_TRUE(FailsWith(EncodeHeader(x).status(), EINVAL, "data file"));
  x.data_file.reset();
  x.backing_file = std::string(1024, 'n');
  EXPECT_TRUE(FailsWith(EncodeHeader(x).status(), EINVAL, "backing file name"));
}

TEST(HeaderReadSizeTest, ReadsClusterSizeFromFirstBytes) {
  uint8_t b[24] = {0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3};
  StoreBE32(b + 20, 21);
  Result<uint64_t> r = HeaderReadSize(b);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 2u << 20);
  EXPECT_TRUE(FailsWith(HeaderReadSize(std::span(b, 23)).status(), EINVAL, "not in qcow2"));
  StoreBE32(b + 20, 22);
  EXPECT_TRUE(FailsWith(HeaderReadSize(b).status(), ENOTSUP, "Unsupported cluster size: 2^22"));
  StoreBE32(b + 20, 16);
  StoreBE32(b + 4, 1);
  EXPECT_TRUE(FailsWith(HeaderReadSize(b).status(), ENOTSUP, "Unsupported qcow2 version 1"));
  StoreBE32(b, 0x514649fa);
  EXPECT_TRUE(FailsWith(HeaderReadSize(b).status(), EINVAL, "not in qcow2 format"));
}

TEST(DescribeFeaturesTest, NamesFromTableThenUnknownMask) {
  const std::vector<FeatureName>& std_names = StandardFeatureNames();
  EXPECT_EQ(DescribeFeatures(0x20, 0, std_names), "Unknown incompatible feature: 20");
  EXPECT_EQ(DescribeFeatures(0x13, 0, std_names), "dirty bit, corrupt bit, extended L2 entries");
  EXPECT_EQ(DescribeFeatures(0x60 | 0x4, 0, std_names),
            "external data file, Unknown incompatible feature: 60");
  EXPECT_EQ(DescribeFeatures(0x1, 1, std_names), "lazy refcounts");
  EXPECT_EQ(DescribeFeatures(0x3, 2, std_names), "bitmaps, raw external data");
  EXPECT_EQ(DescribeFeatures(0x80, 2, std_names), "Unknown autoclear feature: 80");
  // Listed in table order; the table ends at the first unnamed entry.
  std::vector<FeatureName> table = {{0, 7, "seven"}, {0, 5, "five"}, {0, 6, ""}, {0, 8, "x"}};
  EXPECT_EQ(DescribeFeatures(0x1a0, 0, table), "seven, five, Unknown incompatible feature: 100");
  EXPECT_EQ(DescribeFeatures(0, 0, table), "");
}

TEST(CompressionTypeNameTest, Names) {
  EXPECT_STREQ(CompressionTypeName(CompressionType::kZlib), "zlib");
  EXPECT_STREQ(CompressionTypeName(CompressionType::kZstd), "zstd");
}

}  // namespace
}  // namespace qcow2kit::format
