// AsyncMutex: mutual exclusion between coroutines of one reactor. Lock() suspends the caller
// while another coroutine holds the mutex; Unlock() hands it to the next waiter in FIFO order.
// Not thread-safe: all users run on the same reactor.
#pragma once

#include <coroutine>
#include <deque>

#include "qcow2kit/reactor.h"

namespace qcow2kit {

class AsyncMutex {
 public:
  class [[nodiscard]] Guard {
   public:
    explicit Guard(AsyncMutex* m) : m_(m) {}
    Guard(Guard&& o) noexcept : m_(std::exchange(o.m_, nullptr)) {}
    Guard& operator=(Guard&&) = delete;
    ~Guard() { Release(); }
    void Release() {
      if (m_) std::exchange(m_, nullptr)->Unlock();
    }

   private:
    AsyncMutex* m_;
  };

  bool locked() const { return locked_; }

  // co_await mutex.Lock() -> Guard that unlocks when destroyed.
  auto Lock() {
    struct Awaiter {
      AsyncMutex* m;
      bool await_ready() const noexcept {
        if (m->locked_) return false;
        m->locked_ = true;
        return true;
      }
      void await_suspend(std::coroutine_handle<> h) { m->waiters_.push_back(h); }
      Guard await_resume() const noexcept { return Guard(m); }
    };
    return Awaiter{this};
  }

  void Unlock() {
    if (waiters_.empty()) {
      locked_ = false;
      return;
    }
    // Ownership passes directly to the next waiter (locked_ stays true); it runs from the loop.
    auto next = waiters_.front();
    waiters_.pop_front();
    Reactor::Current()->Post(next);
  }

 private:
  bool locked_ = false;
  std::deque<std::coroutine_handle<>> waiters_;
};

}  // namespace qcow2kit
