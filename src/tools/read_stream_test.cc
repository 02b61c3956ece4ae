#include "tools/read_stream.h"

#include <unistd.h>

#include <cstdlib>
#include <vector>

#include "gtest/gtest.h"
#include "qcow2kit/image.h"

namespace qcow2kit::tools {
namespace {

class StreamReadTest : public ::testing::TestWithParam<EngineKind> {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/qk_stream_XXXXXX";
    int fd = ::mkstemp(tmpl);
    ASSERT_GE(fd, 0);
    path_ = tmpl;
    data_.resize(300000);
    for (size_t i = 0; i < data_.size(); ++i) data_[i] = static_cast<uint8_t>(i * 31 + (i >> 9));
    ASSERT_EQ(::write(fd, data_.data(), data_.size()), static_cast<ssize_t>(data_.size()));
    ::close(fd);
  }
  void TearDown() override { ::unlink(path_.c_str()); }

  std::string path_;
  std::vector<uint8_t> data_;
};

TEST_P(StreamReadTest, DeliversChunksInOrder) {
  auto reactor = Reactor::Create(GetParam());
  ASSERT_TRUE(reactor.ok()) << reactor.status().ToString();
  OpenOptions options;
  options.format = "raw";
  auto img = (*reactor)->BlockOn(OpenImage(path_, options));
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  BlockDevice dev(std::move(*img));

  for (unsigned depth : {1u, 3u, 8u}) {
    std::vector<uint8_t> got;
    uint64_t next = 1000;
    Status s = StreamRead(**reactor, dev, 1000, 250000, 7000, depth,
                          [&](uint64_t offset, std::span<const std::byte> chunk) {
                            EXPECT_EQ(offset, next);
                            next += chunk.size();
                            auto p = reinterpret_cast<const uint8_t*>(chunk.data());
                            got.insert(got.end(), p, p + chunk.size());
                            return Status::Ok();
                          });
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(got.size(), 250000u);
    EXPECT_TRUE(std::equal(got.begin(), got.end(), data_.begin() + 1000)) << "depth " << depth;
  }
}

TEST_P(StreamReadTest, StopsAtTheFirstSinkErrorAndRefusesRangesOutside) {
  auto reactor = Reactor::Create(GetParam());
  ASSERT_TRUE(reactor.ok()) << reactor.status().ToString();
  OpenOptions options;
  options.format = "raw";
  auto img = (*reactor)->BlockOn(OpenImage(path_, options));
  ASSERT_TRUE(img.ok());
  BlockDevice dev(std::move(*img));
  int calls = 0;
  Status s = StreamRead(**reactor, dev, 0, data_.size(), 4096, 4,
                        [&](uint64_t, std::span<const std::byte>) {
                          return ++calls == 3 ? Status::IoError("sink full") : Status::Ok();
                        });
  EXPECT_EQ(s.message(), "sink full");
  EXPECT_EQ(calls, 3);
  s = StreamRead(**reactor, dev, dev.size() - 10, 11, 4096, 4,
                 [](uint64_t, std::span<const std::byte>) { return Status::Ok(); });
  EXPECT_FALSE(s.ok());
}

INSTANTIATE_TEST_SUITE_P(Engines, StreamReadTest,
                         ::testing::Values(EngineKind::kSync, EngineKind::kUring));

}  // namespace
}  // namespace qcow2kit::tools
