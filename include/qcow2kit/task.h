// Task<T>: a lazily started C++20 coroutine returning T.
//
// A Task does nothing until it is co_awaited (or handed to Reactor::Spawn / BlockOn). Awaiting
// a Task runs it at once; if it finishes without suspending (a cache hit, the blocking engine)
// the awaiter simply continues, so loops over such tasks use no extra stack even where the
// compiler does not turn symmetric transfer into a tail call (sanitizer builds). If it
// suspends, it later resumes the awaiter from its final suspend point.
// Tasks never throw on the I/O path: failures travel as Status / Result<T> values.
#pragma once

#include <coroutine>
#include <cstddef>
#include <exception>
#include <optional>
#include <utility>

namespace qcow2kit {

template <typename T>
class Task;

namespace detail {

// Coroutine frames come from per-thread free lists of size classes: tasks start and end at a
// high rate on the I/O path (several per request), and a task never changes threads. Large
// frames, and every frame in sanitizer builds (so that ASan still sees use-after-free), use
// the global allocator.
void* AllocateFrame(std::size_t size);
void FreeFrame(void* frame, std::size_t size) noexcept;

struct FinalAwaiter {
  bool await_ready() const noexcept { return false; }
  template <typename Promise>
  std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> h) const noexcept {
    auto& p = h.promise();
    if (p.running_inline) {  // the awaiter is still inside await_suspend: let it continue
      p.completed_inline = true;
      return std::noop_coroutine();
    }
    return p.continuation ? p.continuation : std::noop_coroutine();
  }
  void await_resume() const noexcept {}
};

struct PromiseBase {
  static void* operator new(std::size_t size) { return AllocateFrame(size); }
  static void operator delete(void* frame, std::size_t size) noexcept { FreeFrame(frame, size); }

  std::coroutine_handle<> continuation;
  bool running_inline = false;    // started by an awaiter that has not returned yet
  bool completed_inline = false;  // finished before that awaiter returned
  std::suspend_always initial_suspend() const noexcept { return {}; }
  FinalAwaiter final_suspend() const noexcept { return {}; }
  // Exceptions are not part of the I/O contract; one escaping a task is a bug.
  void unhandled_exception() const noexcept { std::terminate(); }
};

template <typename T>
struct Promise : PromiseBase {
  std::optional<T> value;
  Task<T> get_return_object() noexcept;
  template <typename U>
  void return_value(U&& v) {
    value.emplace(std::forward<U>(v));
  }
};

template <>
struct Promise<void> : PromiseBase {
  Task<void> get_return_object() noexcept;
  void return_void() const noexcept {}
};

}  // namespace detail

template <typename T = void>
class [[nodiscard]] Task {
 public:
  using promise_type = detail::Promise<T>;
  using Handle = std::coroutine_handle<promise_type>;

  Task() = default;
  explicit Task(Handle h) : h_(h) {}
  Task(Task&& o) noexcept : h_(std::exchange(o.h_, {})) {}
  Task& operator=(Task&& o) noexcept {
    if (this != &o) {
      Reset();
      h_ = std::exchange(o.h_, {});
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  ~Task() { Reset(); }

  bool valid() const { return static_cast<bool>(h_); }
  bool done() const { return h_ && h_.done(); }

  // Awaiting starts the task and resumes the awaiter when it completes.
  auto operator co_await() && noexcept {
    struct Awaiter {
      Handle h;
      bool await_ready() const noexcept { return !h || h.done(); }
      bool await_suspend(std::coroutine_handle<> awaiting) noexcept {
        auto& p = h.promise();
        p.continuation = awaiting;
        p.running_inline = true;
        h.resume();
        p.running_inline = false;
        return !p.completed_inline;  // suspend only if the task is still running
      }
      T await_resume() {
        if constexpr (!std::is_void_v<T>) return std::move(*h.promise().value);
      }
    };
    return Awaiter{h_};
  }

  // For executors: the raw handle, and the result once done().
  Handle handle() const { return h_; }
  T TakeResult() {
    if constexpr (!std::is_void_v<T>) return std::move(*h_.promise().value);
  }

 private:
  void Reset() {
    if (h_) h_.destroy();
    h_ = {};
  }
  Handle h_;
};

namespace detail {
template <typename T>
Task<T> Promise<T>::get_return_object() noexcept {
  return Task<T>(std::coroutine_handle<Promise<T>>::from_promise(*this));
}
inline Task<void> Promise<void>::get_return_object() noexcept {
  return Task<void>(std::coroutine_handle<Promise<void>>::from_promise(*this));
}
}  // namespace detail

}  // namespace qcow2kit
