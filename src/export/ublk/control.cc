#include "export/ublk/control.h"

#include <fcntl.h>
#include <liburing.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "export/ublk/ublk_abi.h"
#include "fmt/format.h"

namespace qcow2kit::ublk {

Result<std::unique_ptr<UblkControl>> UblkControl::Open() {
  auto c = std::unique_ptr<UblkControl>(new UblkControl());
  c->fd_ = ::open("/dev/ublk-control", O_RDWR | O_CLOEXEC);
  if (c->fd_ < 0) {
    if (errno == ENOENT) {
      return Status::Error(ENODEV, "/dev/ublk-control does not exist (is ublk_drv loaded?)");
    }
    return Status::FromErrno(errno, "open /dev/ublk-control");
  }
  c->ring_ = std::make_unique<io_uring>();
  // Control commands carry 32 bytes: only 128-byte SQEs have room (the driver insists).
  int r = io_uring_queue_init(4, c->ring_.get(), IORING_SETUP_SQE128);
  if (r < 0) {
    c->ring_.reset();
    return Status::FromErrno(-r, "io_uring_queue_init for /dev/ublk-control");
  }
  return c;
}

UblkControl::~UblkControl() {
  if (ring_) io_uring_queue_exit(ring_.get());
  if (fd_ >= 0) ::close(fd_);
}

Result<int> UblkControl::Send(unsigned cmd_op, uint32_t dev_id, const void* buf, uint16_t len,
                              uint64_t data0, const char* what, int timeout_seconds) {
  io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
  if (!sqe) return Status::Error(EBUSY, fmt::format("ublk {}: no submission slot", what));
  std::memset(sqe, 0, 2 * sizeof(io_uring_sqe));
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = fd_;
  sqe->cmd_op = cmd_op;
  ublksrv_ctrl_cmd cmd{};
  cmd.dev_id = dev_id;
  cmd.queue_id = static_cast<uint16_t>(-1);
  cmd.addr = reinterpret_cast<uint64_t>(buf);
  cmd.len = len;
  cmd.data[0] = data0;
  std::memcpy(sqe->cmd, &cmd, sizeof(cmd));
  int r = io_uring_submit(ring_.get());
  if (r < 0) return Status::FromErrno(-r, fmt::format("ublk {}: io_uring_submit", what));
  io_uring_cqe* cqe = nullptr;
  __kernel_timespec ts{.tv_sec = timeout_seconds, .tv_nsec = 0};
  do {
    r = io_uring_wait_cqe_timeout(ring_.get(), &cqe, &ts);
  } while (r == -EINTR);
  if (r == -ETIME) {
    // The command stays in flight; this object cannot be used again safely.
    return Status::Error(ETIMEDOUT,
                         fmt::format("ublk {}: no answer in {} s", what, timeout_seconds));
  }
  if (r < 0) return Status::FromErrno(-r, fmt::format("ublk {}", what));
  const int res = cqe->res;
  io_uring_cqe_seen(ring_.get(), cqe);
  if (res < 0) return Status::FromErrno(-res, fmt::format("ublk {}", what));
  return res;
}

Result<uint64_t> UblkControl::GetFeatures() {
  uint64_t features = 0;
  auto r = Send(kCmdGetFeatures, 0, &features, sizeof(features), 0, "GET_FEATURES");
  if (!r.ok()) return r.status();
  return features;
}

Result<ublksrv_ctrl_dev_info> UblkControl::AddDevice(const ublksrv_ctrl_dev_info& want) {
  ublksrv_ctrl_dev_info info = want;
  auto r = Send(kCmdAddDev, want.dev_id, &info, sizeof(info), 0, "ADD_DEV");
  if (!r.ok()) return r.status();
  return info;
}

Result<ublksrv_ctrl_dev_info> UblkControl::GetInfo(uint32_t dev_id) {
  ublksrv_ctrl_dev_info info{};
  auto r = Send(kCmdGetDevInfo, dev_id, &info, sizeof(info), 0, "GET_DEV_INFO");
  if (!r.ok()) return r.status();
  return info;
}

Status UblkControl::SetParams(uint32_t dev_id, const ublk_params& params) {
  return Send(kCmdSetParams, dev_id, &params, sizeof(params), 0, "SET_PARAMS").status();
}

Result<ublk_params> UblkControl::GetParams(uint32_t dev_id) {
  ublk_params params{};
  params.len = sizeof(params);
  auto r = Send(kCmdGetParams, dev_id, &params, sizeof(params), 0, "GET_PARAMS");
  if (!r.ok()) return r.status();
  return params;
}

Status UblkControl::StartUserRecovery(uint32_t dev_id) {
  for (int tries = 0;; ++tries) {
    auto r = Send(kCmdStartUserRecovery, dev_id, nullptr, 0, 0, "START_USER_RECOVERY");
    if (r.ok() || r.status().code() != EBUSY || tries == 300) return r.status();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

Status UblkControl::EndUserRecovery(uint32_t dev_id, int daemon_pid) {
  return Send(kCmdEndUserRecovery, dev_id, nullptr, 0, static_cast<uint64_t>(daemon_pid),
              "END_USER_RECOVERY", 120)
      .status();
}

Status UblkControl::StartDevice(uint32_t dev_id, int daemon_pid) {
  return Send(kCmdStartDev, dev_id, nullptr, 0, static_cast<uint64_t>(daemon_pid), "START_DEV", 120)
      .status();
}

Status UblkControl::StopDevice(uint32_t dev_id) {
  return Send(kCmdStopDev, dev_id, nullptr, 0, 0, "STOP_DEV", 120).status();
}

Status UblkControl::DeleteDevice(uint32_t dev_id) {
  return Send(kCmdDelDev, dev_id, nullptr, 0, 0, "DEL_DEV", 120).status();
}

Status UblkControl::DeleteDeviceLater(uint32_t dev_id) {
  return Send(kCmdDelDevAsync, dev_id, nullptr, 0, 0, "DEL_DEV_ASYNC").status();
}

}  // namespace qcow2kit::ublk
