#include "io/inbox.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <utility>

#include "qcow2kit/reactor.h"

namespace qcow2kit {

Result<std::unique_ptr<Inbox>> Inbox::Create() {
  int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) return Status::FromErrno(errno, "eventfd for a reactor's inbox");
  return std::unique_ptr<Inbox>(new Inbox(fd));
}

Inbox::~Inbox() {
  ::close(event_fd_);
}

void Inbox::Post(std::function<void()> fn) {
  bool wake = false;
  {
    std::lock_guard lock(mu_);
    queue_.push_back(std::move(fn));
    wake = std::exchange(sleeping_, false);
  }
  if (wake) {
    const uint64_t one = 1;
    // Cannot fail short of a counter overflow, which a pending wake-up already covers.
    (void)!::write(event_fd_, &one, sizeof one);
  }
}

void Inbox::Stop() {
  Post([this] { stopped_ = true; });
}

Task<void> Inbox::Serve() {
  std::vector<std::function<void()>> batch;
  while (!stopped_) {
    {
      std::lock_guard lock(mu_);
      if (queue_.empty()) {
        sleeping_ = true;
      } else {
        std::swap(batch, queue_);
      }
    }
    if (batch.empty()) {
      IoAwaiter poll{};
      poll.req.op = IoOp::kPollIn;
      poll.req.fd = event_fd_;
      const int64_t woke = co_await poll;
      (void)woke;  // an error (none is expected) just means: look at the queue again
      uint64_t count;
      (void)!::read(event_fd_, &count, sizeof count);  // reset; EAGAIN if nothing was written
      std::lock_guard lock(mu_);
      sleeping_ = false;
      continue;
    }
    for (auto& fn : batch) fn();
    batch.clear();
  }
}

}  // namespace qcow2kit
