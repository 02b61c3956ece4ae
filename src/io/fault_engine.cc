#include "io/fault_engine.h"

namespace qcow2kit {

FaultInjectionEngine::FaultInjectionEngine(std::unique_ptr<Engine> inner)
    : inner_(std::move(inner)) {}

size_t FaultInjectionEngine::AddRule(const FaultRule& rule) {
  rules_.push_back(ActiveRule{.rule = rule});
  return rules_.size() - 1;
}

size_t FaultInjectionEngine::FailOnce(IoOp op, int error, int fd) {
  return AddRule({.op = op, .fd = fd, .nth = 1, .error = error, .mode = FaultRule::Mode::kNth});
}

void FaultInjectionEngine::RemoveRule(size_t id) {
  rules_[id].enabled = false;
}

void FaultInjectionEngine::ClearRules() {
  for (auto& r : rules_) r.enabled = false;
}

uint64_t FaultInjectionEngine::failed_total() const {
  uint64_t n = 0;
  for (uint64_t f : failed_) n += f;
  return n;
}

bool FaultInjectionEngine::Submit(IoRequest* req) {
  ++seen_[Index(req->op)];
  int error = 0;
  // Every matching rule counts the request, even when an earlier rule already failed it, so
  // that each rule's ordinals do not depend on the other rules.
  for (auto& r : rules_) {
    if (!r.enabled || r.rule.op != req->op) continue;
    if (r.rule.fd >= 0 && r.rule.fd != req->fd) continue;
    uint64_t ordinal = ++r.matched;
    bool hit = r.rule.mode == FaultRule::Mode::kNth ? ordinal == r.rule.nth : ordinal >= r.rule.nth;
    if (hit && error == 0) {
      error = r.rule.error;
      ++r.fired;
    }
  }
  if (error == 0) return inner_->Submit(req);
  ++failed_[Index(req->op)];
  req->result = -static_cast<int64_t>(error);
  return true;
}

}  // namespace qcow2kit
