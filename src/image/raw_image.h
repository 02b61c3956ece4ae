// RawImage: a raw file as an image layer (backing files, data files, convert targets). Every
// byte is data at the same offset in the file. Like QEMU, the size is the file length rounded
// up to whole 512-byte sectors; the bytes past end of file read as zeros.
#pragma once

#include <memory>

#include "qcow2kit/driver.h"

namespace qcow2kit {

class RawImage final : public FormatDriver {
 public:
  static Result<std::unique_ptr<RawImage>> Open(std::unique_ptr<File> file);

  const char* format_name() const override { return "raw"; }
  uint64_t size() const override { return size_; }
  Task<Status> Fetch(uint64_t offset, uint64_t length, std::vector<Extent>* out) override;
  File* file(uint8_t index) const override { return index == 0 ? file_.get() : nullptr; }
  Task<HostHoles> ProbeHostHoles() override { co_return HostHoles::kZero; }
  Task<Status> Resize(uint64_t new_size, Preallocation prealloc) override;

 private:
  RawImage(std::unique_ptr<File> file, uint64_t size) : file_(std::move(file)), size_(size) {}
  std::unique_ptr<File> file_;
  uint64_t size_;
};

}  // namespace qcow2kit
