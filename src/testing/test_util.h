// Helpers for tests that use QEMU's tools as the oracle: a scratch directory, running shell
// commands, reading files.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qcow2kit/reactor.h"

namespace qcow2kit::testing {

// A fresh directory under /tmp, removed with its contents on destruction.
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Runs `cmd` with /bin/sh; returns its exit status and stores stdout in `out` if given.
int Run(const std::string& cmd, std::string* out = nullptr);
// Runs `cmd` and fails the current test if it does not exit 0.
void MustRun(const std::string& cmd);
std::vector<uint8_t> ReadWholeFile(const std::string& path);
// Writes `size` bytes of `model` to dir/model.raw, then fails the current test unless
// `qemu-img check` finds dir/img.qcow2 clean and `qemu-img compare` finds it equal to the
// model. The image must be closed (its locks dropped) first.
void ExpectImageMatchesModel(const ScratchDir& dir, const void* model, size_t size);

// A reactor on io_uring (or on `kind`), aborting with the reason if the kernel refuses it:
// a test that asks for io_uring never runs on the blocking engine unnoticed.
std::unique_ptr<Reactor> NewReactor(EngineKind kind = EngineKind::kUring);

}  // namespace qcow2kit::testing
