// FaultInjectionEngine: an Engine wrapper for tests that makes chosen requests fail.
//
// Rules pick requests by operation, optionally by file descriptor, and by ordinal among the
// requests the rule matches (counted from when the rule is added): fail only the Nth, fail the
// Nth and every later one (a full disk), or fail the next one. A failed request completes at
// once inside Submit() with result = -errno and never reaches the inner engine; every other
// request passes through unchanged.
//
//   auto* faults = new FaultInjectionEngine(reactor->ReplaceEngine(nullptr));
//   reactor->ReplaceEngine(std::unique_ptr<Engine>(faults));
//   faults->AddRule({.op = IoOp::kWrite, .nth = 3, .error = ENOSPC,
//                    .mode = FaultRule::Mode::kFromNth});
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "qcow2kit/reactor.h"

namespace qcow2kit {

struct FaultRule {
  enum class Mode : uint8_t {
    kNth,      // only the nth matching request fails
    kFromNth,  // the nth and every later matching request fail
  };
  IoOp op = IoOp::kWrite;
  int fd = -1;       // -1: any descriptor
  uint64_t nth = 1;  // 1-based ordinal among matching requests
  int error = EIO;   // positive errno the request completes with
  Mode mode = Mode::kNth;
};

class FaultInjectionEngine final : public Engine {
 public:
  explicit FaultInjectionEngine(std::unique_ptr<Engine> inner);

  const char* name() const override { return inner_->name(); }
  bool Submit(IoRequest* req) override;
  size_t Poll(bool wait) override { return inner_->Poll(wait); }
  size_t in_flight() const override { return inner_->in_flight(); }
  void Cancel(IoRequest* req) override { inner_->Cancel(req); }

  // Adds a rule; its ordinal counting starts now. Returns an id for fired() / RemoveRule().
  size_t AddRule(const FaultRule& rule);
  // Shorthand: the next request of `op` (on `fd`, or any with -1) fails with `error`.
  size_t FailOnce(IoOp op, int error, int fd = -1);
  // Disables a rule (its id stays valid for fired()).
  void RemoveRule(size_t id);
  void ClearRules();

  // Requests submitted to this engine, by operation, whether or not they were failed.
  uint64_t seen(IoOp op) const { return seen_[Index(op)]; }
  // Requests this engine failed, by operation.
  uint64_t failed(IoOp op) const { return failed_[Index(op)]; }
  uint64_t failed_total() const;
  // How many requests rule `id` has failed.
  uint64_t fired(size_t id) const { return rules_[id].fired; }

  Engine& inner() { return *inner_; }

 private:
  struct ActiveRule {
    FaultRule rule;
    bool enabled = true;
    uint64_t matched = 0;
    uint64_t fired = 0;
  };
  static size_t Index(IoOp op) { return static_cast<size_t>(op); }

  std::unique_ptr<Engine> inner_;
  std::vector<ActiveRule> rules_;
  std::array<uint64_t, kIoOpCount> seen_{};
  std::array<uint64_t, kIoOpCount> failed_{};
};

}  // namespace qcow2kit
