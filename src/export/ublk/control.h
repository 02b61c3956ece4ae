// UblkControl: the control commands of /dev/ublk-control (add, configure, start, stop and
// delete a device). They are rare and some block (START_DEV waits for the queues), so each
// runs synchronously on a small io_uring of the control device's own, with a timeout.
#pragma once

#include <linux/ublk_cmd.h>

#include <cstdint>
#include <memory>
#include <string>

#include "qcow2kit/status.h"

struct io_uring;

namespace qcow2kit::ublk {

class UblkControl {
 public:
  // Opens /dev/ublk-control ("ublk_drv is not loaded" if it is missing).
  static Result<std::unique_ptr<UblkControl>> Open();
  ~UblkControl();

  // The driver's feature flags (UBLK_F_*).
  Result<uint64_t> GetFeatures();
  // Creates a device from `want` (dev_id UINT32_MAX: the kernel picks); returns what the kernel
  // made of it (negotiated flags, clamped queue count, page-rounded buffer size).
  Result<ublksrv_ctrl_dev_info> AddDevice(const ublksrv_ctrl_dev_info& want);
  Result<ublksrv_ctrl_dev_info> GetInfo(uint32_t dev_id);
  Status SetParams(uint32_t dev_id, const ublk_params& params);
  Result<ublk_params> GetParams(uint32_t dev_id);
  // Waits until every queue has fetched every tag, then adds the disk /dev/ublkbN.
  Status StartDevice(uint32_t dev_id, int daemon_pid);
  Status StopDevice(uint32_t dev_id);
  // User recovery of a device whose daemon died (UBLK_F_USER_RECOVERY): Start waits (up to
  // 30 s) until the old daemon's character device is released; End waits, as StartDevice
  // does, until every queue has fetched every tag, then makes the device live again.
  Status StartUserRecovery(uint32_t dev_id);
  Status EndUserRecovery(uint32_t dev_id, int daemon_pid);
  // Deletes the device; waits until /dev/ublkcN is closed (close it first).
  Status DeleteDevice(uint32_t dev_id);
  // Deletes the device once /dev/ublkcN is closed, without waiting (a daemon giving up).
  Status DeleteDeviceLater(uint32_t dev_id);

 private:
  UblkControl() = default;
  // Sends one command; returns the CQE's result (>= 0) or the error, naming `what`.
  Result<int> Send(unsigned cmd_op, uint32_t dev_id, const void* buf, uint16_t len, uint64_t data0,
                   const char* what, int timeout_seconds = 30);

  int fd_ = -1;
  std::unique_ptr<io_uring> ring_;
};

}  // namespace qcow2kit::ublk
