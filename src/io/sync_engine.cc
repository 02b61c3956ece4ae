// The blocking fallback engine: every request completes inside Submit() with one system call.
#include <unistd.h>

#include <cerrno>

#include "qcow2kit/reactor.h"

namespace qcow2kit {
namespace {

class SyncEngine final : public Engine {
 public:
  const char* name() const override { return "sync"; }
  bool Submit(IoRequest* req) override {
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
    }
    req->result = r < 0 ? -errno : r;
    return true;
  }
  size_t Poll(bool) override { return 0; }
  size_t in_flight() const override { return 0; }
};

}  // namespace

std::unique_ptr<Engine> MakeSyncEngine() { return std::make_unique<SyncEngine>(); }

}  // namespace qcow2kit
