// DelayEngine: an Engine wrapper for tests that holds chosen requests back. A held request
// stays in flight, not passed to the inner engine, until the test releases it, so that the
// test can act while it is pending (free and reuse the cluster it reads, say) and then let
// it reach the file, as a slow disk might.
//
//   auto* delay = new DelayEngine(reactor->ReplaceEngine(nullptr));
//   reactor->ReplaceEngine(std::unique_ptr<Engine>(delay));
//   delay->HoldNext({.op = IoOp::kRead, .fd = fd, .lo = host, .hi = host + cs});
//   reactor->Spawn(ReadSomething());   // suspends on the held request
//   ...                                // the test acts meanwhile
//   delay->ReleaseAll();
//
// Poll(true) never blocks on a held request (it returns at once when nothing else is in
// flight): a test drives the reactor while passed_in_flight() > 0 to let everything that does
// not wait for the held request finish.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "qcow2kit/reactor.h"

namespace qcow2kit {

// Which request to hold: the next one of `op` on `fd` (-1: any) whose byte range meets
// [lo, hi).
struct HoldRule {
  IoOp op = IoOp::kRead;
  int fd = -1;
  uint64_t lo = 0;
  uint64_t hi = UINT64_MAX;
};

class DelayEngine final : public Engine {
 public:
  explicit DelayEngine(std::unique_ptr<Engine> inner) : inner_(std::move(inner)) {}

  const char* name() const override { return inner_->name(); }
  bool Submit(IoRequest* req) override;
  size_t Poll(bool wait) override;
  size_t in_flight() const override {
    return inner_->in_flight() + held_.size() + completed_.size();
  }
  void Cancel(IoRequest* req) override;

  void HoldNext(const HoldRule& rule) { rules_.push_back(rule); }
  size_t held() const { return held_.size(); }
  // Requests in flight that are not held: while there are none, only a release can make
  // I/O progress.
  size_t passed_in_flight() const { return inner_->in_flight() + completed_.size(); }
  // Passes every held request on to the inner engine.
  void ReleaseAll();

 private:
  std::unique_ptr<Engine> inner_;
  std::vector<HoldRule> rules_;
  std::vector<IoRequest*> held_;
  // Released or cancelled requests that completed without the inner engine's Poll: their
  // waiters are resumed by the next Poll.
  std::vector<IoRequest*> completed_;
};

}  // namespace qcow2kit
