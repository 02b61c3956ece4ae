// The io_uring engine. Submit() only queues an SQE; Poll() sends everything queued in one
// io_uring_submit (batching all requests issued since the last loop turn) and completes CQEs.
#include <liburing.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "qcow2kit/reactor.h"

namespace qcow2kit {
namespace {

class UringEngine final : public Engine {
 public:
  ~UringEngine() override {
    // The reactor drains requests before destroying the engine; this is a last resort so the
    // kernel never writes into freed memory.
    if (!initialized_) return;
    while (in_flight_ > 0) Poll(true);
    io_uring_queue_exit(&ring_);
  }

  static Result<std::unique_ptr<Engine>> Create(unsigned entries) {
    auto e = std::unique_ptr<UringEngine>(new UringEngine());
    // Completions that need the task's own work (driver commands such as ublk's) wait for
    // our next entry into the kernel instead of interrupting the thread; the kernel flags
    // when such work is pending so that a turn without a system call can still go and get it
    // (Linux 5.19; older kernels refuse the flags).
    int r = io_uring_queue_init(entries, &e->ring_,
                                IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG);
    if (r == -EINVAL) r = io_uring_queue_init(entries, &e->ring_, 0);
    if (r < 0) return Status::FromErrno(-r, "io_uring_queue_init");
    e->taskrun_flag_ = (e->ring_.flags & IORING_SETUP_TASKRUN_FLAG) != 0;
    e->initialized_ = true;
    return std::unique_ptr<Engine>(std::move(e));
  }

  const char* name() const override { return "io_uring"; }

  bool Submit(IoRequest* req) override {
    io_uring_sqe* sqe = GetSqe();
    if (!sqe) {
      req->result = -EAGAIN;
      return true;
    }
    switch (req->op) {
      case IoOp::kRead:
        io_uring_prep_read(sqe, req->fd, req->buf, req->len, req->offset);
        break;
      case IoOp::kWrite:
        io_uring_prep_write(sqe, req->fd, req->buf, req->len, req->offset);
        break;
      case IoOp::kFdatasync:
        io_uring_prep_fsync(sqe, req->fd, IORING_FSYNC_DATASYNC);
        break;
      case IoOp::kFsync:
        io_uring_prep_fsync(sqe, req->fd, 0);
        break;
      case IoOp::kAccept:
        io_uring_prep_accept(sqe, req->fd, nullptr, nullptr, SOCK_CLOEXEC);
        break;
      case IoOp::kRecv:
        io_uring_prep_recv(sqe, req->fd, req->buf, req->len, static_cast<int>(req->msg_flags));
        break;
      case IoOp::kSendMsg:
        io_uring_prep_sendmsg(sqe, req->fd, static_cast<const msghdr*>(req->buf),
                              req->msg_flags | MSG_NOSIGNAL);
        break;
      case IoOp::kPollIn:
        io_uring_prep_poll_add(sqe, req->fd, POLLIN);
        break;
      case IoOp::kUringCmd:
        io_uring_prep_rw(IORING_OP_URING_CMD, sqe, req->fd, nullptr, 0, 0);
        sqe->cmd_op = req->msg_flags;
        std::memcpy(sqe->cmd, req->buf, kUringCmdBytes);  // the 16 bytes after addr3
        break;
    }
    io_uring_sqe_set_data(sqe, req);
    ++in_flight_;
    ++unsubmitted_;
    return false;
  }

  void Cancel(IoRequest* req) override {
    io_uring_sqe* sqe = GetSqe();
    if (!sqe) return;  // best effort
    io_uring_prep_cancel(sqe, req, 0);
    io_uring_sqe_set_data(sqe, nullptr);  // its own completion is skipped in Poll()
    ++unsubmitted_;
  }

  size_t Poll(bool wait) override {
    if (unsubmitted_ > 0 || (wait && in_flight_ > 0)) {
      int r =
          wait && in_flight_ > 0 ? io_uring_submit_and_wait(&ring_, 1) : io_uring_submit(&ring_);
      if (r >= 0 || r == -EINTR || r == -EAGAIN || r == -EBUSY) unsubmitted_ = 0;
    } else if (taskrun_flag_ && (IO_URING_READ_ONCE(*ring_.sq.kflags) & IORING_SQ_TASKRUN)) {
      io_uring_get_events(&ring_);  // completions waiting for us to run their task work
    }
    size_t done = 0;
    // Completing a request resumes its coroutine, which may submit more; collect first.
    io_uring_cqe* cqe;
    unsigned head;
    IoRequest* batch[64];
    size_t n = 0;
    unsigned seen = 0;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++seen;
      auto* req = static_cast<IoRequest*>(io_uring_cqe_get_data(cqe));
      if (!req) continue;  // completion of a Cancel()
      req->result = cqe->res;
      batch[n++] = req;
      if (n == 64) break;
    }
    io_uring_cq_advance(&ring_, seen);
    in_flight_ -= n;
    for (size_t i = 0; i < n; ++i) {
      batch[i]->waiter.resume();
      ++done;
    }
    return done;
  }

  size_t in_flight() const override { return in_flight_; }

 private:
  UringEngine() = default;

  io_uring_sqe* GetSqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe) return sqe;
    // Submission queue full: hand what is queued to the kernel and retry.
    io_uring_submit(&ring_);
    unsubmitted_ = 0;
    sqe = io_uring_get_sqe(&ring_);
    if (sqe) return sqe;
    // Still full (completion queue backpressure): complete some requests first.
    Poll(true);
    return io_uring_get_sqe(&ring_);
  }

  io_uring ring_{};
  bool initialized_ = false;
  size_t in_flight_ = 0;
  size_t unsubmitted_ = 0;
  bool taskrun_flag_ = false;  // IORING_SETUP_TASKRUN_FLAG is on
};

}  // namespace

Result<std::unique_ptr<Engine>> MakeUringEngine(unsigned queue_entries) {
  return UringEngine::Create(queue_entries);
}

}  // namespace qcow2kit
