#include "io/worker_pool.h"

#include <utility>

#include "qcow2kit/reactor.h"

namespace qcow2kit {

Result<std::unique_ptr<WorkerPool>> WorkerPool::Create(unsigned threads) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  auto inbox = Inbox::Create();
  if (!inbox.ok()) return inbox.status();
  std::unique_ptr<WorkerPool> pool(new WorkerPool(std::move(*inbox)));
  for (unsigned i = 0; i < threads; ++i)
    pool->threads_.emplace_back([p = pool.get()] { p->Work(); });
  return pool;
}

WorkerPool::~WorkerPool() {
  if (!stopped_) Stop();
}

void WorkerPool::Enqueue(std::function<void()> fn, std::coroutine_handle<> waiter) {
  {
    std::lock_guard lock(mu_);
    jobs_.push_back(Job{std::move(fn), waiter});
  }
  cv_.notify_one();
}

void WorkerPool::Work() {
  for (;;) {
    Job job;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stopping, and nothing left to run
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    job.fn();
    // The waiter resumes on its reactor's thread, from the loop (not inside the inbox).
    inbox_->Post([h = job.waiter] { Reactor::Current()->Post(h); });
  }
}

void WorkerPool::Stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
  inbox_->Stop();
  stopped_ = true;
}

}  // namespace qcow2kit
