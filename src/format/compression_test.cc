// DecompressCluster: raw deflate (made with zlib as QEMU does) and zstd round trips with
// trailing bytes, corrupt and mis-sized streams, and clusters compressed by qemu-img.

#include "format/compression.h"

#include <gtest/gtest.h>
#include <zlib.h>
#include <zstd.h>

#include <string>
#include <vector>

#include "format/endian.h"
#include "format/entries.h"
#include "format/test_util.h"

namespace qcow2kit::format {
namespace {

using testutil::FailsWith;

constexpr size_t kCluster = 65536;

// Compressible but not trivial: numbered text lines with a pseudo-random word.
std::vector<uint8_t> Data(size_t size, uint32_t seed) {
  std::string s;
  uint32_t x = seed * 2654435761u + 1;
  for (int line = 0; s.size() < size; ++line) {
    x = x * 1103515245u + 12345u;
    s += "line " + std::to_string(line) + " of block " + std::to_string(seed) + ": " +
         std::to_string(x >> 8) + "\n";
  }
  return std::vector<uint8_t>(s.begin(), s.begin() + size);
}

// Raw deflate with a 4 KiB window and memLevel 9, exactly as QEMU compresses.
std::vector<uint8_t> RawDeflate(const std::vector<uint8_t>& in, int window_bits = -12) {
  z_stream z{};
  EXPECT_EQ(deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, window_bits, 9, Z_DEFAULT_STRATEGY),
            Z_OK);
  std::vector<uint8_t> out(deflateBound(&z, in.size()));
  z.next_in = const_cast<uint8_t*>(in.data());
  z.avail_in = static_cast<uInt>(in.size());
  z.next_out = out.data();
  z.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&z, Z_FINISH), Z_STREAM_END);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

std::vector<uint8_t> Zstd(const std::vector<uint8_t>& in, bool checksum = false) {
  ZSTD_CCtx* c = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, checksum ? 1 : 0);
  std::vector<uint8_t> out(ZSTD_compressBound(in.size()));
  const size_t n = ZSTD_compress2(c, out.data(), out.size(), in.data(), in.size());
  ZSTD_freeCCtx(c);
  EXPECT_FALSE(ZSTD_isError(n));
  out.resize(n);
  return out;
}

std::vector<uint8_t> Cat(std::vector<uint8_t> a, const std::vector<uint8_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

Status Decompress(CompressionType t, const std::vector<uint8_t>& in, std::vector<uint8_t>* out,
                  size_t size = kCluster) {
  out->assign(size, 0xcc);
  return DecompressCluster(t, in, *out);
}

TEST(DeflateTest, RoundTripWithTrailingBytes) {
  const std::vector<uint8_t> data = Data(kCluster, 1);
  const std::vector<uint8_t> stream = RawDeflate(data);
  ASSERT_LT(stream.size(), kCluster / 2);
  std::vector<uint8_t> out;
  ASSERT_TRUE(Decompress(CompressionType::kZlib, stream, &out).ok());
  EXPECT_EQ(out, data);
  // The read bound may cover garbage or the start of the next cluster's stream.
  ASSERT_TRUE(Decompress(CompressionType::kZlib, Cat(stream, Data(511, 9)), &out).ok());
  EXPECT_EQ(out, data);
  ASSERT_TRUE(
      Decompress(CompressionType::kZlib, Cat(stream, RawDeflate(Data(kCluster, 2))), &out).ok());
  EXPECT_EQ(out, data);
  // Streams with a full 32 KiB window are raw deflate too.
  ASSERT_TRUE(Decompress(CompressionType::kZlib, RawDeflate(data, -15), &out).ok());
  EXPECT_EQ(out, data);
}

TEST(DeflateTest, WrongSizeAndCorruptStreams) {
  const std::vector<uint8_t> data = Data(kCluster, 3);
  const std::vector<uint8_t> stream = RawDeflate(data);
  std::vector<uint8_t> out;
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZlib, stream, &out, kCluster + 1), EUCLEAN,
                        "compressed cluster data is corrupt (deflate stream ends after 65536 of "
                        "65537 bytes)"));
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZlib, stream, &out, kCluster - 1), EUCLEAN,
                        "produces more than 65535 bytes"));
  const std::vector<uint8_t> cut(stream.begin(), stream.begin() + stream.size() / 2);
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZlib, cut, &out), EUCLEAN,
                        "invalid or truncated deflate stream"));
  // BFINAL=1 with the reserved block type 3.
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZlib, {0x07, 0, 0, 0}, &out), EUCLEAN,
                        "compressed cluster data is corrupt"));
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZlib, {}, &out), EUCLEAN, "corrupt"));
}

TEST(ZstdTest, RoundTripWithTrailingBytes) {
  const std::vector<uint8_t> data = Data(kCluster, 4);
  const std::vector<uint8_t> frame = Zstd(data);
  std::vector<uint8_t> out;
  ASSERT_TRUE(Decompress(CompressionType::kZstd, frame, &out).ok());
  EXPECT_EQ(out, data);
  ASSERT_TRUE(Decompress(CompressionType::kZstd, Cat(frame, Data(300, 5)), &out).ok());
  EXPECT_EQ(out, data);
  ASSERT_TRUE(Decompress(CompressionType::kZstd, Zstd(data, /*checksum=*/true), &out).ok());
  EXPECT_EQ(out, data);
}

TEST(ZstdTest, SeveralFramesMakeOneCluster) {
  const std::vector<uint8_t> data = Data(kCluster, 6);
  const std::vector<uint8_t> a(data.begin(), data.begin() + 1000);
  const std::vector<uint8_t> b(data.begin() + 1000, data.end());
  std::vector<uint8_t> out;
  ASSERT_TRUE(Decompress(CompressionType::kZstd, Cat(Zstd(a), Zstd(b, true)), &out).ok());
  EXPECT_EQ(out, data);
}

TEST(ZstdTest, WrongSizeAndCorruptStreams) {
  const std::vector<uint8_t> data = Data(kCluster, 7);
  const std::vector<uint8_t> frame = Zstd(data);
  std::vector<uint8_t> out;
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZstd, frame, &out, kCluster + 1), EUCLEAN,
                        "zstd stream ends after 65536 of 65537 bytes"));
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZstd, frame, &out, kCluster - 1), EUCLEAN,
                        "zstd stream produces more than 65535 bytes"));
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZstd, Zstd(data, true), &out, kCluster - 1),
                        EUCLEAN, "produces more than"));
  const std::vector<uint8_t> cut(frame.begin(), frame.begin() + frame.size() / 2);
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZstd, cut, &out), EUCLEAN, "ends after"));
  // After a short first frame, garbage where the next frame should start.
  const std::vector<uint8_t> half(data.begin(), data.begin() + kCluster / 2);
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZstd, Cat(Zstd(half), Data(64, 8)), &out),
                        EUCLEAN, "compressed cluster data is corrupt (zstd: "));
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZstd, Data(100, 1), &out), EUCLEAN, "zstd"));
  EXPECT_TRUE(FailsWith(Decompress(CompressionType::kZstd, {}, &out), EUCLEAN, "ends after 0"));
}

TEST(DecompressClusterTest, UnknownType) {
  std::vector<uint8_t> out;
  EXPECT_TRUE(FailsWith(Decompress(static_cast<CompressionType>(2), {1, 2, 3}, &out), ENOTSUP,
                        "Unknown compression type: 2"));
}

// `qemu-img convert -c` of four different clusters, read back through the L2 entries.
void CheckQemuCompressedImage(const std::string& compression_type) {
  testutil::TempDir dir;
  ASSERT_TRUE(dir.ok());
  std::vector<uint8_t> raw;
  for (uint32_t i = 0; i < 4; ++i) raw = Cat(raw, Data(kCluster, 100 + i));
  testutil::WriteFile(dir.File("src.raw"), raw);
  const std::string img = dir.File("c.qcow2");
  ASSERT_TRUE(testutil::RunCommand(
      "qemu-img convert -c -f raw -O qcow2 -o compression_type=" + compression_type + " '" +
      dir.File("src.raw") + "' '" + img + "'"));
  const uint64_t file_size = testutil::FileSize(img);
  auto u64_at = [&](uint64_t off) { return LoadBE64(testutil::ReadFile(img, off, 8).data()); };
  const uint64_t l2 = L1EntryOffset(u64_at(u64_at(40)));
  const CompressionType type =
      compression_type == "zstd" ? CompressionType::kZstd : CompressionType::kZlib;
  for (uint64_t i = 0; i < 4; ++i) {
    SCOPED_TRACE(i);
    const uint64_t entry = u64_at(l2 + i * 8);
    ASSERT_EQ(ClassifyCluster(entry, Geometry{16, false, false}), ClusterType::kCompressed);
    const CompressedDescriptor d = DecodeCompressed(entry, 16);
    // The bound can reach past the end of the file for the last stream.
    const uint64_t length = std::min(d.read_bound(), file_size - d.host_offset);
    std::vector<uint8_t> out(kCluster);
    ASSERT_TRUE(DecompressCluster(type, testutil::ReadFile(img, d.host_offset, length), out).ok());
    EXPECT_TRUE(std::equal(out.begin(), out.end(), raw.begin() + i * kCluster));
  }
}

TEST(QemuCompressedTest, Zlib) {
  CheckQemuCompressedImage("zlib");
}
TEST(QemuCompressedTest, Zstd) {
  CheckQemuCompressedImage("zstd");
}

// CompressCluster: QEMU's exact deflate stream (same parameters), zstd that decodes back, and
// 0 ("store it plain") for data that does not shrink below the room given.
TEST(CompressClusterTest, ZlibIsQemusStream) {
  const auto in = Data(kCluster, 7);
  std::vector<uint8_t> out(kCluster - 1);
  auto n = CompressCluster(CompressionType::kZlib, in, out);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  ASSERT_GT(*n, 0u);
  out.resize(*n);
  EXPECT_EQ(out, RawDeflate(in));
  // Twice on one thread: the reused stream starts afresh.
  std::vector<uint8_t> again(kCluster - 1);
  n = CompressCluster(CompressionType::kZlib, in, again);
  ASSERT_TRUE(n.ok());
  again.resize(*n);
  EXPECT_EQ(again, out);
}

TEST(CompressClusterTest, ZstdRoundTrip) {
  const auto in = Data(kCluster, 8);
  std::vector<uint8_t> out(kCluster - 1);
  auto n = CompressCluster(CompressionType::kZstd, in, out);
  ASSERT_TRUE(n.ok());
  ASSERT_GT(*n, 0u);
  ASSERT_LT(*n, kCluster / 2);
  std::vector<uint8_t> back(kCluster);
  ASSERT_TRUE(DecompressCluster(CompressionType::kZstd, std::span(out).first(*n), back).ok());
  EXPECT_EQ(back, in);
}

TEST(CompressClusterTest, IncompressibleDataIsStoredPlain) {
  std::vector<uint8_t> in(kCluster);
  uint64_t x = 88172645463325252ull;
  for (auto& b : in) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    b = static_cast<uint8_t>(x);
  }
  std::vector<uint8_t> out(kCluster - 1);
  for (auto type : {CompressionType::kZlib, CompressionType::kZstd}) {
    auto n = CompressCluster(type, in, out);
    ASSERT_TRUE(n.ok());
    EXPECT_EQ(*n, 0u);
  }
}

}  // namespace
}  // namespace qcow2kit::format
