// Sockets over the reactor: listening endpoints for the exports, and coroutine helpers that
// accept, receive and send whole messages through the current reactor's engine.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "qcow2kit/reactor.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

// Lets another coroutine end a wait early: the waiting call publishes its request here while
// it is suspended, and Cancel() makes it complete with -ECANCELED.
class CancelToken {
 public:
  void Cancel();
  bool waiting() const { return req_ != nullptr; }

 private:
  friend class TokenScope;
  IoRequest* req_ = nullptr;
};

// Listens on a unix socket at `path` (a stale socket file there is replaced).
Result<int> ListenUnix(const std::string& path);
// Listens on TCP `address`:`port` (address "" = all interfaces).
Result<int> ListenTcp(const std::string& address, uint16_t port);

// Waits for a connection; returns the new socket (blocking mode, close-on-exec).
Task<Result<int>> Accept(int listen_fd, CancelToken* token = nullptr);
// Receives what is available, at least one byte; 0 means the peer closed the connection.
Task<Result<size_t>> RecvSome(int fd, std::span<std::byte> buf, CancelToken* token = nullptr);
// Receives exactly buf.size() bytes; an early end of stream is an error.
Task<Status> RecvExact(int fd, std::span<std::byte> buf);
// Sends every byte of the iovecs (which it consumes), however the kernel splits them.
Task<Status> SendAll(int fd, std::span<iovec> iov);
// Waits until `fd` is readable.
Task<Status> WaitReadable(int fd, CancelToken* token = nullptr);

}  // namespace qcow2kit
