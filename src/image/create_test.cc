// CreateImage against qemu-img create as the oracle: for each option combination our image
// must pass `qemu-img check`, be byte-identical to qemu-img's (which implies equal `info` and
// `map`, compared too for clearer failures), and take a write and read-back through qemu-io.
// Bad option combinations must fail with qemu-img's message.
#include "image/create.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

using testing::ReadWholeFile;

struct Case {
  std::string name;
  std::string options;  // -o
  std::string size;     // "" for none
  std::string backing;  // -b ("base.qcow2" / "base.raw" are made first), "" for none
  std::string backing_format;
  bool unsafe = false;
  bool data_file = false;  // adds data_file=<dir>/data.raw
};

Case C(std::string name, std::string options, std::string size, std::string backing = "",
       std::string backing_format = "", bool unsafe = false, bool data_file = false) {
  return {std::move(name),    std::move(options),        std::move(size),
          std::move(backing), std::move(backing_format), unsafe,
          data_file};
}

std::string Quote(const std::string& s) {
  return "'" + s + "'";
}

// Our side of `qemu-img create`: the same steps as cmd_create.cc without printing.
Status OurCreate(const std::string& format, const std::string& filename, const std::string& options,
                 const std::string& size, const std::string& backing,
                 const std::string& backing_format, bool unsafe) {
  auto reactor = Reactor::Create(EngineKind::kUring);
  if (!reactor.ok()) return reactor.status();
  CreateRequest r;
  r.filename = filename;
  r.format = format;
  r.options = options;
  r.unsafe = unsafe;
  if (!size.empty()) r.size = *ParseSize(size);
  if (!backing.empty()) r.backing_file = backing;
  if (!backing_format.empty()) r.backing_format = backing_format;
  auto parsed = ParseCreateRequest(r);
  if (!parsed.ok()) return parsed.status();
  auto resolved = (*reactor)->BlockOn(
      ResolveCreateSize(filename, OptionValue(parsed->options, "backing_file"),
                        OptionValue(parsed->options, "backing_fmt"), !unsafe, parsed->size));
  if (!resolved.ok()) return resolved.status();
  parsed->size = *resolved;
  auto o = ResolveCreateOptions(*parsed);
  if (!o.ok()) return o.status();
  return (*reactor)->BlockOn(CreateImage(*o));
}

std::string QemuCreateCommand(const std::string& format, const std::string& filename,
                              const std::string& options, const std::string& size,
                              const std::string& backing, const std::string& backing_format,
                              bool unsafe) {
  std::string cmd = "qemu-img create -q -f " + format;
  if (!options.empty()) cmd += " -o " + Quote(options);
  if (!backing.empty()) cmd += " -b " + Quote(backing);
  if (!backing_format.empty()) cmd += " -F " + backing_format;
  if (unsafe) cmd += " -u";
  cmd += " " + Quote(filename);
  if (!size.empty()) cmd += " " + size;
  return cmd;
}

// `qemu-img info` without the fields that name the file or measure its allocation.
nlohmann::json Info(const std::string& path) {
  std::string out;
  EXPECT_EQ(testing::Run("qemu-img info --output=json " + Quote(path), &out), 0) << out;
  auto j = nlohmann::json::parse(out, nullptr, false);
  if (j.is_object()) {
    j.erase("actual-size");
    j.erase("filename");
  }
  return j;
}

std::string Map(const std::string& path) {
  std::string out;
  EXPECT_EQ(testing::Run("qemu-img map --output=json " + Quote(path), &out), 0) << out;
  return out;
}

// The data extents of a file (SEEK_DATA / SEEK_HOLE), appended to `out`.
void DataExtents(int fd, off_t size, std::vector<std::pair<off_t, off_t>>* out) {
  for (off_t at = 0; at < size;) {
    off_t data = ::lseek(fd, at, SEEK_DATA);
    if (data < 0) break;
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    out->emplace_back(data, hole);
    at = hole;
  }
}

// Byte comparison that reads only where either file has data (holes read as zeros), so that
// sparse multi-gigabyte images compare quickly. Empty if equal, else the first difference.
std::string CompareFiles(const std::string& a, const std::string& b) {
  int fa = ::open(a.c_str(), O_RDONLY);
  int fb = ::open(b.c_str(), O_RDONLY);
  struct stat sa, sb;
  std::string result;
  if (fa < 0 || fb < 0 || ::fstat(fa, &sa) != 0 || ::fstat(fb, &sb) != 0) {
    result = "cannot open " + a + " or " + b;
  } else if (sa.st_size != sb.st_size) {
    result = "sizes " + std::to_string(sa.st_size) + " vs " + std::to_string(sb.st_size);
  } else {
    std::vector<std::pair<off_t, off_t>> extents;
    DataExtents(fa, sa.st_size, &extents);
    DataExtents(fb, sb.st_size, &extents);
    std::vector<char> ba(1 << 20), bb(1 << 20);
    for (auto [from, to] : extents) {
      for (off_t at = from; at < to && result.empty();) {
        size_t n = static_cast<size_t>(std::min<off_t>(to - at, ba.size()));
        if (::pread(fa, ba.data(), n, at) != ssize_t(n) ||
            ::pread(fb, bb.data(), n, at) != ssize_t(n)) {
          result = "short read at " + std::to_string(at);
        }
        for (size_t i = 0; i < n && result.empty(); ++i) {
          if (ba[i] != bb[i]) result = "first difference at offset " + std::to_string(at + i);
        }
        at += n;
      }
    }
  }
  if (fa >= 0) ::close(fa);
  if (fb >= 0) ::close(fb);
  return result;
}

struct Snapshot {
  nlohmann::json info;
  std::string map;
};

Snapshot Take(const std::string& image) {
  Snapshot s;
  s.info = Info(image);
  // qemu-img map walks every L1 entry: minutes for exabyte images, so only for smaller ones.
  if (s.info.value("virtual-size", uint64_t{0}) <= (64ull << 30)) s.map = Map(image);
  return s;
}

void ExpectCleanCheck(const std::string& image, const std::string& when) {
  std::string out;
  int rc = testing::Run("qemu-img check --output=json " + Quote(image), &out);
  EXPECT_EQ(rc, 0) << when << ":\n" << out;
  EXPECT_EQ(out.find("\"leaks\""), std::string::npos) << when << ":\n" << out;
  EXPECT_EQ(out.find("\"corruptions\""), std::string::npos) << when << ":\n" << out;
}

// Readable parameters in failure messages.
void PrintTo(const Case& c, std::ostream* os) {
  *os << "-o '" << c.options << "' size '" << c.size << "' -b '" << c.backing << "' -F '"
      << c.backing_format << "'" << (c.unsafe ? " -u" : "") << (c.data_file ? " data_file" : "");
}

class CreateMatchesQemu : public ::testing::TestWithParam<Case> {};

TEST_P(CreateMatchesQemu, CheckInfoMapBytesAndIo) {
  const Case& c = GetParam();
  testing::ScratchDir dir;
  const std::string image = dir / "img.qcow2";
  const std::string data = c.data_file ? dir / "data.raw" : "";
  std::string options = c.options;
  if (c.data_file) options += std::string(options.empty() ? "" : ",") + "data_file=" + data;
  testing::MustRun("qemu-img create -q -f qcow2 " + Quote(dir / "base.qcow2") + " 3M");
  testing::MustRun("qemu-img create -q -f raw " + Quote(dir / "base.raw") + " 2M");

  Status s = OurCreate("qcow2", image, options, c.size, c.backing, c.backing_format, c.unsafe);
  ASSERT_TRUE(s.ok()) << s.ToString();
  Snapshot ours = Take(image);
  ExpectCleanCheck(image, "fresh image");

  // qemu-img's image under the same names, ours set aside meanwhile.
  auto swap = [&](const std::string& from, const std::string& to) {
    ASSERT_EQ(::rename((image + from).c_str(), (image + to).c_str()), 0);
    if (!data.empty()) {
      ASSERT_EQ(::rename((data + from).c_str(), (data + to).c_str()), 0);
    }
  };
  swap("", ".ours");
  testing::MustRun(
      QemuCreateCommand("qcow2", image, options, c.size, c.backing, c.backing_format, c.unsafe));
  Snapshot theirs = Take(image);
  EXPECT_EQ(ours.info, theirs.info);
  EXPECT_EQ(ours.map, theirs.map);
  EXPECT_EQ(CompareFiles(image + ".ours", image), "") << "image file";
  if (!data.empty()) {
    EXPECT_EQ(CompareFiles(data + ".ours", data), "") << "data file";
  }
  swap(".ours", "");

  // A write and read-back through QEMU, then the image must still be consistent.
  const uint64_t size = ours.info.value("virtual-size", uint64_t{0});
  const uint64_t length = std::min<uint64_t>(size, 65536);
  if (length > 0) {
    std::string out;
    const std::string n = std::to_string(length);
    int rc = testing::Run(
        "qemu-io -c 'write -P 0xab 0 " + n + "' -c 'read -P 0xab 0 " + n + "' " + Quote(image),
        &out);
    EXPECT_EQ(rc, 0) << out;
    EXPECT_EQ(out.find("fail"), std::string::npos) << out;
    EXPECT_EQ(out.find("rror"), std::string::npos) << out;
    ExpectCleanCheck(image, "after qemu-io");
  }
}

// clang-format off
const Case kCases[] = {
    C("Empty", "", "0"),
    C("OneByte", "", "1"),
    C("UnalignedSize", "", "1048577"),
    C("FiveTiB", "", "5T"),
    C("OnePiB", "", "1P"),
    C("Cluster512", "cluster_size=512", "1048577"),
    C("Cluster512GrowsRefcountTable", "cluster_size=512", "20G"),
    C("Cluster512Refcount64", "cluster_size=512,refcount_bits=64", "10G"),
    C("Cluster4kFiveTiB", "cluster_size=4k", "5T"),
    C("Cluster4kRefcount1", "cluster_size=4k,refcount_bits=1", "5T"),
    C("Cluster2MOnePiB", "cluster_size=2M", "1P"),
    C("Cluster2MTwoEiB", "cluster_size=2M", "2E"),
    C("CompatV2", "compat=0.10", "1048577"),
    C("CompatV2Cluster512", "compat=v2,cluster_size=512", "5G"),
    C("CompatV3", "compat=1.1", "1M"),
    C("Refcount1", "refcount_bits=1", "1M"),
    C("Refcount2", "refcount_bits=2", "1M"),
    C("Refcount4", "refcount_bits=4", "1M"),
    C("Refcount8", "refcount_bits=8", "1M"),
    C("Refcount32", "refcount_bits=32", "1M"),
    C("Refcount64", "refcount_bits=64", "5T"),
    C("Lazy", "lazy_refcounts=on", "1M"),
    C("ExtendedL2", "extended_l2=on", "1P"),
    C("ExtendedL2Cluster16k", "extended_l2=on,cluster_size=16k", "1048577"),
    C("Zstd", "compression_type=zstd", "1M"),
    C("Everything", "cluster_size=32k,refcount_bits=8,lazy_refcounts=on,extended_l2=on,"
                   "compression_type=zstd", "3G"),
    C("Metadata", "preallocation=metadata", "1048577"),
    C("MetadataSeveralL2", "preallocation=metadata", "1G"),
    C("MetadataCluster512", "preallocation=metadata,cluster_size=512", "10M"),
    C("MetadataCluster512Refcount64", "preallocation=metadata,cluster_size=512,refcount_bits=64",
     "2M"),
    C("MetadataCluster2M", "preallocation=metadata,cluster_size=2M", "3G"),
    C("MetadataExtendedL2", "preallocation=metadata,extended_l2=on", "5M"),
    C("MetadataExtendedL2Unaligned", "preallocation=metadata,extended_l2=on", "1048577"),
    C("MetadataExtendedL2Cluster2M", "preallocation=metadata,extended_l2=on,cluster_size=2M",
      "1048577"),
    C("MetadataV2", "preallocation=metadata,compat=0.10", "2M"),
    C("Falloc", "preallocation=falloc", "1048577"),
    C("FallocEmpty", "preallocation=falloc", "0"),
    C("FallocSeveralL2", "preallocation=falloc,cluster_size=4k", "5M"),
    C("FallocCluster512", "preallocation=falloc,cluster_size=512", "3M"),
    C("Full", "preallocation=full", "1048577"),
    C("FullCluster512Refcount4", "preallocation=full,cluster_size=512,refcount_bits=4", "2M"),
    C("BackingInheritsSize", "", "", "base.qcow2", "qcow2"),
    C("BackingWithSize", "", "5M", "base.qcow2", "qcow2"),
    C("BackingRaw", "cluster_size=4k", "", "base.raw", "raw"),
    C("BackingUnsafe", "", "1M", "base.raw", "raw", true),
    C("BackingV2", "compat=0.10", "", "base.qcow2", "qcow2"),
    C("BackingPreallocExtendedL2", "extended_l2=on,preallocation=metadata", "", "base.qcow2",
     "qcow2"),
    C("BackingFallocExtendedL2", "extended_l2=on,preallocation=falloc", "4M", "base.qcow2",
     "qcow2"),
    C("DataFile", "", "1048577", "", "", false, true),
    C("DataFileBacking", "", "", "base.qcow2", "qcow2", false, true),
    C("DataFileRaw", "data_file_raw=on", "1048577", "", "", false, true),
    C("DataFileMetadata", "preallocation=metadata", "3M", "", "", false, true),
    C("DataFileFalloc", "preallocation=falloc", "3M", "", "", false, true),
    C("DataFileMetadataUnaligned", "preallocation=metadata", "1048577", "", "", false, true),
    C("DataFileFallocUnaligned", "preallocation=falloc", "1048577", "", "", false, true),
    C("BackingPreallocExtendedL2Unaligned", "extended_l2=on,preallocation=metadata", "1048577",
      "base.qcow2", "qcow2"),
    C("DataFileFull", "preallocation=full,cluster_size=4k", "1M", "", "", false, true),
};
// clang-format on

INSTANTIATE_TEST_SUITE_P(Matrix, CreateMatchesQemu, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return info.param.name; });

// Options qemu-img refuses: ours must fail too, with the same message.
struct BadCase {
  std::string format;
  std::string options;
  std::string size;
  std::string backing;
  std::string backing_format;
  bool unsafe = false;
};

void PrintTo(const BadCase& c, std::ostream* os) {
  *os << "-f " << c.format << " -o '" << c.options << "' size '" << c.size << "' -b '" << c.backing
      << "' -F '" << c.backing_format << "'" << (c.unsafe ? " -u" : "");
}

BadCase B(std::string format, std::string options, std::string size, std::string backing = "",
          std::string backing_format = "", bool unsafe = false) {
  return {std::move(format),  std::move(options),        std::move(size),
          std::move(backing), std::move(backing_format), unsafe};
}

class CreateRejectsLikeQemu : public ::testing::TestWithParam<BadCase> {};

TEST_P(CreateRejectsLikeQemu, SameMessage) {
  const BadCase& c = GetParam();
  testing::ScratchDir dir;
  const std::string image = dir / "img";
  testing::MustRun("qemu-img create -q -f raw " + Quote(dir / "base.raw") + " 1M");
  const std::string backing = c.backing == "base.raw" ? dir / "base.raw" : c.backing;
  std::string out;
  int rc = testing::Run(
      QemuCreateCommand(c.format, image, c.options, c.size, backing, c.backing_format, c.unsafe) +
          " 2>&1 >/dev/null | head -1",
      &out);
  ASSERT_EQ(rc, 0);
  ASSERT_NE(out.find("qemu-img: "), std::string::npos) << "qemu-img accepted it: " << out;
  const std::string expected = out.substr(0, out.find('\n'));
  ::unlink(image.c_str());  // qemu-img leaves a raw file behind on some errors

  Status s = OurCreate(c.format, image, c.options, c.size, backing, c.backing_format, c.unsafe);
  ASSERT_FALSE(s.ok());
  const std::string message = s.ToString();
  EXPECT_EQ("qemu-img: " + image + ": " + message.substr(0, message.find('\n')), expected);
  struct stat st;
  EXPECT_NE(::stat(image.c_str(), &st), 0) << "a failed create must leave no file";
}

// clang-format off
const BadCase kBadCases[] = {
    B("qcow2", "", ""),
    B("qcow2", "cluster_size=1000", "1M"),
    B("qcow2", "cluster_size=4M", "1M"),
    B("qcow2", "cluster_size=256", "1M"),
    B("qcow2", "cluster_size=abc", "1M"),
    B("qcow2", "compat=0.11", "1M"),
    B("qcow2", "compat=0.10,refcount_bits=8", "1M"),
    B("qcow2", "refcount_bits=3", "1M"),
    B("qcow2", "refcount_bits=128", "1M"),
    B("qcow2", "refcount_bits=0", "1M"),
    B("qcow2", "refcount_bits=x", "1M"),
    B("qcow2", "compat=0.10,lazy_refcounts=on", "1M"),
    B("qcow2", "lazy_refcounts=maybe", "1M"),
    B("qcow2", "compat=0.10,extended_l2=on", "1M"),
    B("qcow2", "extended_l2=on,cluster_size=8k", "1M"),
    B("qcow2", "compression_type=lz4", "1M"),
    B("qcow2", "compat=0.10,compression_type=zstd", "1M"),
    B("qcow2", "preallocation=bogus", "1M"),
    B("qcow2", "preallocation=metadata", "1M", "base.raw", "raw"),
    B("qcow2", "backing_fmt=raw", "1M"),
    B("qcow2", "", "1M", "", "raw"),
    B("qcow2", "data_file_raw=on", "1M"),
    B("qcow2", "compat=0.10,data_file=d.raw", "1M"),
    B("qcow2", "foo=bar", "1M"),
    B("qcow2", "size=1M", "1M"),
    B("qcow2", "cluster_size=512", "129G"),
    B("qcow2", "", "2049T"),
    B("qcow2", "extended_l2=on", "1025T"),
    B("qcow2", "", "", "nonexistent", "qcow2"),
    B("qcow2", "", "1M", "base.raw", ""),
    B("qcow2", "", "1M", "nonexistent", "", true),
    B("qcow2", "", "", "nonexistent", "raw", true),
    B("qcow2", "backing_file=", "1M"),
    B("qcow2", "", "1M", "base.raw", "foo", true),
    B("raw", "preallocation=metadata", "1M"),
    B("raw", "preallocation=bogus", "1M"),
    B("raw", "", "1M", "base.raw", "raw"),
    B("raw", "cluster_size=4k", "1M"),
    B("vmdkx", "", "1M"),
};
// clang-format on

INSTANTIATE_TEST_SUITE_P(Matrix, CreateRejectsLikeQemu, ::testing::ValuesIn(kBadCases),
                         [](const auto& info) {
                           return info.param.format + "_" + std::to_string(info.index);
                         });

TEST(CreateRaw, SizesAndPreallocationMatchQemu) {
  for (const std::string prealloc :
       {"", "preallocation=off", "preallocation=falloc", "preallocation=full"}) {
    testing::ScratchDir dir;
    const std::string ours = dir / "ours.raw";
    const std::string theirs = dir / "theirs.raw";
    ASSERT_TRUE(OurCreate("raw", ours, prealloc, "1048577", "", "", false).ok()) << prealloc;
    testing::MustRun(QemuCreateCommand("raw", theirs, prealloc, "1048577", "", "", false));
    struct stat a, b;
    ASSERT_EQ(::stat(ours.c_str(), &a), 0);
    ASSERT_EQ(::stat(theirs.c_str(), &b), 0);
    EXPECT_EQ(a.st_size, b.st_size) << prealloc;
    EXPECT_EQ(a.st_blocks > 0, b.st_blocks > 0) << prealloc;
    EXPECT_EQ(ReadWholeFile(ours), ReadWholeFile(theirs)) << prealloc;
  }
}

TEST(CreateOptionsText, FormattingLineMatchesQemu) {
  const char* option_sets[] = {
      "",
      "cluster_size=4k,compat=0.10,preallocation=metadata",
      "refcount_bits=16,lazy_refcounts=on,compat=1.1,data_file=d.raw,data_file_raw=on,"
      "preallocation=metadata,cluster_size=65536,extended_l2=on,compression_type=zstd",
      "lazy_refcounts=yes,extended_l2=true",
      "backing_file=a,,b,backing_fmt=raw,size=1k",
      "refcount_bits=0x10,cluster_size=4k,cluster_size=8k"};
  for (const char* options : option_sets) {
    CreateRequest r;
    r.filename = "x.qcow2";
    r.format = "qcow2";
    r.options = options;
    if (!std::string(options).ends_with("size=1k")) r.size = 1048576;
    auto parsed = ParseCreateRequest(r);
    ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
    std::string expected;
    std::string cmd = "qemu-img create -f qcow2 -u ";
    if (*options) cmd += "-o " + Quote(options);
    cmd += " x.qcow2";
    if (r.size) cmd += " 1M";
    // qemu-img prints the line before it fails on a missing file or creates one; use a
    // scratch directory so nothing is left behind.
    testing::ScratchDir dir;
    testing::Run("cd " + dir.path() + " && " + cmd + " | head -1", &expected);
    EXPECT_EQ(FormattingLine(*parsed) + "\n", expected.substr(0, expected.find('\n') + 1));
  }
}

}  // namespace
}  // namespace qcow2kit
