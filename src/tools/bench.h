// The `bench` loop: `depth` worker coroutines on one reactor, each issuing the next request
// from its own aligned buffer until `count` requests are done, timed with steady_clock.
// Write tests flush every --flush-interval requests as qemu-img bench does: by default the
// queue is drained first (no new request starts until the flush is done); with --no-drain the
// flush runs alongside the requests.
#pragma once

#include <cstdint>

#include "qcow2kit/block.h"
#include "qcow2kit/reactor.h"
#include "qcow2kit/status.h"
#include "tools/bench_options.h"

namespace qcow2kit::tools {

// The request offsets. Sequential: from the start offset, advancing by the step size and
// wrapping modulo the image size as qemu-img does, but a request that would cross the end of
// the image wraps to offset 0 instead of failing. Random (--random): offsets aligned to the
// request size, uniformly over the image, from a fixed seed so runs are repeatable.
class BenchOffsets {
 public:
  BenchOffsets(const BenchOptions& o, uint64_t image_size);
  uint64_t Next();

 private:
  uint64_t Fit(uint64_t offset) const;

  uint64_t image_size_;
  uint64_t request_;
  uint64_t step_;
  uint64_t next_;
  bool random_;
  uint64_t slots_ = 1;  // random: aligned request positions inside the image
  uint64_t rng_state_;  // splitmix64
};

struct BenchResult {
  double seconds = 0;
  uint64_t requests = 0;
};

// Runs the benchmark (`dev` must be writable for write tests; the caller closes it afterwards).
// Requests must fit in the image. The first failing request ends the run with its error.
Result<BenchResult> RunBench(Reactor& reactor, BlockDevice& dev, const BenchOptions& o);

}  // namespace qcow2kit::tools
