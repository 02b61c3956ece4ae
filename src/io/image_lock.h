// ImageLock: the byte-range locks QEMU's file-posix driver takes on every file it opens, so
// that qcow2kit and QEMU (qemu-img, qemu-io, qemu-nbd, a running VM) refuse to write an image
// the other is using, and refuse to use an image the other is writing.
//
// The protocol (QEMU block/file-posix.c, raw_apply_lock_bytes / raw_check_lock_bytes): each
// permission bit i of the block layer (BLK_PERM_*) has two lock bytes in the file. A user
// holding permission i takes a shared (F_RDLCK) OFD lock on byte 100 + i; a user that does not
// let others have permission i takes a shared lock on byte 200 + i. Opening checks the other
// side with F_OFD_GETLK for a write lock: wanting permission i fails if anybody locked byte
// 200 + i, refusing to share i fails if anybody locked byte 100 + i. Only shared locks are ever
// taken, so any number of users can hold the same bytes; the conflict is always between the
// "perm" and the "shared" ranges. The locks are advisory: they never block I/O.
//
// OFD locks belong to the open file description, not the process: a second open() of the same
// file in this process conflicts like another process would (what QEMU and our tests rely on).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "qcow2kit/status.h"

namespace qcow2kit {

// QEMU's BLK_PERM_* (include/block/block-common.h in 7.2). Bit 4 was BLK_PERM_GRAPH_MOD until
// QEMU 6.1; 6.2 dropped it and stopped locking byte 104/204, so we do not use it either.
enum LockPerm : uint8_t {
  kPermConsistentRead = 0x01,  // "consistent read"
  kPermWrite = 0x02,           // "write"
  kPermWriteUnchanged = 0x04,  // "write unchanged"
  kPermResize = 0x08,          // "resize"
  kPermAll = 0x0f,
};

// The permissions a user of a file claims: those it holds, and those it denies to others.
struct LockPerms {
  uint8_t held = 0;
  uint8_t unshared = 0;
};

// QEMU's name of one permission bit, as in its messages ("consistent read", "write", ...).
const char* LockPermName(uint8_t perm);

// Holds QEMU-compatible image locks on a file for as long as it lives.
//
// It keeps its own duplicate of the descriptor, so it stays valid whatever happens to the
// caller's descriptor: the locks are dropped exactly when the ImageLock is destroyed (or, if the
// caller's descriptor outlives it, explicitly unlocked then). Take one per open file description:
// locks of one description merge, so destroying a second ImageLock would drop the first's too.
class ImageLock {
 public:
  ~ImageLock();
  ImageLock(const ImageLock&) = delete;
  ImageLock& operator=(const ImageLock&) = delete;

  // Locks the bytes for `perms` on the open file description of `fd` and checks that no other
  // description holds conflicting ones. On conflict nothing stays locked and the error reads as
  // QEMU's: 'Failed to get "write" lock' (we want a permission someone denies) or 'Failed to
  // get shared "write" lock' (we deny a permission someone holds), then "Is another process
  // using the image [PATH]?". `path` only names the file in messages.
  static Result<std::unique_ptr<ImageLock>> Acquire(int fd, const std::string& path,
                                                    LockPerms perms);

 private:
  explicit ImageLock(int fd) : fd_(fd) {}

  int fd_;           // our dup of the caller's descriptor; -1 if the kernel has no OFD locks
  LockPerms perms_;  // the bytes locked so far
};

}  // namespace qcow2kit
