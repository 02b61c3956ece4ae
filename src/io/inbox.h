// Inbox: how other threads hand work to a reactor. Post() (from any thread) queues a
// function; Serve(), a task spawned on the inbox's reactor, runs the queued functions there in
// the order they were posted. It sleeps on an eventfd (one poll on the reactor's ring) only
// when the queue is empty, so a busy reactor takes messages without system calls on either
// side beyond the one wake-up write.
//
// Functions run on the inbox's thread: that is where they may create tasks (a task never
// changes threads) and touch that thread's state.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

class Inbox {
 public:
  static Result<std::unique_ptr<Inbox>> Create();
  ~Inbox();
  Inbox(const Inbox&) = delete;
  Inbox& operator=(const Inbox&) = delete;

  // Any thread. Nothing may be posted once the Stop() function has run.
  void Post(std::function<void()> fn);
  // Any thread: Serve() returns once the functions posted before this one have run.
  void Stop();
  // Runs posted functions on the current reactor until Stop().
  Task<void> Serve();

 private:
  explicit Inbox(int event_fd) : event_fd_(event_fd) {}

  const int event_fd_;
  std::mutex mu_;
  std::vector<std::function<void()>> queue_;  // guarded by mu_
  bool sleeping_ = false;                     // guarded by mu_: Serve waits on the eventfd
  bool stopped_ = false;                      // Serve's thread only
};

}  // namespace qcow2kit
