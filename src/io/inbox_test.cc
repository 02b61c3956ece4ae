// Inbox across real threads: functions posted from several threads all run, on the inbox's
// thread, each sender's in order; a round trip resumes a coroutine on its own thread; Stop()
// ends the loop after what was posted before it. Also run under ThreadSanitizer.
#include "io/inbox.h"

#include <atomic>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "qcow2kit/reactor.h"
#include "testing/test_util.h"

namespace qcow2kit {
namespace {

TEST(InboxTest, RunsEveryPostOnItsThreadInOrderPerSender) {
  auto inbox = Inbox::Create();
  ASSERT_TRUE(inbox.ok()) << inbox.status().ToString();
  constexpr int kSenders = 3;
  constexpr int kPosts = 20000;
  std::vector<int> last_seen(kSenders, -1);  // touched on the inbox's thread only
  bool in_order = true;
  int ran = 0;
  std::thread::id inbox_thread;
  bool on_inbox_thread = true;
  std::thread server([&] {
    auto reactor = testing::NewReactor();
    inbox_thread = std::this_thread::get_id();
    reactor->BlockOn((*inbox)->Serve());
  });
  std::vector<std::thread> senders;
  for (int s = 0; s < kSenders; ++s) {
    senders.emplace_back([&, s] {
      for (int i = 0; i < kPosts; ++i) {
        (*inbox)->Post([&, s, i] {
          in_order &= last_seen[s] == i - 1;
          last_seen[s] = i;
          on_inbox_thread &= std::this_thread::get_id() == inbox_thread;
          ++ran;
        });
        if (i % 1000 == 0) std::this_thread::yield();  // let the server fall asleep sometimes
      }
    });
  }
  for (auto& t : senders) t.join();
  (*inbox)->Stop();
  server.join();
  EXPECT_EQ(ran, kSenders * kPosts);
  EXPECT_TRUE(in_order);
  EXPECT_TRUE(on_inbox_thread);
}

// A coroutine on one reactor asks another thread's reactor to run something and is resumed
// on its own thread with the answer, as SharedDevice's ports do with the owner.
TEST(InboxTest, RoundTripResumesOnTheCallersThread) {
  auto owner_inbox = Inbox::Create();
  auto caller_inbox = Inbox::Create();
  ASSERT_TRUE(owner_inbox.ok() && caller_inbox.ok());
  std::thread owner([&] {
    auto reactor = testing::NewReactor();
    reactor->BlockOn((*owner_inbox)->Serve());
  });
  struct Ask {
    Inbox* owner;
    Inbox* reply;
    int question;
    int answer = 0;
    std::thread::id answered_on;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) {
      owner->Post([this, h] {
        answer = question * 2;
        answered_on = std::this_thread::get_id();
        reply->Post([h] { Reactor::Current()->Post(h); });
      });
    }
    int await_resume() const noexcept { return answer; }
  };
  auto reactor = testing::NewReactor();
  reactor->Spawn((*caller_inbox)->Serve());
  int sum = 0;
  bool resumed_here = true;
  bool answered_elsewhere = true;
  const auto me = std::this_thread::get_id();
  reactor->BlockOn([&]() -> Task<void> {
    for (int i = 1; i <= 500; ++i) {
      Ask ask{owner_inbox->get(), caller_inbox->get(), i, 0, {}};
      const int answer = co_await ask;
      sum += answer;
      resumed_here &= std::this_thread::get_id() == me;
      answered_elsewhere &= ask.answered_on != me;
    }
  }());
  (*caller_inbox)->Stop();
  reactor->RunUntilIdle();
  (*owner_inbox)->Stop();
  owner.join();
  EXPECT_EQ(sum, 500 * 501);
  EXPECT_TRUE(resumed_here);
  EXPECT_TRUE(answered_elsewhere);
}

}  // namespace
}  // namespace qcow2kit
