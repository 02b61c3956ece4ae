#include "export/nbd/server.h"

#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

#include "export/nbd/handshake.h"
#include "export/nbd/session.h"
#include "export/nbd/transport.h"

namespace qcow2kit::nbd {
namespace {

constexpr int kShutdownGraceSeconds = 5;
constexpr int kHandshakeSeconds = 10;  // as qemu-nbd

// A timerfd that becomes readable after `seconds`, or -1.
int Timer(int seconds) {
  int fd = ::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
  if (fd < 0) return -1;
  itimerspec when{};
  when.it_value.tv_sec = seconds;
  ::timerfd_settime(fd, 0, &when, nullptr);
  return fd;
}

}  // namespace

struct Server::Connection {
  explicit Connection(int fd)
      : transport(std::make_unique<PlainTransport>(fd)), in(transport.get()) {}
  std::unique_ptr<Transport> transport;  // becomes a TlsTransport after STARTTLS
  InputBuffer in;
  Session* session = nullptr;  // set once the handshake chose an export
  bool handshake_done = false;
  bool deadline_done = true;
  CancelToken deadline_token;
  Wakeup wakeup;  // ServeConnection, waiting for the deadline task to end
};

Server::Server(std::vector<Export> exports, int listen_fd, ServerOptions options)
    : exports_(std::move(exports)), listen_fd_(listen_fd), options_(options) {}

Server::~Server() = default;

void Server::Shutdown() {
  if (stopping_) return;
  stopping_ = true;
  accept_token_.Cancel();
  signal_token_.Cancel();
  if (!live_.empty()) {
    grace_done_ = false;
    Reactor::Current()->Spawn(AbortStragglers());
  }
  for (Connection* c : live_) {
    if (c->session) {
      c->session->Stop();
    } else {
      c->transport->CancelRecv();
    }
  }
  serve_wakeup_.Notify();
}

Task<void> Server::WatchSignals() {
  Status s = co_await WaitReadable(options_.signal_fd, &signal_token_);
  if (s.ok() && !stopping_) {
    signalfd_siginfo info;
    (void)!::read(options_.signal_fd, &info, sizeof(info));
    Shutdown();
  }
  signal_watch_done_ = true;
  serve_wakeup_.Notify();
}

Task<void> Server::AbortStragglers() {
  // Replies get a few seconds to reach clients that are still reading.
  int timer = Timer(kShutdownGraceSeconds);
  if (timer >= 0) {
    Status s = co_await WaitReadable(timer, &grace_token_);
    ::close(timer);
    if (s.ok()) {
      for (Connection* c : live_) c->transport->Abort();
    }
  }
  grace_done_ = true;
  serve_wakeup_.Notify();
}

Task<Status> Server::Serve() {
  if (options_.signal_fd >= 0) {
    signal_watch_done_ = false;
    Reactor::Current()->Spawn(WatchSignals());
  }
  Status result;
  while (!stopping_) {
    if (options_.max_connections > 0 && connections_ >= options_.max_connections) {
      // At the limit, further clients wait in the listen backlog (as with qemu-nbd).
      co_await serve_wakeup_.Wait();
      continue;
    }
    Result<int> fd = co_await Accept(listen_fd_, &accept_token_);
    if (!fd.ok()) {
      if (stopping_) break;
      int e = fd.status().code();
      if (e == ECONNABORTED || e == EINTR || e == EPROTO) continue;
      if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) {
        // Out of descriptors or memory: wait for a connection to end, then try again.
        if (connections_ > 0) co_await serve_wakeup_.Wait();
        continue;
      }
      result = fd.status().WithContext("accepting connections");
      Shutdown();
      break;
    }
    ++connections_;
    Reactor::Current()->Spawn(ServeConnection(*fd));
  }
  while (connections_ > 0 || !signal_watch_done_) co_await serve_wakeup_.Wait();
  grace_token_.Cancel();
  while (!grace_done_) co_await serve_wakeup_.Wait();
  co_return result;
}

Task<void> Server::HandshakeDeadline(Connection* conn) {
  int timer = Timer(kHandshakeSeconds);
  if (timer >= 0) {
    Status s = co_await WaitReadable(timer, &conn->deadline_token);
    ::close(timer);
    if (s.ok() && !conn->handshake_done) {
      conn->transport->CancelRecv();
      conn->transport->Abort();
    }
  }
  conn->deadline_done = true;
  conn->wakeup.Notify();
}

Task<void> Server::ServeConnection(int fd) {
  Connection conn(fd);
  live_.insert(&conn);
  conn.deadline_done = false;
  Reactor::Current()->Spawn(HandshakeDeadline(&conn));
  auto negotiated = co_await Handshake(&conn.transport, &conn.in, exports_, options_.tls);
  conn.handshake_done = true;
  conn.deadline_token.Cancel();
  while (!conn.deadline_done) co_await conn.wakeup.Wait();
  if (negotiated.ok() && negotiated->has_value() && !stopping_) {
    Session session(conn.transport.get(), &conn.in, **negotiated);
    conn.session = &session;
    co_await session.Run();
    conn.session = nullptr;
  }
  co_await conn.transport->Close();
  live_.erase(&conn);
  --connections_;
  if (!options_.persistent && connections_ == 0) Shutdown();
  serve_wakeup_.Notify();
}

}  // namespace qcow2kit::nbd
