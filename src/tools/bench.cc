#include "tools/bench.h"

#include <algorithm>
#include <chrono>
#include <coroutine>
#include <cstring>
#include <memory>
#include <vector>

#include "fmt/format.h"
#include "qcow2kit/buffer.h"

namespace qcow2kit::tools {
namespace {

constexpr uint64_t kRandomSeed = 0x9e3779b97f4a7c15ull;
// Request buffers beyond this much memory are refused instead of aborting in the allocator
// (qemu-img 7.2 aborts on -s 100M because depth * size overflows).
constexpr uint64_t kMaxBufferBytes = 8ull << 30;

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

struct BenchState {
  BlockDevice* dev = nullptr;
  BenchOffsets* offsets = nullptr;
  const BenchOptions* options = nullptr;
  uint64_t issued = 0;
  uint64_t completed = 0;
  uint64_t in_flight = 0;
  bool draining = false;  // a drained flush is due: start nothing until it is done
  std::vector<std::coroutine_handle<>> parked;  // workers waiting for that flush
  Status error;

  void Fail(const Status& s) {
    if (error.ok()) error = s;
    Resume();  // nobody is going to flush now
  }
  void Resume() {
    draining = false;
    for (auto h : parked) Reactor::Current()->Post(h);
    parked.clear();
  }
};

// Suspends a worker until the pending drained flush has been done.
struct ParkAwaiter {
  BenchState* st;
  bool await_ready() const noexcept { return !st->draining; }
  void await_suspend(std::coroutine_handle<> h) { st->parked.push_back(h); }
  void await_resume() const noexcept {}
};

Task<void> UndrainedFlush(BenchState* st) {
  Status s = co_await st->dev->Flush();
  if (!s.ok()) st->Fail(s.WithContext("Failed flush request"));
}

// After a request completed: qemu-img flushes whenever the number of requests not yet issued
// is a multiple of the flush interval. Returns true if the caller must do a drained flush now
// (the queue is empty). A plain function, so the hot path allocates no coroutine frame.
bool FlushDue(BenchState* st) {
  const BenchOptions& o = *st->options;
  if (o.flush_interval && (o.count - st->issued) % o.flush_interval == 0) {
    if (!o.drain_on_flush) {
      Reactor::Current()->Spawn(UndrainedFlush(st));
    } else {
      st->draining = true;
    }
  }
  return st->draining && st->in_flight == 0;
}

// One request slot: issues requests back to back until all are issued or one failed.
Task<void> Worker(BenchState* st, std::span<std::byte> buf) {
  while (true) {
    co_await ParkAwaiter{st};
    if (st->issued >= st->options->count || !st->error.ok()) co_return;
    const uint64_t offset = st->offsets->Next();
    ++st->issued;
    ++st->in_flight;
    Status s;
    if (st->options->write) {
      s = co_await st->dev->Write(offset, buf);
    } else {
      s = co_await st->dev->Read(offset, buf);
    }
    --st->in_flight;
    if (!s.ok()) {
      st->Fail(s.WithContext("Failed request"));
      co_return;
    }
    ++st->completed;
    if (FlushDue(st)) {
      s = co_await st->dev->Flush();
      if (!s.ok()) {
        st->Fail(s.WithContext("Failed flush request"));
        co_return;
      }
      st->Resume();
    }
  }
}

}  // namespace

BenchOffsets::BenchOffsets(const BenchOptions& o, uint64_t image_size)
    : image_size_(image_size),
      request_(o.buffer_size),
      step_(o.step),
      random_(o.random),
      rng_state_(kRandomSeed) {
  if (random_ && image_size_ >= request_) {
    const uint64_t align = request_ ? request_ : 512;
    slots_ = (image_size_ - request_) / align + 1;
  }
  next_ = Fit(image_size_ ? o.offset % image_size_ : 0);
}

uint64_t BenchOffsets::Fit(uint64_t offset) const {
  return offset + request_ > image_size_ ? 0 : offset;
}

uint64_t BenchOffsets::Next() {
  if (random_) {
    const uint64_t align = request_ ? request_ : 512;
    return SplitMix64(&rng_state_) % slots_ * align;
  }
  const uint64_t cur = next_;
  next_ = image_size_ ? Fit((cur + step_) % image_size_) : 0;
  return cur;
}

Result<BenchResult> RunBench(Reactor& reactor, BlockDevice& dev, const BenchOptions& o) {
  if (o.buffer_size > dev.size()) {
    return Status::Invalid(fmt::format("Request size {} is larger than the image ({} bytes)",
                                       o.buffer_size, dev.size()));
  }
  // More workers than requests would have nothing to do.
  const uint64_t workers = std::min<uint64_t>(o.depth, o.count);
  if (workers * o.buffer_size > kMaxBufferBytes) {
    return Status::Invalid(fmt::format("{} requests of {} bytes in parallel need too much memory",
                                       workers, o.buffer_size));
  }
  std::vector<AlignedBuffer> buffers(workers);
  for (AlignedBuffer& b : buffers) {
    b.Resize(o.buffer_size);
    std::memset(b.data(), o.pattern, o.buffer_size);
  }

  BenchOffsets offsets(o, dev.size());
  BenchState state;
  state.dev = &dev;
  state.offsets = &offsets;
  state.options = &o;
  const auto start = std::chrono::steady_clock::now();
  for (AlignedBuffer& b : buffers) reactor.Spawn(Worker(&state, b.span()));
  reactor.RunUntilIdle();
  const auto end = std::chrono::steady_clock::now();
  if (!state.error.ok()) return state.error;
  BenchResult r;
  r.seconds = std::chrono::duration<double>(end - start).count();
  r.requests = state.completed;
  return r;
}

}  // namespace qcow2kit::tools
