// AlignedBuffer: a heap buffer aligned for direct I/O (O_DIRECT needs 4 KiB alignment of the
// memory, the offset and the length on most devices).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <utility>

namespace qcow2kit {

inline constexpr size_t kIoAlignment = 4096;

// True if every byte of `b` is zero (memcmp against a zero block is vectorised).
inline bool IsAllZero(std::span<const std::byte> b) {
  static const std::byte kZeros[4096] = {};
  while (!b.empty()) {
    size_t n = b.size() < sizeof(kZeros) ? b.size() : sizeof(kZeros);
    if (std::memcmp(b.data(), kZeros, n) != 0) return false;
    b = b.subspan(n);
  }
  return true;
}

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t size) { Resize(size); }
  AlignedBuffer(AlignedBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  ~AlignedBuffer() { std::free(data_); }

  // Discards the contents; the new buffer is zero-filled.
  void Resize(size_t size) {
    std::free(data_);
    data_ = nullptr;
    size_ = 0;
    if (size == 0) return;
    size_t rounded = (size + kIoAlignment - 1) / kIoAlignment * kIoAlignment;
    data_ = static_cast<std::byte*>(std::aligned_alloc(kIoAlignment, rounded));
    if (!data_) std::abort();  // out of memory: callers bound sizes before allocating
    std::memset(data_, 0, rounded);
    size_ = size;
  }

  std::byte* data() { return data_; }
  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<std::byte> span() { return {data_, size_}; }
  std::span<const std::byte> span() const { return {data_, size_}; }

 private:
  std::byte* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace qcow2kit
