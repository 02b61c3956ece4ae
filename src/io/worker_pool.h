// WorkerPool: threads that run CPU-heavy functions (compression) for the tasks of one reactor,
// so that a single-threaded I/O pipeline can use every core. A task co_awaits Run(fn); fn runs
// on a pool thread and the task resumes on its own reactor afterwards (through an Inbox).
//
//   auto pool = *WorkerPool::Create(0);   // on the reactor's thread
//   reactor->Spawn(pool->Serve());
//   ... tasks: co_await pool->Run([&] { Compress(...); });
//   pool->Stop();                         // no Run() may be pending
//   reactor->RunUntilIdle();              // Serve() returns; then destroy the pool
#pragma once

#include <condition_variable>
#include <coroutine>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "io/inbox.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

class WorkerPool {
 public:
  // `threads` 0: one per core.
  static Result<std::unique_ptr<WorkerPool>> Create(unsigned threads);
  ~WorkerPool();  // joins the threads (Stop() if not done yet)
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  unsigned threads() const { return static_cast<unsigned>(threads_.size()); }

  // Delivers completions to the reactor it runs on; spawn it there.
  Task<void> Serve() { return inbox_->Serve(); }
  // Joins the threads and ends Serve() once the completions already posted have run.
  void Stop();

  struct RunAwaiter {
    WorkerPool* pool;
    std::function<void()> fn;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) { pool->Enqueue(std::move(fn), h); }
    void await_resume() const noexcept {}
  };
  // Runs `fn` on a pool thread. Whatever fn touches must stay alive until the await ends.
  RunAwaiter Run(std::function<void()> fn) { return RunAwaiter{this, std::move(fn)}; }

 private:
  explicit WorkerPool(std::unique_ptr<Inbox> inbox) : inbox_(std::move(inbox)) {}
  void Enqueue(std::function<void()> fn, std::coroutine_handle<> waiter);
  void Work();

  std::unique_ptr<Inbox> inbox_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  struct Job {
    std::function<void()> fn;
    std::coroutine_handle<> waiter;
  };
  std::deque<Job> jobs_;   // guarded by mu_
  bool stopping_ = false;  // guarded by mu_
  bool stopped_ = false;   // the owner's thread only
};

}  // namespace qcow2kit
