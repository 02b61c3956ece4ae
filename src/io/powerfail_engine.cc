// Recording side of PowerFailRecorder: requests on tracked files are forwarded to the inner
// engine as shadow requests whose waiter is a small relay coroutine, so that the recorder sees
// each completion (in order) before the issuer is resumed.
#include "io/powerfail_engine.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <coroutine>
#include <cstring>
#include <exception>

namespace qcow2kit {

// A request on a tracked file between submission and completion.
struct PowerFailRecorder::Pending {
  IoRequest shadow;  // what the inner engine sees
  IoRequest* original = nullptr;
  std::vector<std::byte> data;  // writes: the bytes as submitted
  size_t submitted_at = 0;
};

// A coroutine that is resumed by the inner engine when a shadow request completes.
struct PowerFailRecorder::Relay {
  struct promise_type {
    Relay get_return_object() noexcept {
      return Relay{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() const noexcept { return {}; }
    std::suspend_never final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    void unhandled_exception() const noexcept { std::terminate(); }
  };
  std::coroutine_handle<promise_type> handle;
};

PowerFailRecorder::Relay PowerFailRecorder::Forward(PowerFailRecorder* self, Pending* p) {
  // The body runs only when the inner engine resumes the shadow request's waiter.
  std::unique_ptr<Pending> owned(p);
  IoRequest* original = p->original;
  self->Complete(p);
  owned.reset();
  original->waiter.resume();
  co_return;
}

PowerFailRecorder::PowerFailRecorder(std::unique_ptr<Engine> inner) : inner_(std::move(inner)) {}

PowerFailRecorder::~PowerFailRecorder() {
  // Relays refer to this recorder: let them all run first.
  while (inner_->in_flight() > 0) inner_->Poll(true);
}

namespace {

Result<std::vector<std::byte>> ReadAll(int fd, const std::string& path) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return Status::FromErrno(errno, "stat '" + path + "'");
  std::vector<std::byte> out(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::FromErrno(errno, "read '" + path + "'");
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  out.resize(done);
  return out;
}

std::string PathOfFd(int fd) {
  char link[64];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  char target[PATH_MAX];
  ssize_t n = ::readlink(link, target, sizeof target - 1);
  if (n <= 0) return "fd " + std::to_string(fd);
  return std::string(target, static_cast<size_t>(n));
}

}  // namespace

Status PowerFailRecorder::Track(int fd, std::string path) {
  if (files_.count(fd)) return Status::Invalid("'" + path + "' is already tracked");
  auto content = ReadAll(fd, path);
  if (!content.ok()) return content.status();
  TrackedFile& f = files_[fd];
  f.path = std::move(path);
  f.initial = std::move(*content);
  f.length = f.initial.size();
  seen_fds_[fd] = true;
  return Status::Ok();
}

PowerFailRecorder::TrackedFile* PowerFailRecorder::Lookup(int fd) {
  auto it = files_.find(fd);
  if (it != files_.end()) return &it->second;
  if (!auto_track_ || seen_fds_.count(fd)) return nullptr;
  seen_fds_[fd] = true;
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || (flags & O_ACCMODE) == O_RDONLY) return nullptr;
  if (!Track(fd, PathOfFd(fd)).ok()) return nullptr;
  return &files_.at(fd);
}

void PowerFailRecorder::NoteLengthChange(int fd) {
  auto it = files_.find(fd);
  if (it == files_.end()) return;
  struct stat st;
  if (::fstat(fd, &st) != 0) return;
  uint64_t now = static_cast<uint64_t>(st.st_size);
  if (now == it->second.length) return;
  PowerFailEvent e;
  e.kind = PowerFailEvent::Kind::kResize;
  e.fd = fd;
  e.length = now;
  e.op = IoOp::kWrite;
  e.submitted_at = events_.size();
  events_.push_back(std::move(e));
  it->second.length = now;
}

bool PowerFailRecorder::Submit(IoRequest* req) {
  TrackedFile* f = Lookup(req->fd);
  if (!f) return inner_->Submit(req);
  // A length change seen while our own writes are in flight could be theirs: only look when
  // none are.
  if (f->writes_in_flight == 0) NoteLengthChange(req->fd);
  if (req->op == IoOp::kRead) return inner_->Submit(req);

  auto* p = new Pending;
  p->original = req;
  p->shadow = *req;
  p->submitted_at = events_.size();
  if (req->op == IoOp::kWrite) {
    const auto* src = static_cast<const std::byte*>(req->buf);
    p->data.assign(src, src + req->len);
    ++f->writes_in_flight;
  }
  Relay relay = Forward(this, p);
  p->shadow.waiter = relay.handle;
  if (!inner_->Submit(&p->shadow)) return false;
  // Completed at once: the relay never runs.
  relay.handle.destroy();
  Complete(p);
  delete p;
  return true;
}

void PowerFailRecorder::Complete(Pending* p) {
  IoRequest& req = p->shadow;
  p->original->result = req.result;
  TrackedFile& f = files_.at(req.fd);
  if (req.op == IoOp::kWrite) --f.writes_in_flight;
  if (req.result < 0) return;  // failed requests change nothing we can rely on
  PowerFailEvent e;
  e.fd = req.fd;
  e.op = req.op;
  e.submitted_at = p->submitted_at;
  if (req.op == IoOp::kWrite) {
    e.kind = PowerFailEvent::Kind::kWrite;
    e.offset = req.offset;
    p->data.resize(std::min<size_t>(p->data.size(), static_cast<size_t>(req.result)));
    e.data = std::move(p->data);
    f.length = std::max<uint64_t>(f.length, e.end());
  } else {
    e.kind = PowerFailEvent::Kind::kFlush;
  }
  events_.push_back(std::move(e));
}

const std::vector<std::byte>& PowerFailRecorder::initial_content(int fd) const {
  return files_.at(fd).initial;
}

const std::string& PowerFailRecorder::path(int fd) const {
  return files_.at(fd).path;
}

std::optional<size_t> PowerFailRecorder::LastFlushBefore(int fd, size_t cut) const {
  for (size_t i = std::min(cut, events_.size()); i > 0; --i) {
    const auto& e = events_[i - 1];
    if (e.fd == fd && e.kind == PowerFailEvent::Kind::kFlush) return i - 1;
  }
  return std::nullopt;
}

size_t PowerFailRecorder::DurableBefore(int fd, size_t cut) const {
  size_t durable = 0;
  for (size_t i = 0; i < std::min(cut, events_.size()); ++i) {
    const auto& e = events_[i];
    if (e.fd == fd && e.kind == PowerFailEvent::Kind::kFlush) {
      durable = std::max(durable, e.submitted_at);
    }
  }
  return durable;
}

std::vector<size_t> PowerFailRecorder::AcknowledgedWrites(int fd, size_t cut) const {
  std::vector<size_t> out;
  size_t durable = DurableBefore(fd, cut);
  for (size_t i = 0; i < durable; ++i) {
    if (events_[i].fd == fd && events_[i].kind == PowerFailEvent::Kind::kWrite) out.push_back(i);
  }
  return out;
}

}  // namespace qcow2kit
