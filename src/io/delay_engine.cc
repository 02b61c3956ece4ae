#include "io/delay_engine.h"

#include <algorithm>
#include <cerrno>

namespace qcow2kit {

bool DelayEngine::Submit(IoRequest* req) {
  auto matches = [&](const HoldRule& r) {
    return r.op == req->op && (r.fd < 0 || r.fd == req->fd) && req->offset < r.hi &&
           r.lo < req->offset + req->len;
  };
  auto rule = std::find_if(rules_.begin(), rules_.end(), matches);
  if (rule == rules_.end()) return inner_->Submit(req);
  rules_.erase(rule);
  held_.push_back(req);
  return false;
}

void DelayEngine::ReleaseAll() {
  std::vector<IoRequest*> released;
  released.swap(held_);
  for (IoRequest* req : released) {
    if (inner_->Submit(req)) completed_.push_back(req);
  }
}

void DelayEngine::Cancel(IoRequest* req) {
  auto it = std::find(held_.begin(), held_.end(), req);
  if (it == held_.end()) return inner_->Cancel(req);
  held_.erase(it);
  req->result = -ECANCELED;
  completed_.push_back(req);
}

size_t DelayEngine::Poll(bool wait) {
  std::vector<IoRequest*> done;
  done.swap(completed_);
  for (IoRequest* req : done) req->waiter.resume();
  // Never block when only held requests are pending: nothing would wake us.
  const bool block = wait && done.empty() && inner_->in_flight() > 0;
  return done.size() + inner_->Poll(block);
}

}  // namespace qcow2kit
