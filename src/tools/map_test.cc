#include "tools/map.h"

#include <vector>

#include "gtest/gtest.h"
#include "qcow2kit/reactor.h"

namespace qcow2kit::tools {
namespace {

// A layer whose mapping is a fixed list of extents, answered a few at a time.
class FakeLayer : public FormatDriver {
 public:
  FakeLayer(uint64_t size, std::vector<Extent> extents)
      : size_(size), extents_(std::move(extents)) {}
  const char* format_name() const override { return "fake"; }
  uint64_t size() const override { return size_; }
  File* file(uint8_t) const override { return nullptr; }
  Task<Status> Fetch(uint64_t offset, uint64_t length, std::vector<Extent>* out) override {
    const uint64_t end = offset + length;
    for (const Extent& e : extents_) {
      if (e.end() <= offset || e.guest_offset >= end) continue;
      Extent part = e;
      if (part.guest_offset < offset) {
        const uint64_t skip = offset - part.guest_offset;
        part.guest_offset = offset;
        part.length -= skip;
        if (part.has_host()) part.host_offset += skip;
      }
      out->push_back(part);
    }
    co_return Status::Ok();
  }

 private:
  uint64_t size_;
  std::vector<Extent> extents_;
};

Extent Data(uint64_t guest, uint64_t len, uint64_t host) {
  Extent e;
  e.guest_offset = guest;
  e.length = len;
  e.kind = ExtentKind::kData;
  e.host_offset = host;
  return e;
}

Extent Unallocated(uint64_t guest, uint64_t len) {
  Extent e;
  e.guest_offset = guest;
  e.length = len;
  return e;
}

MapEntry DataEntry(uint64_t start, uint64_t length, uint64_t offset, const std::string& file) {
  MapEntry e;
  e.start = start;
  e.length = length;
  e.present = e.data = e.has_offset = true;
  e.offset = offset;
  e.filename = file;
  return e;
}

std::vector<MapEntry> Walk(BlockDevice& dev, uint64_t start, uint64_t length, uint64_t window) {
  auto reactor = Reactor::Create(EngineKind::kSync);
  EXPECT_TRUE(reactor.ok());
  std::vector<MapEntry> got;
  bool saw_last = false;
  Status s =
      (*reactor)->BlockOn(WalkMap(dev, start, length, window, [&](const MapEntry& e, bool last) {
        EXPECT_FALSE(saw_last);
        saw_last = last;
        got.push_back(e);
        return Status::Ok();
      }));
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(saw_last);
  return got;
}

TEST(MapTest, MergesRunsAcrossWindows) {
  // Contiguous data split over several extents and windows comes out as one run.
  BlockDevice dev(std::make_unique<FakeLayer>(
      1 << 20, std::vector<Extent>{Data(0, 4096, 0x10000), Data(4096, 8192, 0x11000),
                                   Data(12288, 4096, 0x50000), Unallocated(16384, 1032192)}));
  auto got = Walk(dev, 0, UINT64_MAX, 1024);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got[0].start, 0u);
  EXPECT_EQ(got[0].length, 12288u);
  EXPECT_EQ(got[0].offset, 0x10000u);
  EXPECT_TRUE(got[0].data && got[0].present && got[0].has_offset);
  EXPECT_EQ(got[1].start, 12288u);
  EXPECT_EQ(got[1].offset, 0x50000u);
  EXPECT_EQ(got[2].start, 16384u);
  EXPECT_EQ(got[2].length, 1032192u);
  EXPECT_TRUE(got[2].zero && !got[2].present && !got[2].has_offset);
  // The same with one window for everything.
  EXPECT_EQ(Walk(dev, 0, UINT64_MAX, 1 << 30), got);
}

TEST(MapTest, RangeIsClippedAndEmptyRangeGivesOneEmptyEntry) {
  BlockDevice dev(std::make_unique<FakeLayer>(65536, std::vector<Extent>{Data(0, 65536, 0)}));
  auto got = Walk(dev, 1000, 100, 7);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].start, 1000u);
  EXPECT_EQ(got[0].length, 100u);
  EXPECT_EQ(got[0].offset, 1000u);
  got = Walk(dev, 70000, 100, 4096);
  ASSERT_EQ(got.size(), 1u);
  MapEntry empty;
  empty.start = 70000;
  EXPECT_EQ(got[0], empty);
}

TEST(MapTest, MergeableFollowsQemuImg) {
  MapEntry a = DataEntry(0, 4096, 8192, "a");
  MapEntry b = a;
  b.start = 4096;
  b.offset = 12288;
  EXPECT_TRUE(MapEntriesMergeable(a, b));
  b.offset = 16384;  // not contiguous on the host
  EXPECT_FALSE(MapEntriesMergeable(a, b));
  b.offset = 12288;
  b.filename = "b";  // another file
  EXPECT_FALSE(MapEntriesMergeable(a, b));
  b.filename = "a";
  b.depth = 1;
  EXPECT_FALSE(MapEntriesMergeable(a, b));
  b.depth = 0;
  b.compressed = true;
  EXPECT_FALSE(MapEntriesMergeable(a, b));
  MapEntry empty;
  EXPECT_FALSE(MapEntriesMergeable(empty, empty));

  MapMerger m;
  EXPECT_FALSE(m.Push(a));
  b.compressed = false;
  EXPECT_FALSE(m.Push(b));
  MapEntry c;
  c.start = 8192;
  c.length = 4096;
  c.zero = true;
  auto done = m.Push(c);
  ASSERT_TRUE(done);
  EXPECT_EQ(done->length, 8192u);
  EXPECT_EQ(m.Finish(), c);
  EXPECT_FALSE(m.Finish());
}

TEST(MapTest, FormatsLikeQemuImg) {
  MapEntry e = DataEntry(0, 65536, 327680, "v3.qcow2");
  EXPECT_EQ(MapEntryJson(e),
            "{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, "
            "\"data\": true, \"compressed\": false, \"offset\": 327680}");
  EXPECT_EQ(MapEntryHuman(e), "0               0x10000         0x50000         v3.qcow2");
  MapEntry z;
  z.start = 65536;
  z.length = 983040;
  z.depth = 2;
  z.zero = true;
  EXPECT_EQ(MapEntryJson(z),
            "{ \"start\": 65536, \"length\": 983040, \"depth\": 2, \"present\": false, "
            "\"zero\": true, \"data\": false, \"compressed\": false}");
  EXPECT_EQ(MapHumanHeader(), "Offset          Length          Mapped to       File");
}

}  // namespace
}  // namespace qcow2kit::tools
