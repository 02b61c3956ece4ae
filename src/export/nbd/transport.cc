#include "export/nbd/transport.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace qcow2kit::nbd {

PlainTransport::~PlainTransport() { ::close(fd_); }

void PlainTransport::Abort() { ::shutdown(fd_, SHUT_RDWR); }

Task<Result<size_t>> PlainTransport::RecvSome(std::span<std::byte> buf) {
  co_return co_await qcow2kit::RecvSome(fd_, buf, &recv_token_);
}

Task<Status> PlainTransport::RecvExact(std::span<std::byte> buf) {
  co_return co_await qcow2kit::RecvExact(fd_, buf);
}

Task<Status> PlainTransport::SendAll(std::span<iovec> iov) {
  co_return co_await qcow2kit::SendAll(fd_, iov);
}

InputBuffer::InputBuffer(Transport* transport, size_t capacity)
    : transport_(transport), buf_(capacity) {}

Task<Status> InputBuffer::Need(size_t n) {
  while (available() < n) {
    if (begin_ == end_) begin_ = end_ = 0;
    if (buf_.size() - begin_ < n) {  // not enough room behind the data: move it to the front
      std::memmove(buf_.data(), buf_.data() + begin_, available());
      end_ -= begin_;
      begin_ = 0;
    }
    Result<size_t> got = co_await transport_->RecvSome(std::span(buf_).subspan(end_));
    if (!got.ok()) co_return got.status();
    if (*got == 0) co_return Status::Error(EPIPE, "the client closed the connection");
    end_ += *got;
  }
  co_return Status::Ok();
}

Task<Status> InputBuffer::ReadInto(std::span<std::byte> dst) {
  if (dst.empty()) co_return Status::Ok();
  size_t from_buffer = std::min(dst.size(), available());
  std::memcpy(dst.data(), data(), from_buffer);
  Consume(from_buffer);
  if (from_buffer == dst.size()) co_return Status::Ok();
  co_return co_await transport_->RecvExact(dst.subspan(from_buffer));
}

std::vector<std::byte> InputBuffer::Switch(Transport* transport) {
  std::vector<std::byte> rest(buf_.begin() + static_cast<ptrdiff_t>(begin_),
                              buf_.begin() + static_cast<ptrdiff_t>(end_));
  begin_ = end_ = 0;
  transport_ = transport;
  return rest;
}

Task<Status> InputBuffer::Skip(uint64_t n) {
  while (n > 0) {
    if (available() == 0) {
      Status s = co_await Need(1);
      if (!s.ok()) co_return s;
    }
    size_t k = static_cast<size_t>(std::min<uint64_t>(n, available()));
    Consume(k);
    n -= k;
  }
  co_return Status::Ok();
}

}  // namespace qcow2kit::nbd
