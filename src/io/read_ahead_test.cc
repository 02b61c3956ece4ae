#include "io/read_ahead.h"

#include <fcntl.h>
#include <unistd.h>

#include <vector>

#include "gtest/gtest.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

class ReadAheadTest : public ::testing::TestWithParam<EngineKind> {
 protected:
  void SetUp() override {
    auto r = Reactor::Create(GetParam());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    reactor_ = std::move(*r);
    std::vector<uint8_t> data(40 * 4096);
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i / 4096 + 1);
    int fd = ::open((dir_ / "t").c_str(), O_CREAT | O_WRONLY, 0644);
    ASSERT_EQ(::write(fd, data.data(), data.size()), ssize_t(data.size()));
    ::close(fd);
    file_ = std::move(*File::Open(dir_ / "t", false));
  }
  testing::ScratchDir dir_;
  std::unique_ptr<Reactor> reactor_;
  std::unique_ptr<File> file_;
};

Task<std::vector<int>> ReadAll(File* f, std::vector<ByteRange> ranges, unsigned depth) {
  size_t k = 0;
  ReadAhead ra(
      f,
      [&ranges, &k](ByteRange* r) {
        if (k == ranges.size()) return false;
        *r = ranges[k++];
        return true;
      },
      depth);
  std::vector<int> first_bytes;
  for (size_t i = 0; i < ranges.size(); ++i) {
    auto got = co_await ra.Next();
    if (!got.ok() || got->size() != ranges[i].length) co_return std::vector<int>{-1};
    first_bytes.push_back((*got)[0]);
    // Every byte of the range, including zeros past the end of the file.
    for (size_t j = 0; j < got->size(); ++j) {
      const uint64_t at = ranges[i].offset + j;
      const int want = at < 40 * 4096 ? static_cast<int>(at / 4096 + 1) : 0;
      if ((*got)[j] != want) co_return std::vector<int>{-2};
    }
  }
  auto extra = co_await ra.Next();
  if (extra.ok()) co_return std::vector<int>{-3};
  co_return first_bytes;
}

TEST_P(ReadAheadTest, DeliversRangesInOrderWithReadsInFlight) {
  std::vector<ByteRange> ranges;
  std::vector<int> expect;
  for (int i = 39; i >= 0; i -= 3) {  // backwards, so the order is the list's, not the file's
    ranges.push_back({uint64_t(i) * 4096, 4096});
    expect.push_back(i + 1);
  }
  ranges.push_back({39 * 4096 + 100, 8192});  // runs past the end of the file
  expect.push_back(40);
  EXPECT_EQ(reactor_->BlockOn(ReadAll(file_.get(), ranges, 4)), expect);
  EXPECT_EQ(reactor_->BlockOn(ReadAll(file_.get(), ranges, 1)), expect);
}

Task<bool> StopEarly(File* f) {
  int left = 20;
  ReadAhead ra(
      f,
      [&left](ByteRange* r) {
        *r = {0, 4096};
        return left-- > 0;
      },
      8);
  auto first = co_await ra.Next();
  co_return first.ok();  // destroyed with reads in flight
}

TEST_P(ReadAheadTest, MayBeAbandonedWithReadsInFlight) {
  EXPECT_TRUE(reactor_->BlockOn(StopEarly(file_.get())));
  reactor_->RunUntilIdle();
}

INSTANTIATE_TEST_SUITE_P(Engines, ReadAheadTest,
                         ::testing::Values(EngineKind::kUring, EngineKind::kSync));

}  // namespace
}  // namespace qcow2kit
