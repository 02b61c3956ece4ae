// Snapshot table entries and the bitmap directory: tables written by qemu-img, re-encoding,
// and every validation error.

#include "format/snapshot.h"

#include <gtest/gtest.h>

#include <ctime>

#include "format/endian.h"
#include "format/header.h"
#include "format/test_util.h"

namespace qcow2kit::format {
namespace {

using testutil::FailsWith;

// Reads and parses the snapshot table of `path`, checking that each entry re-encodes to the
// bytes qemu-img wrote.
std::vector<Snapshot> ReadSnapshotTable(const std::string& path) {
  std::vector<uint8_t> header = testutil::ReadFile(path, 0, 72);
  const uint32_t nb = LoadBE32(&header[60]);
  uint64_t offset = LoadBE64(&header[64]);
  std::vector<Snapshot> out;
  for (uint32_t i = 0; i < nb; ++i) {
    Result<uint64_t> size = SnapshotEntrySize(testutil::ReadFile(path, offset, 40));
    EXPECT_TRUE(size.ok()) << size.status().message();
    if (!size.ok()) break;
    std::vector<uint8_t> entry = testutil::ReadFile(path, offset, *size);
    Result<Snapshot> s = ParseSnapshotEntry(entry, i);
    EXPECT_TRUE(s.ok()) << s.status().message();
    if (!s.ok()) break;
    EXPECT_EQ(EncodeSnapshotEntry(*s), entry) << "entry " << i;
    out.push_back(*s);
    offset += *size;
  }
  return out;
}

TEST(SnapshotTableTest, ReadsQemuSnapshots) {
  for (uint32_t version : {2u, 3u}) {
    SCOPED_TRACE(version);
    testutil::TempDir dir;
    ASSERT_TRUE(dir.ok());
    const std::string path = dir.File("s.qcow2");
    ASSERT_TRUE(testutil::QemuImgCreate(path, "64M", version == 2 ? "compat=0.10" : ""));
    ASSERT_TRUE(testutil::RunCommand("qemu-io -c 'write 0 64k' '" + path + "'"));
    ASSERT_TRUE(testutil::RunCommand("qemu-img snapshot -c first '" + path + "'"));
    ASSERT_TRUE(testutil::RunCommand("qemu-img snapshot -c 'second snapshot' '" + path + "'"));
    std::vector<Snapshot> snaps = ReadSnapshotTable(path);
    ASSERT_EQ(snaps.size(), 2u);
    EXPECT_EQ(snaps[0].id, "1");
    EXPECT_EQ(snaps[0].name, "first");
    EXPECT_EQ(snaps[1].id, "2");
    EXPECT_EQ(snaps[1].name, "second snapshot");
    for (const Snapshot& s : snaps) {
      EXPECT_EQ(s.l1_size, 1u);
      EXPECT_EQ(s.l1_table_offset % 65536, 0u);
      EXPECT_NE(s.l1_table_offset, 0x30000u);  // a copy, not the active L1
      EXPECT_EQ(s.extra_data.size(), 24u);     // what QEMU writes
      EXPECT_EQ(s.disk_size, 64ull << 20);
      EXPECT_EQ(s.icount, 0u);  // qemu-img records 0, not "off" (~0)
      EXPECT_EQ(s.vm_state_size, 0u);
      EXPECT_GT(s.date_sec, 1600000000u);
      EXPECT_LE(s.date_sec, static_cast<uint32_t>(std::time(nullptr)));
    }
  }
}

// A 40-byte fixed part with the given sizes; the rest of the entry zero.
std::vector<uint8_t> Entry(uint32_t extra, const std::string& id, const std::string& name) {
  std::vector<uint8_t> e((40 + extra + id.size() + name.size() + 7) & ~size_t{7});
  StoreBE64(&e[0], 0x70000);
  StoreBE32(&e[8], 2);
  StoreBE16(&e[12], static_cast<uint16_t>(id.size()));
  StoreBE16(&e[14], static_cast<uint16_t>(name.size()));
  StoreBE32(&e[32], 0x1234);  // 32-bit VM state size
  StoreBE32(&e[36], extra);
  std::copy(id.begin(), id.end(), e.begin() + 40 + extra);
  std::copy(name.begin(), name.end(), e.begin() + 40 + extra + id.size());
  return e;
}

TEST(SnapshotEntryTest, SizeIsPaddedToEightBytes) {
  Result<uint64_t> size = SnapshotEntrySize(Entry(24, "1", "abc"));
  ASSERT_TRUE(size.ok());
  EXPECT_EQ(*size, 72u);  // 40 + 24 + 1 + 3 = 68
}

TEST(SnapshotEntryTest, ExtraDataLimits) {
  EXPECT_TRUE(FailsWith(SnapshotEntrySize(Entry(1025, "1", "")).status(), EINVAL,
                        "Too much extra metadata in snapshot table entry (extra_data_size 1025"));
  EXPECT_TRUE(SnapshotEntrySize(Entry(1024, "1", "")).ok());
  // Short extra data parses (as QEMU opens it); version 3 calls it incomplete.
  Result<Snapshot> short_extra = ParseSnapshotEntry(Entry(8, "1", ""), 0);
  ASSERT_TRUE(short_extra.ok());
  EXPECT_TRUE(SnapshotEntryIncomplete(*short_extra, 3));
  EXPECT_FALSE(SnapshotEntryIncomplete(*short_extra, 2));
  EXPECT_FALSE(SnapshotEntryIncomplete(*ParseSnapshotEntry(Entry(16, "1", ""), 0), 3));
  EXPECT_TRUE(
      FailsWith(SnapshotEntrySize(std::vector<uint8_t>(39)).status(), EINVAL, "truncated"));
}

TEST(SnapshotEntryTest, V2EntryWithoutExtraData) {
  Result<Snapshot> s = ParseSnapshotEntry(Entry(0, "7", "old"), 0);
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->vm_state_size, 0x1234u);  // the 32-bit field
  EXPECT_FALSE(s->disk_size.has_value());
  EXPECT_FALSE(s->icount.has_value());
  EXPECT_EQ(s->l1_table_offset, 0x70000u);
  EXPECT_EQ(s->l1_size, 2u);
  EXPECT_EQ(s->id, "7");
  EXPECT_EQ(s->name, "old");
}

TEST(SnapshotEntryTest, ExtraDataFieldsAndUnknownBytes) {
  std::vector<uint8_t> e = Entry(40, "1", "n");
  StoreBE64(&e[40], 0x123456789);  // 64-bit VM state size supersedes the 32-bit one
  StoreBE64(&e[48], 1ull << 30);
  StoreBE64(&e[56], 12345);
  e[64] = 0xee;  // unknown extra data, kept verbatim
  Result<Snapshot> s = ParseSnapshotEntry(e, 0);
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->vm_state_size, 0x123456789u);
  EXPECT_EQ(s->disk_size, 1ull << 30);
  EXPECT_EQ(s->icount, 12345u);
  EXPECT_EQ(s->extra_data.size(), 40u);
  // Encoding writes the truncated 32-bit size as QEMU does; everything else round trips.
  std::vector<uint8_t> encoded = EncodeSnapshotEntry(*s);
  EXPECT_EQ(LoadBE32(&encoded[32]), 0x23456789u);
  StoreBE32(&e[32], 0x23456789);
  EXPECT_EQ(encoded, e);
}

TEST(SnapshotEntryTest, EncodeWritesQemuExtraDataSize) {
  Snapshot s;
  s.l1_table_offset = 0x50000;
  s.l1_size = 1;
  s.id = "3";
  s.name = "x";
  s.disk_size = 1 << 20;
  std::vector<uint8_t> e = EncodeSnapshotEntry(s);
  ASSERT_EQ(e.size(), 72u);  // 40 + 24 + 2, padded
  EXPECT_EQ(LoadBE32(&e[36]), 24u);
  EXPECT_EQ(LoadBE64(&e[48]), 1u << 20);
  EXPECT_EQ(LoadBE64(&e[56]), ~0ull);  // icount off
  Result<Snapshot> back = ParseSnapshotEntry(e, 0);
  ASSERT_TRUE(back.ok());
  s.extra_data = back->extra_data;
  EXPECT_EQ(*back, s);
}

TEST(SnapshotEntryTest, Errors) {
  auto parse_and_validate = [](std::span<const uint8_t> entry, uint32_t cluster_bits) {
    Result<Snapshot> s = ParseSnapshotEntry(entry, 3);
    return s.ok() ? ValidateSnapshotL1(*s, 3, cluster_bits) : s.status();
  };
  std::vector<uint8_t> e = Entry(24, "1", "n");
  std::vector<uint8_t> longer = e;
  longer.resize(e.size() + 8);
  EXPECT_TRUE(FailsWith(ParseSnapshotEntry(longer, 4).status(), EINVAL,
                        "snapshot 4: entry of 80 bytes, expected 72"));
  EXPECT_TRUE(FailsWith(ParseSnapshotEntry(Entry(2000, "", ""), 5).status(), EINVAL,
                        "snapshot 5: Too much extra metadata"));
  StoreBE64(&e[0], 0x10200);
  EXPECT_TRUE(ParseSnapshotEntry(e, 3).ok());  // parsing alone accepts it
  EXPECT_TRUE(FailsWith(parse_and_validate(e, 16), EINVAL,
                        "snapshot 3: L1 table offset 0x10200 is not cluster aligned"));
  EXPECT_TRUE(parse_and_validate(e, 9).ok());  // aligned to 512-byte clusters
  StoreBE64(&e[0], 0x10000);
  StoreBE32(&e[8], (4u << 20) + 1);
  EXPECT_TRUE(FailsWith(parse_and_validate(e, 16), EINVAL,
                        "snapshot 3: L1 table too large: l1_size 4194305"));
  StoreBE32(&e[8], 1);
  StoreBE64(&e[0], 0xffffffffffff0000);
  EXPECT_TRUE(FailsWith(parse_and_validate(e, 16), EINVAL, "lies beyond the largest file offset"));
}

TEST(BitmapDirectoryTest, ReadsQemuBitmaps) {
  testutil::TempDir dir;
  ASSERT_TRUE(dir.ok());
  const std::string path = dir.File("b.qcow2");
  ASSERT_TRUE(testutil::QemuImgCreate(path, "64M"));
  ASSERT_TRUE(testutil::RunCommand("qemu-img bitmap --add -g 64k '" + path + "' bm0"));
  ASSERT_TRUE(
      testutil::RunCommand("qemu-img bitmap --add -g 4k --disable '" + path + "' 'second bitmap'"));
  Result<ParsedHeader> h =
      ParseHeader(testutil::ReadCluster0(path, 65536), testutil::FileSize(path));
  ASSERT_TRUE(h.ok() && h->bitmaps) << h.status().message();
  std::vector<uint8_t> raw =
      testutil::ReadFile(path, h->bitmaps->directory_offset, h->bitmaps->directory_size);
  Result<std::vector<BitmapInfo>> bitmaps = ParseBitmapDirectory(raw, h->bitmaps->nb_bitmaps);
  ASSERT_TRUE(bitmaps.ok()) << bitmaps.status().message();
  ASSERT_EQ(bitmaps->size(), 2u);
  const BitmapInfo& a = (*bitmaps)[0];
  const BitmapInfo& b = (*bitmaps)[1];
  EXPECT_EQ(a.name, "bm0");
  EXPECT_EQ(a.granularity_bits, 16);
  EXPECT_EQ(a.flags, 2u);  // auto: enabled
  EXPECT_EQ(a.type, 1);
  EXPECT_EQ(b.name, "second bitmap");
  EXPECT_EQ(b.granularity_bits, 12);
  EXPECT_EQ(b.flags, 0u);  // disabled
  for (const BitmapInfo& i : *bitmaps) {
    EXPECT_EQ(i.table_size, 1u);  // 64 MiB / granularity bits fit in one 64 KiB cluster
    EXPECT_NE(i.table_offset, 0u);
    EXPECT_EQ(i.table_offset % 65536, 0u);
  }
}

// One directory entry: the 24-byte fixed part, extra data, name, padding.
std::vector<uint8_t> BitmapEntry(const std::string& name, uint8_t granularity_bits,
                                 uint32_t extra = 0, uint16_t name_size_field = 0) {
  std::vector<uint8_t> e((24 + extra + name.size() + 7) & ~size_t{7});
  StoreBE64(&e[0], 0x90000);
  StoreBE32(&e[8], 1);
  StoreBE32(&e[12], 2);
  e[16] = 1;
  e[17] = granularity_bits;
  StoreBE16(&e[18], name_size_field ? name_size_field : static_cast<uint16_t>(name.size()));
  StoreBE32(&e[20], extra);
  std::copy(name.begin(), name.end(), e.begin() + 24 + extra);
  return e;
}

std::vector<uint8_t> Concat(std::vector<uint8_t> a, const std::vector<uint8_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST(BitmapDirectoryTest, SkipsExtraDataAndPadding) {
  std::vector<uint8_t> dir = Concat(BitmapEntry("abc", 9, 8), BitmapEntry("0123456789", 31));
  Result<std::vector<BitmapInfo>> r = ParseBitmapDirectory(dir, 2);
  ASSERT_TRUE(r.ok()) << r.status().message();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[0], (BitmapInfo{"abc", 0x90000, 1, 2, 1, 9}));
  EXPECT_EQ((*r)[1].name, "0123456789");
  EXPECT_EQ((*r)[1].granularity_bits, 31);
  EXPECT_TRUE(ParseBitmapDirectory({}, 0).ok());
}

TEST(BitmapDirectoryTest, Errors) {
  EXPECT_TRUE(FailsWith(ParseBitmapDirectory(BitmapEntry("", 16), 1).status(), EINVAL,
                        "entry 0: name_size 0 is not in 1..1023"));
  EXPECT_TRUE(FailsWith(ParseBitmapDirectory(BitmapEntry(std::string(1024, 'n'), 16), 1).status(),
                        EINVAL, "name_size 1024"));
  EXPECT_TRUE(FailsWith(ParseBitmapDirectory(BitmapEntry("a", 8), 1).status(), EINVAL,
                        "granularity_bits 8 is not in 9..31"));
  EXPECT_TRUE(FailsWith(ParseBitmapDirectory(BitmapEntry("a", 32), 1).status(), EINVAL,
                        "granularity_bits 32"));
  std::vector<uint8_t> big = BitmapEntry("a", 16);
  StoreBE32(&big[8], 0x8000001);
  EXPECT_TRUE(FailsWith(ParseBitmapDirectory(big, 1).status(), EINVAL,
                        "bitmap table size 134217729 exceeds"));
  // A name running past the directory, a missing entry, a truncated fixed part.
  EXPECT_TRUE(FailsWith(ParseBitmapDirectory(BitmapEntry("a", 16, 0, 100), 1).status(), EINVAL,
                        "entry 0 at byte 0 runs past the end of the directory (32 bytes)"));
  EXPECT_TRUE(FailsWith(ParseBitmapDirectory(BitmapEntry("a", 16), 2).status(), EINVAL,
                        "entry 1 at byte 32 runs past the end"));
  std::vector<uint8_t> cut = BitmapEntry("a", 16);
  cut.resize(20);
  EXPECT_TRUE(FailsWith(ParseBitmapDirectory(cut, 1).status(), EINVAL, "runs past the end"));
  // Bytes left over after nb entries.
  EXPECT_TRUE(FailsWith(
      ParseBitmapDirectory(Concat(BitmapEntry("a", 16), BitmapEntry("b", 16)), 1).status(), EINVAL,
      "bitmap directory has 32 bytes after its 1 entries"));
  EXPECT_TRUE(FailsWith(ParseBitmapDirectory({}, 65536).status(), EINVAL, "65536 bitmaps"));
}

}  // namespace
}  // namespace qcow2kit::format
