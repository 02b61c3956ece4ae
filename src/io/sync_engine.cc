// The blocking fallback engine. File requests complete inside Submit() with one system call.
// Socket requests are tried at once without blocking; those that would block wait in a list
// that Poll() watches with poll(2), so one thread still serves many sockets.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "qcow2kit/reactor.h"

namespace qcow2kit {
namespace {

class SyncEngine final : public Engine {
 public:
  const char* name() const override { return "sync"; }

  bool Submit(IoRequest* req) override {
    if (TryComplete(req)) return true;
    waiting_.push_back(req);
    return false;
  }

  void Cancel(IoRequest* req) override {
    auto it = std::find(waiting_.begin(), waiting_.end(), req);
    if (it == waiting_.end()) return;
    waiting_.erase(it);
    req->result = -ECANCELED;
    cancelled_.push_back(req);
  }

  size_t Poll(bool wait) override {
    // Lists kept between calls (no allocation per poll); taken out of the members so that
    // coroutines resumed below may submit and cancel freely.
    std::vector<IoRequest*> done, still;
    done.swap(done_spare_);
    still.swap(still_spare_);
    done.swap(cancelled_);  // cancelled_ takes the empty spare
    if (!waiting_.empty()) {
      fds_.clear();
      for (IoRequest* r : waiting_) {
        short events = r->op == IoOp::kSendMsg ? POLLOUT : POLLIN;
        fds_.push_back({.fd = r->fd, .events = events, .revents = 0});
      }
      int n = ::poll(fds_.data(), fds_.size(), wait && done.empty() ? -1 : 0);
      if (n > 0) {
        for (size_t i = 0; i < waiting_.size(); ++i) {
          IoRequest* r = waiting_[i];
          if (fds_[i].revents != 0 && TryComplete(r)) {
            done.push_back(r);
          } else {
            still.push_back(r);
          }
        }
        waiting_.swap(still);
      }
    }
    for (IoRequest* r : done) r->waiter.resume();
    const size_t n = done.size();
    done.clear();
    still.clear();
    done_spare_.swap(done);
    still_spare_.swap(still);
    return n;
  }

  size_t in_flight() const override { return waiting_.size() + cancelled_.size(); }

 private:
  // Performs `req` if it can complete without blocking; false if it must wait.
  static bool TryComplete(IoRequest* req) {
    ssize_t r = 0;
    switch (req->op) {
      case IoOp::kRead:
        r = ::pread(req->fd, req->buf, req->len, static_cast<off_t>(req->offset));
        break;
      case IoOp::kWrite:
        r = ::pwrite(req->fd, req->buf, req->len, static_cast<off_t>(req->offset));
        break;
      case IoOp::kFdatasync:
        r = ::fdatasync(req->fd);
        break;
      case IoOp::kFsync:
        r = ::fsync(req->fd);
        break;
      case IoOp::kAccept: {
        pollfd p{.fd = req->fd, .events = POLLIN, .revents = 0};
        if (::poll(&p, 1, 0) == 0) return false;
        r = ::accept4(req->fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (r >= 0) {
          // The socket is used blocking elsewhere (io_uring); only our calls ask not to wait.
          int fd = static_cast<int>(r);
          if (::fcntl(fd, F_SETFL, 0) < 0) {
            ::close(fd);
            r = -1;
          }
        }
        break;
      }
      case IoOp::kRecv:
        r = ::recv(req->fd, req->buf, req->len, static_cast<int>(req->msg_flags) | MSG_DONTWAIT);
        break;
      case IoOp::kSendMsg:
        r = ::sendmsg(req->fd, static_cast<const msghdr*>(req->buf),
                      static_cast<int>(req->msg_flags) | MSG_DONTWAIT | MSG_NOSIGNAL);
        break;
      case IoOp::kPollIn: {
        pollfd p{.fd = req->fd, .events = POLLIN, .revents = 0};
        r = ::poll(&p, 1, 0);
        if (r == 0) return false;
        if (r > 0) r = p.revents;
        break;
      }
      case IoOp::kUringCmd:
        errno = EOPNOTSUPP;
        r = -1;
        break;
    }
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && req->op >= IoOp::kAccept) {
      return false;
    }
    req->result = r < 0 ? -errno : r;
    return true;
  }

  std::vector<IoRequest*> waiting_;
  std::vector<IoRequest*> cancelled_;
  std::vector<IoRequest*> done_spare_;
  std::vector<IoRequest*> still_spare_;
  std::vector<pollfd> fds_;
};

}  // namespace

std::unique_ptr<Engine> MakeSyncEngine() { return std::make_unique<SyncEngine>(); }

}  // namespace qcow2kit
