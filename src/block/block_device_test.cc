// The read path end to end: images made by qemu-img / qemu-io must read back byte-identical to
// `qemu-img convert -O raw`, and block status must agree with `qemu-img map`.
#include "qcow2kit/block.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

using testing::MustRun;
using testing::ReadWholeFile;
using testing::ScratchDir;

struct ReadCase {
  std::string name;
  EngineKind engine;
  // Shell commands run in the scratch dir to make `img.qcow2`.
  std::vector<std::string> setup;
};
void PrintTo(const ReadCase& c, std::ostream* os) { *os << c.name; }

class ReadPathTest : public ::testing::TestWithParam<ReadCase> {
 protected:
  void SetUp() override {
    auto r = Reactor::Create(GetParam().engine);
    ASSERT_TRUE(r.ok());
    reactor_ = std::move(*r);
    for (const auto& cmd : GetParam().setup) MustRun("cd " + dir_.path() + " && " + cmd);
  }

  std::unique_ptr<BlockDevice> Open(const std::string& name, CacheMode cache) {
    OpenOptions o;
    o.cache = cache;
    auto img = reactor_->BlockOn(OpenImage(dir_ / name, o));
    EXPECT_TRUE(img.ok()) << img.status().ToString();
    if (!img.ok()) return nullptr;
    return std::make_unique<BlockDevice>(std::move(*img));
  }

  ScratchDir dir_;
  std::unique_ptr<Reactor> reactor_;
};

TEST_P(ReadPathTest, ReadsWhatQemuImgReads) {
  MustRun("cd " + dir_.path() + " && qemu-img convert -O raw img.qcow2 expect.raw");
  auto expect = ReadWholeFile(dir_ / "expect.raw");
  for (CacheMode cache : {CacheMode::kWriteback, CacheMode::kNone}) {
    auto dev = Open("img.qcow2", cache);
    ASSERT_TRUE(dev);
    ASSERT_EQ(dev->size(), expect.size());
    // Whole image in one request, then in odd-sized pieces crossing cluster boundaries.
    std::vector<std::byte> all(expect.size());
    Status s = reactor_->BlockOn(dev->Read(0, all));
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(0, std::memcmp(all.data(), expect.data(), expect.size()));
    std::vector<std::byte> piece(12345);
    for (uint64_t off = 777; off < expect.size(); off += 99991) {
      size_t n = std::min<uint64_t>(piece.size(), expect.size() - off);
      ASSERT_TRUE(reactor_->BlockOn(dev->Read(off, std::span(piece).first(n))).ok());
      ASSERT_EQ(0, std::memcmp(piece.data(), expect.data() + off, n)) << "offset " << off;
    }
  }
}

TEST_P(ReadPathTest, BlockStatusMatchesQemuImgMap) {
  std::string out;
  ASSERT_EQ(0, testing::Run("cd " + dir_.path() + " && qemu-img map --output=json img.qcow2 2>/dev/null",
                   &out));
  auto expect = nlohmann::json::parse(out);
  auto dev = Open("img.qcow2", CacheMode::kWriteback);
  ASSERT_TRUE(dev);
  std::vector<BlockStatusExtent> got;
  ASSERT_TRUE(reactor_->BlockOn(dev->BlockStatus(0, dev->size(), &got)).ok());
  ASSERT_EQ(got.size(), expect.size()) << out;
  for (size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE(expect[i].dump());
    EXPECT_EQ(got[i].start, expect[i]["start"]);
    EXPECT_EQ(got[i].length, expect[i]["length"]);
    EXPECT_EQ(got[i].depth, expect[i]["depth"]);
    EXPECT_EQ(got[i].present, expect[i]["present"]);
    EXPECT_EQ(got[i].zero, expect[i]["zero"]);
    EXPECT_EQ(got[i].data, expect[i]["data"]);
    EXPECT_EQ(got[i].offset != Extent::kNoHost, expect[i].contains("offset"));
  }
}

const char* kPatterns =
    "qemu-io -c 'write -P 0x11 0 100k' -c 'write -P 0x22 1M 3k' -c 'write -z 2M 128k' "
    "-c 'write -P 0x33 3000k 200k' img.qcow2 >/dev/null";

std::vector<ReadCase> Cases() {
  std::vector<ReadCase> cases = {
      {"Clusters64k", EngineKind::kUring,
       {"qemu-img create -q -f qcow2 img.qcow2 4M", kPatterns}},
      {"Clusters512", EngineKind::kUring,
       {"qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 4M", kPatterns}},
      {"Clusters2M", EngineKind::kSync,
       {"qemu-img create -q -f qcow2 -o cluster_size=2M img.qcow2 5M", kPatterns}},
      {"CompatV2Refcount", EngineKind::kSync,
       {"qemu-img create -q -f qcow2 -o compat=0.10 img.qcow2 4M", kPatterns}},
      {"ExtendedL2", EngineKind::kUring,
       {"qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k img.qcow2 4M",
        kPatterns, "qemu-io -c 'write -P 0x44 70k 2k' -c 'write -z 96k 4k' img.qcow2"}},
      {"CompressedZlib", EngineKind::kUring,
       {"qemu-img create -q -f qcow2 src.qcow2 3333k", "qemu-io -c 'write -P 0x5 0 1M' "
        "-c 'write -P 0x7 2M 64k' src.qcow2 >/dev/null",
        "qemu-img convert -c -O qcow2 src.qcow2 img.qcow2"}},
      {"CompressedZstd", EngineKind::kSync,
       {"head -c 3000000 /dev/urandom > r.raw && base64 r.raw | head -c 1500000 >> r.raw",
        "qemu-img convert -c -O qcow2 -o compression_type=zstd -f raw r.raw img.qcow2"}},
      {"BackingChainWithRawBase", EngineKind::kUring,
       {"head -c 3000000 /dev/urandom > base.raw",
        "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2",
        "qemu-io -c 'write -P 0x61 64k 64k' -c 'write -z 512k 64k' mid.qcow2 >/dev/null",
        "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 img.qcow2 4M",
        "qemu-io -c 'write -P 0x62 100k 10k' -c 'write -P 0x63 3500k 64k' img.qcow2 >/dev/null"}},
      {"ExternalDataFile", EngineKind::kUring,
       {"qemu-img create -q -f qcow2 -o data_file=img.data img.qcow2 4M", kPatterns}},
      {"MetadataPreallocation", EngineKind::kSync,
       {"qemu-img create -q -f qcow2 -o preallocation=metadata img.qcow2 4M",
        "qemu-io -c 'write -P 0x71 1M 64k' img.qcow2 >/dev/null"}},
  };
  return cases;
}

INSTANTIATE_TEST_SUITE_P(QemuImages, ReadPathTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace qcow2kit

namespace qcow2kit {
namespace {

// Counts the requests that reach the real engine.
class CountingEngine final : public Engine {
 public:
  explicit CountingEngine(std::unique_ptr<Engine> inner) : inner_(std::move(inner)) {}
  const char* name() const override { return inner_->name(); }
  bool Submit(IoRequest* req) override {
    ++submitted;
    return inner_->Submit(req);
  }
  size_t Poll(bool wait) override { return inner_->Poll(wait); }
  size_t in_flight() const override { return inner_->in_flight(); }
  void Cancel(IoRequest* req) override { inner_->Cancel(req); }
  int submitted = 0;

 private:
  std::unique_ptr<Engine> inner_;
};

TEST(ReadPathIo, ContiguousClustersAreReadInOneRequest) {
  testing::ScratchDir dir;
  testing::MustRun("cd " + dir.path() +
                   " && qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 8M" +
                   " && qemu-io -c 'write -P 0x1 0 2M' img.qcow2 >/dev/null");
  auto reactor = std::move(*Reactor::Create(EngineKind::kUring));
  auto img = reactor->BlockOn(OpenImage(dir / "img.qcow2", {}));
  ASSERT_TRUE(img.ok());
  BlockDevice dev(std::move(*img));
  std::vector<std::byte> buf(2 << 20);
  ASSERT_TRUE(reactor->BlockOn(dev.Read(0, buf)).ok());  // loads the L2 slices
  auto* counter = new CountingEngine(reactor->ReplaceEngine(nullptr));
  reactor->ReplaceEngine(std::unique_ptr<Engine>(counter));
  ASSERT_TRUE(reactor->BlockOn(dev.Read(0, buf)).ok());
  EXPECT_EQ(counter->submitted, 1);  // 512 clusters, one host run, one read
  EXPECT_EQ(buf[12345], std::byte{1});
}

}  // namespace
}  // namespace qcow2kit
