#include "io/socket.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace qcow2kit {

// Publishes the request of an awaiter in a token for as long as the scope lives.
class TokenScope {
 public:
  TokenScope(CancelToken* token, IoRequest* req) : token_(token) {
    if (token_) token_->req_ = req;
  }
  ~TokenScope() {
    if (token_) token_->req_ = nullptr;
  }

 private:
  CancelToken* token_;
};

void CancelToken::Cancel() {
  if (req_) Reactor::Current()->engine().Cancel(req_);
}

namespace {

Task<int64_t> Perform(IoOp code, int fd, void* buf, uint32_t len, uint32_t msg_flags,
                      CancelToken* token) {
  IoAwaiter op{};
  op.req.op = code;
  op.req.fd = fd;
  op.req.buf = buf;
  op.req.len = len;
  op.req.msg_flags = msg_flags;
  TokenScope scope(token, &op.req);
  co_return co_await op;
}

}  // namespace

Result<int> ListenUnix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Status::Invalid("socket path too long (at most " +
                           std::to_string(sizeof(addr.sun_path) - 1) + " bytes): " + path);
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "socket");
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0 ||
      ::listen(fd, 128) < 0) {
    int e = errno;
    ::close(fd);
    return Status::FromErrno(e, "Failed to bind socket to " + path);
  }
  return fd;
}

Result<int> ListenTcp(const std::string& address, uint16_t port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* list = nullptr;
  std::string service = std::to_string(port);
  int r = ::getaddrinfo(address.empty() ? nullptr : address.c_str(), service.c_str(), &hints,
                        &list);
  if (r != 0) {
    return Status::Invalid("address resolution failed for " + address + ":" + service + ": " +
                           ::gai_strerror(r));
  }
  Status last = Status::Invalid("no address for " + address);
  for (addrinfo* ai = list; ai; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last = Status::FromErrno(errno, "socket");
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(fd, 128) == 0) {
      ::freeaddrinfo(list);
      return fd;
    }
    last = Status::FromErrno(errno, "Failed to bind socket to " +
                                        (address.empty() ? std::string("0.0.0.0") : address) +
                                        ":" + service);
    ::close(fd);
  }
  ::freeaddrinfo(list);
  return last;
}

Task<Result<int>> Accept(int listen_fd, CancelToken* token) {
  int64_t r = co_await Perform(IoOp::kAccept, listen_fd, nullptr, 0, 0, token);
  if (r < 0) co_return Status::FromErrno(static_cast<int>(-r), "accept");
  int fd = static_cast<int>(r);
  // Requests and replies are small and latency-bound (the NBD spec asks for this).
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // fails harmlessly on unix
  co_return fd;
}

Task<Result<size_t>> RecvSome(int fd, std::span<std::byte> buf, CancelToken* token) {
  for (;;) {
    int64_t r = co_await Perform(IoOp::kRecv, fd, buf.data(),
                                 static_cast<uint32_t>(std::min<size_t>(buf.size(), 1u << 30)),
                                 0, token);
    if (r == -EINTR || r == -EAGAIN) continue;
    if (r < 0) co_return Status::FromErrno(static_cast<int>(-r), "recv");
    co_return static_cast<size_t>(r);
  }
}

Task<Status> RecvExact(int fd, std::span<std::byte> buf) {
  while (!buf.empty()) {
    uint32_t len = static_cast<uint32_t>(std::min<size_t>(buf.size(), 1u << 30));
    int64_t r = co_await Perform(IoOp::kRecv, fd, buf.data(), len, MSG_WAITALL, nullptr);
    if (r == -EINTR || r == -EAGAIN) continue;
    if (r < 0) co_return Status::FromErrno(static_cast<int>(-r), "recv");
    if (r == 0) co_return Status::IoError("connection closed in the middle of a message");
    buf = buf.subspan(static_cast<size_t>(r));
  }
  co_return Status::Ok();
}

Task<Status> SendAll(int fd, std::span<iovec> iov) {
  bool direct = true;
  while (!iov.empty()) {
    msghdr msg{};
    msg.msg_iov = iov.data();
    msg.msg_iovlen = std::min<size_t>(iov.size(), IOV_MAX);
    int64_t r;
    if (direct) {
      // Replies usually fit in the socket buffer: sending at once saves a trip through the
      // engine (and a loop turn of latency). Only what would block waits in the engine.
      ssize_t n = ::sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
      r = n >= 0 ? n : -errno;
      if (r == -EAGAIN || r == -EWOULDBLOCK) {
        direct = false;
        continue;
      }
    } else {
      r = co_await Perform(IoOp::kSendMsg, fd, &msg, 0, 0, nullptr);
    }
    if (r == -EINTR || r == -EAGAIN) continue;
    if (r < 0) co_return Status::FromErrno(static_cast<int>(-r), "send");
    // Skip what was sent, possibly ending inside an iovec.
    size_t sent = static_cast<size_t>(r);
    while (!iov.empty() && sent >= iov.front().iov_len) {
      sent -= iov.front().iov_len;
      iov = iov.subspan(1);
    }
    if (sent > 0) {
      iov.front().iov_base = static_cast<char*>(iov.front().iov_base) + sent;
      iov.front().iov_len -= sent;
    }
  }
  co_return Status::Ok();
}

Task<Status> WaitReadable(int fd, CancelToken* token) {
  int64_t r = co_await Perform(IoOp::kPollIn, fd, nullptr, 0, 0, token);
  if (r < 0) co_return Status::FromErrno(static_cast<int>(-r), "poll");
  co_return Status::Ok();
}

}  // namespace qcow2kit
