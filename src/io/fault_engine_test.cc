// Tests of FaultInjectionEngine over both real engines: chosen requests fail with the chosen
// errno as File errors, and everything else passes through untouched.
#include "io/fault_engine.h"

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "qcow2kit/file.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

class FaultEngineTest : public ::testing::TestWithParam<EngineKind> {
 protected:
  void SetUp() override {
    auto r = Reactor::Create(GetParam());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    reactor_ = std::move(*r);
    faults_ = new FaultInjectionEngine(reactor_->ReplaceEngine(nullptr));
    reactor_->ReplaceEngine(std::unique_ptr<Engine>(faults_));
  }

  // A file of `size` bytes of `fill`, opened read-write.
  std::unique_ptr<File> MakeFile(const std::string& name, size_t size, uint8_t fill) {
    std::ofstream(dir_ / name, std::ios::binary) << std::string(size, static_cast<char>(fill));
    auto f = File::Open(dir_ / name, true);
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    return f.ok() ? std::move(*f) : nullptr;
  }

  Status Write(File* f, uint64_t off, size_t len, uint8_t v) {
    std::vector<std::byte> buf(len, std::byte{v});
    return reactor_->BlockOn(f->WriteAt(buf, off));
  }
  uint8_t ByteAt(const std::string& name, size_t off) {
    return testing::ReadWholeFile(dir_ / name).at(off);
  }

  testing::ScratchDir dir_;
  std::unique_ptr<Reactor> reactor_;
  FaultInjectionEngine* faults_ = nullptr;  // owned by reactor_
};

TEST_P(FaultEngineTest, PassesEverythingThroughWithoutRules) {
  auto f = MakeFile("a", 8192, 0x11);
  ASSERT_TRUE(f);
  ASSERT_TRUE(Write(f.get(), 100, 50, 0x22).ok());
  std::vector<std::byte> buf(8192);
  auto r = reactor_->BlockOn(f->ReadAt(buf, 0));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 8192u);
  EXPECT_EQ(buf[99], std::byte{0x11});
  EXPECT_EQ(buf[100], std::byte{0x22});
  EXPECT_TRUE(reactor_->BlockOn(f->Sync()).ok());
  EXPECT_EQ(faults_->seen(IoOp::kWrite), 1u);
  EXPECT_EQ(faults_->seen(IoOp::kRead), 1u);
  EXPECT_EQ(faults_->seen(IoOp::kFdatasync), 1u);
  EXPECT_EQ(faults_->failed_total(), 0u);
  EXPECT_STREQ(faults_->name(), GetParam() == EngineKind::kSync ? "sync" : "io_uring");
}

TEST_P(FaultEngineTest, FailsTheNthWriteOnlyAndItNeverReachesTheFile) {
  auto f = MakeFile("a", 4096, 0);
  ASSERT_TRUE(f);
  size_t id = faults_->AddRule({.op = IoOp::kWrite, .nth = 3, .error = EIO});
  EXPECT_TRUE(Write(f.get(), 0, 10, 1).ok());
  EXPECT_TRUE(Write(f.get(), 10, 10, 2).ok());
  Status s = Write(f.get(), 20, 10, 3);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EIO);
  EXPECT_NE(s.message().find("write failed"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("0x14"), std::string::npos) << s.message();  // the offset
  EXPECT_TRUE(Write(f.get(), 30, 10, 4).ok());
  EXPECT_EQ(ByteAt("a", 15), 2);
  EXPECT_EQ(ByteAt("a", 25), 0);  // the failed write did not happen
  EXPECT_EQ(ByteAt("a", 35), 4);
  EXPECT_EQ(faults_->fired(id), 1u);
  EXPECT_EQ(faults_->seen(IoOp::kWrite), 4u);
  EXPECT_EQ(faults_->failed(IoOp::kWrite), 1u);
}

TEST_P(FaultEngineTest, FromNthOnFailsEveryLaterRequest) {
  auto f = MakeFile("a", 4096, 0);
  ASSERT_TRUE(f);
  faults_->AddRule(
      {.op = IoOp::kWrite, .nth = 2, .error = ENOSPC, .mode = FaultRule::Mode::kFromNth});
  EXPECT_TRUE(Write(f.get(), 0, 10, 1).ok());
  for (int i = 0; i < 5; ++i) {
    Status s = Write(f.get(), 100 + i, 1, 9);
    EXPECT_EQ(s.code(), ENOSPC) << s.ToString();
  }
  EXPECT_EQ(faults_->failed(IoOp::kWrite), 5u);
  EXPECT_EQ(ByteAt("a", 100), 0);
  faults_->ClearRules();
  EXPECT_TRUE(Write(f.get(), 100, 1, 9).ok());
  EXPECT_EQ(ByteAt("a", 100), 9);
}

TEST_P(FaultEngineTest, SyncAndReadFailuresBecomeStatuses) {
  auto f = MakeFile("a", 4096, 0x5a);
  ASSERT_TRUE(f);
  faults_->FailOnce(IoOp::kFdatasync, EIO);
  Status s = reactor_->BlockOn(f->Sync());
  EXPECT_EQ(s.code(), EIO);
  EXPECT_NE(s.message().find("fdatasync"), std::string::npos) << s.message();
  EXPECT_TRUE(reactor_->BlockOn(f->Sync()).ok());  // only once

  faults_->FailOnce(IoOp::kRead, ENOMEM);
  std::vector<std::byte> buf(100);
  auto r = reactor_->BlockOn(f->ReadAt(buf, 0));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ENOMEM);
  auto again = reactor_->BlockOn(f->ReadAt(buf, 0));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(buf[0], std::byte{0x5a});
  EXPECT_EQ(faults_->failed(IoOp::kFdatasync), 1u);
  EXPECT_EQ(faults_->failed(IoOp::kRead), 1u);
  EXPECT_EQ(faults_->failed(IoOp::kWrite), 0u);
}

TEST_P(FaultEngineTest, RulesSelectByDescriptorAndOperation) {
  auto a = MakeFile("a", 4096, 0);
  auto b = MakeFile("b", 4096, 0);
  ASSERT_TRUE(a && b);
  faults_->AddRule(
      {.op = IoOp::kWrite, .fd = b->fd(), .nth = 1, .mode = FaultRule::Mode::kFromNth});
  faults_->AddRule({.op = IoOp::kFsync, .nth = 1, .mode = FaultRule::Mode::kFromNth});
  EXPECT_TRUE(Write(a.get(), 0, 10, 1).ok());
  EXPECT_EQ(Write(b.get(), 0, 10, 1).code(), EIO);
  EXPECT_TRUE(Write(a.get(), 10, 10, 2).ok());
  EXPECT_TRUE(reactor_->BlockOn(b->Sync()).ok());  // fdatasync is not fsync
  EXPECT_EQ(ByteAt("a", 15), 2);
  EXPECT_EQ(ByteAt("b", 5), 0);
  EXPECT_EQ(faults_->seen(IoOp::kWrite), 3u);
  EXPECT_EQ(faults_->failed(IoOp::kWrite), 1u);
}

TEST_P(FaultEngineTest, RuleOrdinalsCountFromWhenTheRuleIsAdded) {
  auto f = MakeFile("a", 4096, 0);
  ASSERT_TRUE(f);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(Write(f.get(), i, 1, 1).ok());
  size_t id = faults_->AddRule({.op = IoOp::kWrite, .nth = 2});
  EXPECT_TRUE(Write(f.get(), 10, 1, 1).ok());
  EXPECT_FALSE(Write(f.get(), 11, 1, 1).ok());
  faults_->RemoveRule(id);
  EXPECT_TRUE(Write(f.get(), 11, 1, 1).ok());
  EXPECT_EQ(faults_->fired(id), 1u);
}

Task<void> WriteOne(File* f, uint64_t off, int* failures) {
  std::vector<std::byte> buf(512, std::byte{0x77});
  Status s = co_await f->WriteAt(buf, off);
  if (!s.ok()) {
    EXPECT_EQ(s.code(), EIO);
    ++*failures;
  }
}

TEST_P(FaultEngineTest, FailuresMixWithRequestsInFlight) {
  auto f = MakeFile("a", 64 * 512, 0);
  ASSERT_TRUE(f);
  faults_->AddRule({.op = IoOp::kWrite, .nth = 10});
  faults_->AddRule({.op = IoOp::kWrite, .nth = 20});
  int failures = 0;
  for (int i = 0; i < 64; ++i) reactor_->Spawn(WriteOne(f.get(), i * 512, &failures));
  reactor_->RunUntilIdle();
  EXPECT_EQ(failures, 2);
  auto data = testing::ReadWholeFile(dir_ / "a");
  int written = 0;
  for (int i = 0; i < 64; ++i) written += data[i * 512] == 0x77;
  EXPECT_EQ(written, 62);
  EXPECT_EQ(data[9 * 512], 0);  // requests are submitted in spawn order
  EXPECT_EQ(data[19 * 512], 0);
  EXPECT_EQ(faults_->in_flight(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Engines, FaultEngineTest,
                         ::testing::Values(EngineKind::kUring, EngineKind::kSync),
                         [](const auto& info) {
                           return info.param == EngineKind::kSync ? "Sync" : "Uring";
                         });

}  // namespace
}  // namespace qcow2kit
