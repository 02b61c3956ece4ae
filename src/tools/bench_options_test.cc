#include "tools/bench_options.h"

#include "gtest/gtest.h"
#include "tools/bench.h"

namespace qcow2kit::tools {
namespace {

using Field = std::optional<std::string> BenchArgs::*;

BenchArgs Args(std::initializer_list<std::pair<Field, const char*>> fields, bool write = false) {
  BenchArgs a;
  for (const auto& [field, value] : fields) a.*field = value;
  a.write = write;
  return a;
}

std::string Error(const BenchArgs& a) {
  auto r = ParseBenchArgs(a);
  return r.ok() ? "" : r.status().message();
}

TEST(BenchOptionsTest, DefaultsAreQemuImgs) {
  auto o = ParseBenchArgs({});
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->count, 75000u);
  EXPECT_EQ(o->depth, 64u);
  EXPECT_EQ(o->buffer_size, 4096u);
  EXPECT_EQ(o->step, 4096u);
  EXPECT_EQ(o->offset, 0u);
  EXPECT_FALSE(o->write);
  EXPECT_EQ(BenchSummaryLine(*o),
            "Sending 75000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, "
            "step size 4096)");
}

TEST(BenchOptionsTest, ParsesLikeQemuImg) {
  BenchArgs a;
  a.count = "0x10";
  a.depth = "010";
  a.buffer_size = "1.5k";
  a.step_size = "0";  // 0 means "the buffer size"
  a.offset = "1M";
  a.pattern = "0xab";
  a.cache = "off";
  a.aio = "threads";
  auto o = ParseBenchArgs(a);
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->count, 16u);
  EXPECT_EQ(o->depth, 8u);
  EXPECT_EQ(o->buffer_size, 1536u);
  EXPECT_EQ(o->step, 1536u);
  EXPECT_EQ(o->offset, 1u << 20);
  EXPECT_EQ(o->pattern, 0xab);
  EXPECT_EQ(o->cache, CacheMode::kNone);
  EXPECT_EQ(o->engine, EngineKind::kSync);
}

TEST(BenchOptionsTest, RejectsWithQemuImgMessages) {
  const std::string suffixes =
      " specified. You may use k, M, G, T, P or E suffixes for\n"
      "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";
  const std::string range = " specified. Must be between 0 and 2147483647.";
  EXPECT_EQ(Error(Args({{&BenchArgs::count, "-1"}})), "Invalid request count specified");
  EXPECT_EQ(Error(Args({{&BenchArgs::count, "abc"}})), "Invalid request count specified");
  EXPECT_EQ(Error(Args({{&BenchArgs::count, "2147483648"}})), "Invalid request count specified");
  EXPECT_EQ(Error(Args({{&BenchArgs::depth, "-1"}})), "Invalid queue depth specified");
  // qemu-img 7.2 accepts a depth of 0 and then waits forever.
  EXPECT_EQ(Error(Args({{&BenchArgs::depth, "0"}})), "Invalid queue depth specified");
  EXPECT_EQ(Error(Args({{&BenchArgs::offset, "-1"}})), "Invalid offset" + suffixes);
  EXPECT_EQ(Error(Args({{&BenchArgs::buffer_size, "abc"}})), "Invalid buffer size" + suffixes);
  EXPECT_EQ(Error(Args({{&BenchArgs::buffer_size, "2G"}})), "Invalid buffer size" + range);
  EXPECT_EQ(Error(Args({{&BenchArgs::step_size, "-1"}})), "Invalid step_size" + suffixes);
  EXPECT_EQ(Error(Args({{&BenchArgs::step_size, "5G"}})), "Invalid step_size" + range);
  EXPECT_EQ(Error(Args({{&BenchArgs::pattern, "300"}})), "Invalid pattern byte specified");
  EXPECT_EQ(Error(Args({{&BenchArgs::flush_interval, "abc"}}, true)),
            "Invalid flush interval specified");
  EXPECT_EQ(Error(Args({{&BenchArgs::flush_interval, "5"}})),
            "--flush-interval is only available in write tests");
  EXPECT_EQ(Error(Args({{&BenchArgs::flush_interval, "5"}}, true)),
            "Flush interval can't be smaller than depth");
  EXPECT_EQ(Error(Args({{&BenchArgs::cache, "foo"}})), "Invalid cache mode");
  EXPECT_EQ(Error(Args({{&BenchArgs::aio, "foo"}})), "Invalid aio option: foo");
  EXPECT_EQ(Error(Args({{&BenchArgs::depth, "8"}, {&BenchArgs::flush_interval, "8"}}, true)), "");
}

TEST(BenchOptionsTest, OffsetsWrapInsideTheImage) {
  BenchOptions o;
  o.buffer_size = 4096;
  o.step = 4096;
  o.offset = 8192;
  BenchOffsets seq(o, 16384);
  EXPECT_EQ(seq.Next(), 8192u);
  EXPECT_EQ(seq.Next(), 12288u);
  EXPECT_EQ(seq.Next(), 0u);
  EXPECT_EQ(seq.Next(), 4096u);
  // A request that would cross the end starts over at 0 (qemu-img fails with EIO).
  o.offset = 14000;
  BenchOffsets cross(o, 16384);
  EXPECT_EQ(cross.Next(), 0u);
  // A start offset beyond the image is taken modulo its size.
  o.offset = 16384 + 4096;
  BenchOffsets beyond(o, 16384);
  EXPECT_EQ(beyond.Next(), 4096u);
}

TEST(BenchOptionsTest, RandomOffsetsAreAlignedInsideAndRepeatable) {
  BenchOptions o;
  o.buffer_size = 4096;
  o.random = true;
  BenchOffsets a(o, 1 << 20), b(o, 1 << 20);
  bool moved = false;
  for (int i = 0; i < 1000; ++i) {
    uint64_t x = a.Next();
    EXPECT_EQ(x % 4096, 0u);
    EXPECT_LE(x + 4096, 1u << 20);
    EXPECT_EQ(x, b.Next());
    moved |= x != 0;
  }
  EXPECT_TRUE(moved);
}

}  // namespace
}  // namespace qcow2kit::tools
