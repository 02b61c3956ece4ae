// ScratchExtents: an extent list for one mapping lookup, borrowed from a per-thread stock so
// that reads and writes (several lookups per request, each a short list) do not allocate once
// the stock holds as many lists as lookups run at once.
#pragma once

#include <vector>

#include "qcow2kit/driver.h"

namespace qcow2kit {

class ScratchExtents {
 public:
  ScratchExtents() {
    if (!stock_.empty()) {
      list_ = std::move(stock_.back());
      stock_.pop_back();
    }
  }
  ~ScratchExtents() {
    list_.clear();
    stock_.push_back(std::move(list_));
  }
  ScratchExtents(const ScratchExtents&) = delete;
  ScratchExtents& operator=(const ScratchExtents&) = delete;
  std::vector<Extent>& get() { return list_; }

 private:
  std::vector<Extent> list_;
  static inline thread_local std::vector<std::vector<Extent>> stock_;
};

}  // namespace qcow2kit
