// Tests of DelayEngine over both real engines: a matching request stays pending until it is
// released and then completes with the file's content at that time; other requests pass.
#include "io/delay_engine.h"

#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "qcow2kit/file.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

struct ReadResult {
  std::vector<std::byte> buf = std::vector<std::byte>(4096);
  Result<size_t> result = Status::Invalid("not run");
  bool done = false;
};

Task<void> ReadTask(File* f, uint64_t offset, ReadResult* out) {
  auto r = co_await f->ReadAt(out->buf, offset);
  out->result = std::move(r);
  out->done = true;
}

class DelayEngineTest : public ::testing::TestWithParam<EngineKind> {
 protected:
  void SetUp() override {
    reactor_ = testing::NewReactor(GetParam());
    delay_ = new DelayEngine(reactor_->ReplaceEngine(nullptr));
    reactor_->ReplaceEngine(std::unique_ptr<Engine>(delay_));
    std::ofstream(dir_ / "f", std::ios::binary) << std::string(16384, '\x11');
    auto f = File::Open(dir_ / "f", true);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    file_ = std::move(*f);
  }
  void TearDown() override {
    delay_->ReleaseAll();
    reactor_->RunUntilIdle();
  }

  testing::ScratchDir dir_;
  std::unique_ptr<Reactor> reactor_;
  DelayEngine* delay_ = nullptr;  // owned by reactor_
  std::unique_ptr<File> file_;
  ReadResult held_, passed_;
};

TEST_P(DelayEngineTest, HoldsTheMatchingRequestUntilReleased) {
  delay_->HoldNext({.op = IoOp::kRead, .fd = file_->fd(), .lo = 8192, .hi = 8193});
  reactor_->Spawn(ReadTask(file_.get(), 8192, &held_));
  reactor_->Spawn(ReadTask(file_.get(), 0, &passed_));
  while (!passed_.done) reactor_->RunOnce(true);
  EXPECT_EQ(delay_->held(), 1u);
  EXPECT_FALSE(held_.done);
  EXPECT_EQ(delay_->passed_in_flight(), 0u);
  ASSERT_TRUE(passed_.result.ok());

  // Written while the read is held: the read, released, sees it.
  std::vector<std::byte> v(4096, std::byte{0x22});
  ASSERT_TRUE(reactor_->BlockOn(file_->WriteAt(v, 8192)).ok());
  delay_->ReleaseAll();
  EXPECT_EQ(delay_->held(), 0u);
  while (!held_.done) reactor_->RunOnce(true);
  ASSERT_TRUE(held_.result.ok()) << held_.result.status().ToString();
  EXPECT_EQ(*held_.result, 4096u);
  EXPECT_EQ(held_.buf[0], std::byte{0x22});
  EXPECT_EQ(passed_.buf[0], std::byte{0x11});
}

TEST_P(DelayEngineTest, HoldsOnlyOnceAndOnlyWhatMatches) {
  // A write rule does not catch reads, and a rule is used up by the request it holds.
  delay_->HoldNext({.op = IoOp::kWrite, .fd = file_->fd()});
  ASSERT_TRUE(reactor_->BlockOn(file_->ReadAt(passed_.buf, 0)).ok());
  delay_->HoldNext({.op = IoOp::kRead, .fd = file_->fd(), .lo = 0, .hi = 4096});
  ASSERT_TRUE(reactor_->BlockOn(file_->ReadAt(passed_.buf, 4096)).ok());  // does not meet it
  reactor_->Spawn(ReadTask(file_.get(), 0, &held_));
  EXPECT_EQ(delay_->held(), 1u);
  delay_->ReleaseAll();
  while (!held_.done) reactor_->RunOnce(true);
  ASSERT_TRUE(reactor_->BlockOn(file_->ReadAt(passed_.buf, 0)).ok());
  EXPECT_EQ(delay_->held(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Engines, DelayEngineTest,
                         ::testing::Values(EngineKind::kUring, EngineKind::kSync),
                         [](const auto& info) {
                           return info.param == EngineKind::kUring ? "Uring" : "Sync";
                         });

}  // namespace
}  // namespace qcow2kit
