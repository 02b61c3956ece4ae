// The I/O core: an Engine performs file I/O requests; a Reactor owns one Engine and runs the
// coroutines that wait on it. One Reactor per thread.
//
// Two engines exist: io_uring (batched asynchronous submission, the default) and a blocking
// pread/pwrite fallback chosen automatically when io_uring is unavailable. Both sit behind
// the same Engine interface, as do the test wrappers (fault injection, power-fail recording).
#pragma once

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>

#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

enum class IoOp : uint8_t {
  kRead,   // pread: buf, len, offset
  kWrite,  // pwrite: buf, len, offset
  kFdatasync,
  kFsync,
  kAccept,   // fd = listening socket; result = the new socket (close-on-exec) or -errno
  kRecv,     // recv into buf/len with msg_flags; result = bytes, 0 at end of stream
  kSendMsg,  // buf = const msghdr*; MSG_NOSIGNAL is added; result = bytes sent (may be short)
  kPollIn,   // completes when fd is readable (result = revents)
  // A driver command (IORING_OP_URING_CMD) on fd: msg_flags = cmd_op, buf = 16 bytes copied
  // into the SQE at submission (ublk's per-queue commands); io_uring only.
  kUringCmd,
};
inline constexpr size_t kIoOpCount = 9;
inline constexpr size_t kUringCmdBytes = 16;

// One request in flight. The issuer owns it (usually in a coroutine frame) until completion.
struct IoRequest {
  IoOp op = IoOp::kRead;
  uint32_t msg_flags = 0;  // kRecv / kSendMsg
  int fd = -1;
  void* buf = nullptr;
  uint32_t len = 0;
  uint64_t offset = 0;
  int64_t result = 0;  // bytes transferred (>= 0) or -errno
  std::coroutine_handle<> waiter;
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual const char* name() const = 0;
  // Starts `req`. Returns true if it completed at once (req->result is set and the waiter
  // will not be resumed). Otherwise completion happens inside a later Poll(), which sets
  // req->result and resumes req->waiter.
  virtual bool Submit(IoRequest* req) = 0;
  // Sends queued submissions to the kernel and completes finished requests. With `wait`, blocks
  // until at least one request completes (if any is in flight). Returns requests completed.
  virtual size_t Poll(bool wait) = 0;
  // Requests submitted and not yet completed.
  virtual size_t in_flight() const = 0;
  // Asks for an in-flight request to end early (best effort, used for socket waits). It still
  // completes through Poll(), with -ECANCELED if it was cancelled before finishing.
  virtual void Cancel(IoRequest* req) = 0;
};

enum class EngineKind {
  kAuto,   // io_uring if the kernel allows it, else blocking
  kUring,  // io_uring or fail
  kSync,   // blocking pread/pwrite
};
// Parses "auto" | "io_uring" | "uring" | "threads" | "sync" | "native"; "threads" and
// "native" (qemu-img's names) map to the blocking and io_uring engines respectively.
Result<EngineKind> ParseEngineKind(const std::string& name);

Result<std::unique_ptr<Engine>> MakeUringEngine(unsigned queue_entries);
// File I/O blocks inside Submit(); socket operations and kPollIn wait in poll() inside Poll().
std::unique_ptr<Engine> MakeSyncEngine();

// Runs coroutines on the calling thread. Tasks are started by Spawn() (detached) or BlockOn()
// (waits for the result). The constructing thread's current reactor is this one until the
// reactor is destroyed; I/O issued from coroutines goes to Reactor::Current()->engine().
class Reactor {
 public:
  explicit Reactor(std::unique_ptr<Engine> engine);
  ~Reactor();  // Lets every spawned task and in-flight request finish first.
  Reactor(const Reactor&) = delete;
  Reactor& operator=(const Reactor&) = delete;

  static Result<std::unique_ptr<Reactor>> Create(EngineKind kind = EngineKind::kAuto,
                                                 unsigned queue_entries = 256);
  static Reactor* Current();

  Engine& engine() { return *engine_; }
  // Replaces the engine (used to slip a wrapper in); nothing may be in flight.
  std::unique_ptr<Engine> ReplaceEngine(std::unique_ptr<Engine> engine);

  // Starts `task` now; it runs until its first suspension and then continues from Run*().
  void Spawn(Task<void> task);
  // Resumes `h` from the loop later (used by synchronisation primitives to avoid deep stacks).
  void Post(std::coroutine_handle<> h) { ready_.push_back(h); }
  // Runs `task` to completion, driving the loop, and returns its result.
  template <typename T>
  T BlockOn(Task<T> task);
  // One loop turn: resume posted coroutines, then poll the engine (blocking if `wait` and
  // nothing is ready). Returns false if there was nothing to do at all.
  bool RunOnce(bool wait);
  // Runs until no spawned task is left.
  void RunUntilIdle();

  size_t live_tasks() const { return live_tasks_; }

 private:
  friend struct SpawnedTask;
  template <typename T>
  static Task<void> StoreResult(Task<T> task, std::optional<T>* out, bool* done);
  static Task<void> StoreVoid(Task<void> task, bool* done);
  void DriveUntil(const bool* done);

  std::unique_ptr<Engine> engine_;
  std::deque<std::coroutine_handle<>> ready_;
  size_t live_tasks_ = 0;
  Reactor* previous_ = nullptr;
};

template <typename T>
Task<void> Reactor::StoreResult(Task<T> task, std::optional<T>* out, bool* done) {
  out->emplace(co_await std::move(task));
  *done = true;
}

template <typename T>
T Reactor::BlockOn(Task<T> task) {
  bool done = false;
  if constexpr (std::is_void_v<T>) {
    Spawn(StoreVoid(std::move(task), &done));
    DriveUntil(&done);
  } else {
    std::optional<T> out;
    Spawn(StoreResult(std::move(task), &out, &done));
    DriveUntil(&done);
    return std::move(*out);
  }
}

// Awaitable that submits one request to the current reactor's engine.
struct IoAwaiter {
  IoRequest req;
  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> h) {
    req.waiter = h;
    return !Reactor::Current()->engine().Submit(&req);
  }
  int64_t await_resume() const noexcept { return req.result; }
};

}  // namespace qcow2kit
