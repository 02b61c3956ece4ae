// Shared pieces of the libFuzzer targets: one reactor per process, and the fuzz input written
// to a scratch file so that it can be opened as an image.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"

namespace qcow2kit::fuzz {

// The blocking engine: deterministic, and no io_uring instance per process.
inline Reactor& TheReactor() {
  static std::unique_ptr<Reactor> reactor = std::make_unique<Reactor>(MakeSyncEngine());
  return *reactor;
}

// A scratch file of this process, holding the current input.
inline const std::string& ScratchPath(const char* name) {
  static const std::string path = [&] {
    const char* tmp = std::getenv("TMPDIR");
    return std::string(tmp && *tmp ? tmp : "/tmp") + "/qcow2kit-fuzz-" + name + "-" +
           std::to_string(::getpid());
  }();
  return path;
}

inline bool WriteScratch(const std::string& path, const uint8_t* data, size_t size) {
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return done == size;
}

// What an image given as bytes may open: nothing but itself.
inline OpenOptions SelfContained(bool writable, bool check) {
  OpenOptions o;
  o.writable = writable;
  o.check = check;
  o.format = "qcow2";
  o.force_share = !writable;
  o.allow_backing = false;
  o.allow_data_file = false;
  return o;
}

}  // namespace qcow2kit::fuzz
