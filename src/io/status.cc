#include "qcow2kit/status.h"

#include <cstring>

namespace qcow2kit {

Status Status::FromErrno(int err, const std::string& what) {
  if (err == 0) err = EIO;
  return Error(err, what + ": " + std::strerror(err));
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  if (message_.empty()) return std::strerror(code_);
  return message_;
}

Status Status::WithContext(const std::string& context) const {
  if (ok()) return *this;
  return Error(code_, context + ": " + ToString());
}

}  // namespace qcow2kit
