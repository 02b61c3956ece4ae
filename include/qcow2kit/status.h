// Status and Result<T>: how every fallible operation in qcow2kit reports failure.
//
// The I/O path never throws. A Status is either OK or an error made of an errno-style code
// (EIO, EINVAL, ENOTSUP, ...) and a message that names the problem, e.g.
// "L2 table at offset 0x50000 is not cluster aligned". Result<T> carries a value or a Status.
#pragma once

#include <cassert>
#include <cerrno>
#include <string>
#include <utility>
#include <variant>

namespace qcow2kit {

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  static Status Ok() { return Status(); }
  // `code` is a positive errno value; 0 is reserved for OK.
  static Status Error(int code, std::string message) { return Status(code, std::move(message)); }
  // Shorthands for the common kinds of failure.
  static Status Invalid(std::string m) { return Error(EINVAL, std::move(m)); }
  static Status Corrupt(std::string m) { return Error(EUCLEAN, std::move(m)); }
  static Status Unsupported(std::string m) { return Error(ENOTSUP, std::move(m)); }
  static Status IoError(std::string m) { return Error(EIO, std::move(m)); }
  // An error from a system call: `what` is prefixed to strerror(err).
  static Status FromErrno(int err, const std::string& what);

  bool ok() const { return code_ == 0; }
  explicit operator bool() const { return ok(); }
  int code() const { return code_; }
  const std::string& message() const { return message_; }
  // "message" or, for errors whose message is empty, strerror(code).
  std::string ToString() const;
  // Returns a copy with `context` prepended ("context: message").
  Status WithContext(const std::string& context) const;

 private:
  Status(int code, std::string message) : code_(code), message_(std::move(message)) {
    assert(code != 0);
  }
  int code_ = 0;
  std::string message_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    assert(!std::get<Status>(v_).ok() && "Result built from an OK status has no value");
  }

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<1>(v_);
  }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace qcow2kit

// Early-return helpers. The CO_ variants are for coroutines.
#define QK_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::qcow2kit::Status qk_status_ = (expr);  \
    if (!qk_status_.ok()) return qk_status_; \
  } while (0)
#define QK_CO_RETURN_IF_ERROR(expr)             \
  do {                                          \
    ::qcow2kit::Status qk_status_ = (expr);     \
    if (!qk_status_.ok()) co_return qk_status_; \
  } while (0)
#define QK_CONCAT_INNER(a, b) a##b
#define QK_CONCAT(a, b) QK_CONCAT_INNER(a, b)
// QK_ASSIGN_OR_RETURN(auto x, ComputeX()); — for plain functions.
#define QK_ASSIGN_OR_RETURN(lhs, expr)                                    \
  auto QK_CONCAT(qk_result_, __LINE__) = (expr);                          \
  if (!QK_CONCAT(qk_result_, __LINE__).ok())                              \
    return QK_CONCAT(qk_result_, __LINE__).status();                      \
  lhs = std::move(QK_CONCAT(qk_result_, __LINE__)).value()
// QK_CO_ASSIGN_OR_RETURN(auto x, co_await ComputeX()); — for coroutines.
#define QK_CO_ASSIGN_OR_RETURN(lhs, expr)                                 \
  auto QK_CONCAT(qk_result_, __LINE__) = (expr);                          \
  if (!QK_CONCAT(qk_result_, __LINE__).ok())                              \
    co_return QK_CONCAT(qk_result_, __LINE__).status();                   \
  lhs = std::move(QK_CONCAT(qk_result_, __LINE__)).value()
