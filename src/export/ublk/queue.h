// UblkQueue: one hardware queue of a ublk device, served on the current reactor. Each tag
// (request slot) is a coroutine that fetches a request from the kernel, runs it on the
// queue's port of the shared block device, and commits the result while fetching the next
// (COMMIT_AND_FETCH), until the device stops and the kernel aborts the fetch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "qcow2kit/shared_device.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

struct ublksrv_io_desc;

namespace qcow2kit::ublk {

struct QueueOptions {
  uint16_t queue_id = 0;
  uint16_t depth = 128;
  uint32_t max_io_bytes = 512 << 10;  // per request, as negotiated (page rounded)
  bool discard = false;               // discard requests unmap (else they are ignored)
  // Writes of zeros become write-zeroes (QEMU's detect-zeroes): kOn records zeros, kUnmap
  // also lets whole clusters go when discards unmap.
  enum class DetectZeroes { kOff, kOn, kUnmap } detect_zeroes = DetectZeroes::kOff;
};

class UblkQueue {
 public:
  // `char_fd` is the open /dev/ublkcN; its descriptor array for this queue is mapped here.
  static Result<std::unique_ptr<UblkQueue>> Create(int char_fd, SharedDevice::Port* dev,
                                                   const QueueOptions& options);
  ~UblkQueue();

  // Starts every tag's loop on the current reactor; they end when the device stops.
  void Start();
  size_t running() const { return running_; }

 private:
  UblkQueue(int char_fd, SharedDevice::Port* dev, const QueueOptions& options)
      : char_fd_(char_fd), dev_(dev), options_(options) {}
  Task<void> ServeTag(uint16_t tag);
  // Runs one request; returns what to commit: bytes transferred or -errno.
  Task<int32_t> Handle(const ublksrv_io_desc& desc, std::byte* buf);

  int char_fd_;
  SharedDevice::Port* dev_;
  QueueOptions options_;
  const ublksrv_io_desc* descs_ = nullptr;
  size_t mapped_bytes_ = 0;
  std::byte* buffers_ = nullptr;  // depth x max_io_bytes, page aligned
  size_t running_ = 0;
};

}  // namespace qcow2kit::ublk
