// Helpers for the format layer's unit tests: images made by the real qemu-img (the oracle) in
// a private temporary directory, and raw file access to look at what it wrote.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "qcow2kit/status.h"

namespace qcow2kit::format::testutil {

// A directory that is removed with everything in it when the object goes away. Each test
// gets its own, so tests can run in parallel processes.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "qk_format_XXXXXX").string();
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  bool ok() const { return !path_.empty(); }
  std::string File(std::string_view name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// Runs `cmd` through the shell with its output discarded; true if it exited with status 0.
inline bool RunCommand(const std::string& cmd) {
  return std::system((cmd + " >/dev/null 2>&1").c_str()) == 0;
}

// `qemu-img create -f qcow2 -o <options> <path> <size>`.
inline bool QemuImgCreate(const std::string& path, const std::string& size,
                          const std::string& options = "") {
  std::string cmd = "qemu-img create -q -f qcow2";
  if (!options.empty()) cmd += " -o '" + options + "'";
  return RunCommand(cmd + " '" + path + "' " + size);
}

inline uint64_t FileSize(const std::string& path) {
  std::error_code ec;
  const uint64_t size = std::filesystem::file_size(path, ec);
  return ec ? 0 : size;
}

// Up to `length` bytes at `offset` (fewer at the end of the file).
inline std::vector<uint8_t> ReadFile(const std::string& path, uint64_t offset, uint64_t length) {
  std::ifstream f(path, std::ios::binary);
  std::vector<uint8_t> buf(length);
  f.seekg(static_cast<std::streamoff>(offset));
  f.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(length));
  buf.resize(f ? length : static_cast<size_t>(f.gcount()));
  return buf;
}

inline void WriteFile(const std::string& path, const std::vector<uint8_t>& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

// Cluster 0 as ParseHeader wants it: the first min(cluster size, file size) bytes.
inline std::vector<uint8_t> ReadCluster0(const std::string& path, uint64_t cluster_size) {
  return ReadFile(path, 0, std::min(cluster_size, FileSize(path)));
}

// Checks that `s` failed with errno `code` and a message containing `text`.
inline ::testing::AssertionResult FailsWith(const Status& s, int code, std::string_view text) {
  if (s.ok()) return ::testing::AssertionFailure() << "succeeded, expected: " << text;
  if (s.code() != code || s.message().find(text) == std::string::npos) {
    return ::testing::AssertionFailure()
           << "failed with code " << s.code() << " \"" << s.message() << "\", expected code "
           << code << " and \"" << text << "\"";
  }
  return ::testing::AssertionSuccess();
}

}  // namespace qcow2kit::format::testutil
