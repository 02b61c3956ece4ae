// The ublk kernel interface (drivers/block/ublk_drv.c, include/uapi/linux/ublk_cmd.h).
//
// Debian 12's linux-libc-dev is 6.1; the device runs on Debian's 6.12 kernel. The structures
// and the original command numbers come from the 6.1 header; what 6.1 lacks is defined here
// with the kernel version that added it (the UAPI is stable: numbers never change). Commands
// are sent ioctl-encoded (UBLK_F_CMD_IOCTL_ENCODE, 6.3), as the kernel prefers.
#pragma once

#include <linux/ublk_cmd.h>
#include <sys/ioctl.h>

#include <cstddef>
#include <cstdint>

namespace qcow2kit::ublk {

// 6.3: ioctl-encoded opcodes and the flag that asks for them.
inline constexpr uint64_t kFlagCmdIoctlEncode = 1ull << 6;
inline constexpr unsigned kCmdGetDevInfo = _IOR('u', UBLK_CMD_GET_DEV_INFO, ublksrv_ctrl_cmd);
inline constexpr unsigned kCmdAddDev = _IOWR('u', UBLK_CMD_ADD_DEV, ublksrv_ctrl_cmd);
inline constexpr unsigned kCmdDelDev = _IOWR('u', UBLK_CMD_DEL_DEV, ublksrv_ctrl_cmd);
inline constexpr unsigned kCmdStartDev = _IOWR('u', UBLK_CMD_START_DEV, ublksrv_ctrl_cmd);
inline constexpr unsigned kCmdStopDev = _IOWR('u', UBLK_CMD_STOP_DEV, ublksrv_ctrl_cmd);
inline constexpr unsigned kCmdSetParams = _IOWR('u', UBLK_CMD_SET_PARAMS, ublksrv_ctrl_cmd);
inline constexpr unsigned kCmdGetParams = _IOR('u', UBLK_CMD_GET_PARAMS, ublksrv_ctrl_cmd);
inline constexpr unsigned kCmdStartUserRecovery =
    _IOWR('u', UBLK_CMD_START_USER_RECOVERY, ublksrv_ctrl_cmd);
inline constexpr unsigned kCmdEndUserRecovery =
    _IOWR('u', UBLK_CMD_END_USER_RECOVERY, ublksrv_ctrl_cmd);
// 6.5: the driver's feature flags as a u64.
inline constexpr unsigned kCmdGetFeatures = _IOR('u', 0x13, ublksrv_ctrl_cmd);
// 6.6: delete without waiting for the character device to be closed.
inline constexpr unsigned kCmdDelDevAsync = _IOR('u', 0x14, ublksrv_ctrl_cmd);

inline constexpr unsigned kIoFetchReq = _IOWR('u', UBLK_IO_FETCH_REQ, ublksrv_io_cmd);
inline constexpr unsigned kIoCommitAndFetchReq =
    _IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, ublksrv_io_cmd);

// Bytes of one request descriptor, and the stride between queues' descriptor arrays in the
// character device's mmap space.
inline constexpr size_t kDescBytes = sizeof(ublksrv_io_desc);
inline constexpr uint64_t kQueueMmapStride = uint64_t{UBLK_MAX_QUEUE_DEPTH} * kDescBytes;

static_assert(sizeof(ublksrv_ctrl_cmd) == 32, "ublk control command layout");
static_assert(sizeof(ublksrv_io_cmd) == 16, "ublk I/O command layout");
static_assert(sizeof(ublksrv_io_desc) == 24, "ublk descriptor layout");

}  // namespace qcow2kit::ublk
