#include "qcow2kit/reactor.h"

#include <cstdio>
#include <cstdlib>

namespace qcow2kit {
namespace {
thread_local Reactor* current_reactor = nullptr;
}  // namespace

// A detached coroutine that owns a spawned Task and keeps the reactor's task count.
struct SpawnedTask {
  struct promise_type {
    static void* operator new(std::size_t size) { return detail::AllocateFrame(size); }
    static void operator delete(void* frame, std::size_t size) noexcept {
      detail::FreeFrame(frame, size);
    }
    SpawnedTask get_return_object() noexcept { return {}; }
    std::suspend_never initial_suspend() const noexcept { return {}; }
    std::suspend_never final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    void unhandled_exception() const noexcept { std::terminate(); }
  };
  static SpawnedTask Run(Reactor* r, Task<void> task) {
    co_await std::move(task);
    --r->live_tasks_;
  }
};

Result<EngineKind> ParseEngineKind(const std::string& name) {
  if (name == "auto") return EngineKind::kAuto;
  if (name == "io_uring" || name == "uring" || name == "native") return EngineKind::kUring;
  if (name == "sync" || name == "threads") return EngineKind::kSync;
  return Status::Invalid("Invalid aio option: " + name);
}

Reactor::Reactor(std::unique_ptr<Engine> engine) : engine_(std::move(engine)) {
  previous_ = current_reactor;
  current_reactor = this;
}

Reactor::~Reactor() {
  RunUntilIdle();
  while (engine_->in_flight() > 0) engine_->Poll(true);
  current_reactor = previous_;
}

Result<std::unique_ptr<Reactor>> Reactor::Create(EngineKind kind, unsigned queue_entries) {
  std::unique_ptr<Engine> engine;
  if (kind != EngineKind::kSync) {
    auto uring = MakeUringEngine(queue_entries);
    if (uring.ok()) {
      engine = std::move(*uring);
    } else if (kind == EngineKind::kUring) {
      return uring.status();
    }
  }
  if (!engine) engine = MakeSyncEngine();
  return std::make_unique<Reactor>(std::move(engine));
}

Reactor* Reactor::Current() { return current_reactor; }

std::unique_ptr<Engine> Reactor::ReplaceEngine(std::unique_ptr<Engine> engine) {
  while (engine_ && engine_->in_flight() > 0) engine_->Poll(true);
  std::swap(engine_, engine);
  return engine;
}

void Reactor::Spawn(Task<void> task) {
  ++live_tasks_;
  SpawnedTask::Run(this, std::move(task));
}

Task<void> Reactor::StoreVoid(Task<void> task, bool* done) {
  co_await std::move(task);
  *done = true;
}

bool Reactor::RunOnce(bool wait) {
  bool progressed = false;
  // Resume what was posted before this turn; coroutines posted meanwhile wait for the next.
  for (size_t n = ready_.size(); n > 0 && !ready_.empty(); --n) {
    auto h = ready_.front();
    ready_.pop_front();
    h.resume();
    progressed = true;
  }
  bool block = wait && !progressed && ready_.empty();
  if (engine_->Poll(block && engine_->in_flight() > 0) > 0) progressed = true;
  return progressed || engine_->in_flight() > 0 || !ready_.empty();
}

void Reactor::DriveUntil(const bool* done) {
  while (!*done) {
    if (!RunOnce(true)) {
      // Nothing runnable and no I/O in flight: the task waits on something that can never
      // happen. That is a bug in the caller; fail loudly rather than hang.
      std::fprintf(stderr, "qcow2kit: internal error: task deadlocked (nothing in flight)\n");
      std::abort();
    }
  }
}

void Reactor::RunUntilIdle() {
  while (live_tasks_ > 0) {
    if (!RunOnce(true)) {
      std::fprintf(stderr, "qcow2kit: internal error: %zu task(s) can never finish\n",
                   live_tasks_);
      std::abort();
    }
  }
}

}  // namespace qcow2kit
