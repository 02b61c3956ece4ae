#include "image/metadata_cache.h"

#include <fcntl.h>
#include <unistd.h>

#include <vector>

#include "gtest/gtest.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

class MetadataCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    reactor_ = testing::NewReactor();
    std::vector<uint8_t> data(64 * 1024);
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

TEST_F(MetadataCacheTest, HitsAfterMissAndEvictsLeastRecentlyUsed) {
  MetadataCache cache(file_.get(), 4096, 3 * 4096, "L2 table");
  EXPECT_EQ(cache.capacity(), 3u);
  for (uint64_t s : {0, 1, 2}) {
    auto r = reactor_->BlockOn(cache.Get(s * 4096));
    ASSERT_TRUE(r.ok());
    EXPECT_EQ((*r)[0], s + 1);
  }
  EXPECT_EQ(cache.misses(), 3u);
  EXPECT_NE(cache.Peek(0), nullptr);  // 0 is now the most recently used
  ASSERT_TRUE(reactor_->BlockOn(cache.Get(3 * 4096)).ok());
  EXPECT_EQ(cache.size(), 3u);  // bounded
  EXPECT_EQ(cache.Peek(4096), nullptr);  // slice 1 was the least recently used
  EXPECT_NE(cache.Peek(0), nullptr);
  EXPECT_NE(cache.Peek(2 * 4096), nullptr);
}

TEST_F(MetadataCacheTest, BuffersAreReusedSoMemoryStaysBounded) {
  file_ = std::move(*File::Open(dir_ / "t", true));
  MetadataCache cache(file_.get(), 4096, 3 * 4096, "L2 table");
  for (int round = 0; round < 4; ++round) {
    for (uint64_t s = 0; s < 16; ++s) {
      auto r = reactor_->BlockOn(cache.Get(s * 4096));
      ASSERT_TRUE(r.ok());
      EXPECT_EQ((*r)[4095], s + 1);  // a reused slot holds the new slice, not the old one
    }
  }
  EXPECT_EQ(cache.buffer_bytes(), 3u * 4096);

  // Dirty slices may push the cache past its capacity; once written back, their slots are
  // reused rather than more memory taken.
  for (uint64_t s = 0; s < 6; ++s) {
    auto r = reactor_->BlockOn(cache.GetForUpdate(s * 4096));
    ASSERT_TRUE(r.ok());
  }
  const uint64_t peak = cache.buffer_bytes();
  EXPECT_GE(peak, 6u * 4096);
  ASSERT_TRUE(reactor_->BlockOn(cache.WriteBack()).ok());
  for (uint64_t s = 0; s < 16; ++s) ASSERT_TRUE(reactor_->BlockOn(cache.Get(s * 4096)).ok());
  EXPECT_EQ(cache.size(), 3u);
  EXPECT_EQ(cache.buffer_bytes(), peak);
}

Task<void> GetInto(MetadataCache* c, uint64_t off, int* ok) {
  auto r = co_await c->Get(off);
  if (r.ok() && (*r)[0] == off / 4096 + 1) ++*ok;
}

TEST_F(MetadataCacheTest, ConcurrentMissesShareOneRead) {
  MetadataCache cache(file_.get(), 4096, 8 * 4096, "L2 table");
  int ok = 0;
  for (int i = 0; i < 10; ++i) reactor_->Spawn(GetInto(&cache, 8192, &ok));
  reactor_->RunUntilIdle();
  EXPECT_EQ(ok, 10);
  if (std::string(reactor_->engine().name()) == "io_uring") {
    EXPECT_EQ(cache.misses(), 1u);
  }
}

TEST_F(MetadataCacheTest, SlicePastEndOfFileIsAnError) {
  MetadataCache cache(file_.get(), 4096, 8 * 4096, "refcount block");
  auto r = reactor_->BlockOn(cache.Get(1 << 20));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("refcount block at offset 0x100000 lies past the end"),
            std::string::npos)
      << r.status().message();
}

}  // namespace
}  // namespace qcow2kit
