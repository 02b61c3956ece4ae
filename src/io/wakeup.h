// Wakeup: resumes one waiting coroutine of the current reactor. Waiters re-check their
// condition in a loop, so a Notify() with nobody waiting needs no memory:
//
//   while (!ready) co_await wakeup.Wait();   // one side
//   ready = true; wakeup.Notify();           // the other
#pragma once

#include <coroutine>
#include <utility>

#include "qcow2kit/reactor.h"

namespace qcow2kit {

class Wakeup {
 public:
  auto Wait() {
    struct Awaiter {
      Wakeup* w;
      bool await_ready() const noexcept { return false; }
      void await_suspend(std::coroutine_handle<> h) noexcept { w->waiter_ = h; }
      void await_resume() const noexcept {}
    };
    return Awaiter{this};
  }
  void Notify() {
    if (waiter_) Reactor::Current()->Post(std::exchange(waiter_, {}));
  }

 private:
  std::coroutine_handle<> waiter_;
};

}  // namespace qcow2kit
