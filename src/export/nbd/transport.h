// Transport: the byte stream of one NBD connection (plain socket today; TLS plugs in behind
// the same interface), and InputBuffer, which reads requests from it in large batches.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "io/socket.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit::nbd {

class Transport {
 public:
  virtual ~Transport() = default;
  // Receives at least one byte; 0 means the peer closed. A cancelled wait fails with
  // ECANCELED.
  virtual Task<Result<size_t>> RecvSome(std::span<std::byte> buf) = 0;
  // Receives exactly buf.size() bytes.
  virtual Task<Status> RecvExact(std::span<std::byte> buf) = 0;
  // Sends every byte of `iov` (the iovecs are consumed).
  virtual Task<Status> SendAll(std::span<iovec> iov) = 0;
  // Ends a RecvSome that is waiting (used at shutdown).
  virtual void CancelRecv() = 0;
  // Says goodbye at the protocol level before the socket closes (TLS close notify).
  virtual Task<void> Close() = 0;
  // Breaks the connection at once: every wait on it ends with an error (a client that stops
  // reading must not hold up shutdown).
  virtual void Abort() = 0;
};

// A connected socket, owned (closed on destruction).
class PlainTransport final : public Transport {
 public:
  explicit PlainTransport(int fd) : fd_(fd) {}
  ~PlainTransport() override;
  Task<Result<size_t>> RecvSome(std::span<std::byte> buf) override;
  Task<Status> RecvExact(std::span<std::byte> buf) override;
  Task<Status> SendAll(std::span<iovec> iov) override;
  void CancelRecv() override { recv_token_.Cancel(); }
  Task<void> Close() override { co_return; }
  void Abort() override;
  int fd() const { return fd_; }

 private:
  int fd_;
  CancelToken recv_token_;
};

// Buffers what the client sends so that one recv() brings in many pipelined requests.
class InputBuffer {
 public:
  explicit InputBuffer(Transport* transport, size_t capacity = 256 << 10);

  // Makes at least `n` (<= capacity) bytes available at data(). Fails with EPIPE if the
  // stream ends first (quietly: available() tells whether it ended between messages).
  Task<Status> Need(size_t n);
  const std::byte* data() const { return buf_.data() + begin_; }
  size_t available() const { return end_ - begin_; }
  void Consume(size_t n) { begin_ += n; }
  // Copies the next dst.size() bytes into dst (buffered bytes first, then straight from the
  // transport).
  Task<Status> ReadInto(std::span<std::byte> dst);
  // Reads and throws away `n` bytes.
  Task<Status> Skip(uint64_t n);
  // Hands over the bytes received and not consumed, and reads from `transport` from now on
  // (when TLS starts).
  std::vector<std::byte> Switch(Transport* transport);

 private:
  Transport* transport_;
  std::vector<std::byte> buf_;
  size_t begin_ = 0;
  size_t end_ = 0;
};

}  // namespace qcow2kit::nbd
