#include "io/image_lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "fmt/format.h"

namespace qcow2kit {
namespace {

// file-posix.c: "Libvirt takes byte 0, we start from higher bytes".
constexpr off_t kPermBase = 100;    // RAW_LOCK_PERM_BASE: "I hold permission i"
constexpr off_t kSharedBase = 200;  // RAW_LOCK_SHARED_BASE: "I deny permission i to others"
constexpr int kPermBits = 4;        // bits of kPermAll (QEMU's PERM_FOREACH)

// Takes (F_RDLCK) or drops (F_UNLCK) our lock on one byte; 0 or errno.
int SetLock(int fd, off_t byte, short type) {
  struct flock fl = {};  // l_pid must be 0 for OFD locks
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  return ::fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : errno;
}

// Whether another open file description holds a lock on `byte` (QEMU's qemu_lock_fd_test
// with exclusive=true: a write lock would conflict with any lock of anybody else, never with
// our own). 0: free; EAGAIN: taken; else the errno of the test.
int TestLock(int fd, off_t byte) {
  struct flock fl = {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) return errno;
  return fl.l_type == F_UNLCK ? 0 : EAGAIN;
}

// QEMU's raw_lock_error_setg_errno: a conflict (EAGAIN) is reported without strerror.
Status LockError(int err, const std::string& message) {
  if (err == EAGAIN) return Status::Error(EAGAIN, message);
  return Status::FromErrno(err, message);
}

}  // namespace

const char* LockPermName(uint8_t perm) {
  switch (perm) {
    case kPermConsistentRead:
      return "consistent read";
    case kPermWrite:
      return "write";
    case kPermWriteUnchanged:
      return "write unchanged";
    case kPermResize:
      return "resize";
  }
  return "unknown";
}

Result<std::unique_ptr<ImageLock>> ImageLock::Acquire(int fd, const std::string& path,
                                                      LockPerms perms) {
  perms.held &= kPermAll;
  perms.unshared &= kPermAll;
  // Our own descriptor for the same open file description: it shares the caller's locks, and
  // unlocking through it later cannot hit an unrelated file that reused a closed fd number.
  int dup = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return Status::FromErrno(errno, fmt::format("Could not lock '{}'", path));
  // Every error return below destroys `lock`, which unlocks what it had taken.
  std::unique_ptr<ImageLock> lock(new ImageLock(dup));

  // raw_apply_lock_bytes: first every byte we claim, so that a concurrent opener running the
  // same steps sees us in its check below (then both may fail, never both succeed).
  for (int pass = 0; pass < 2; ++pass) {
    uint8_t bits = pass == 0 ? perms.held : perms.unshared;
    off_t base = pass == 0 ? kPermBase : kSharedBase;
    for (int i = 0; i < kPermBits; ++i) {
      uint8_t bit = static_cast<uint8_t>(1u << i);
      if (!(bits & bit)) continue;
      int err = SetLock(dup, base + i, F_RDLCK);
      if (err == EINVAL && lock->perms_.held == 0 && lock->perms_.unshared == 0) {
        // No OFD locks in this kernel: QEMU's locking=auto then locks nothing either.
        ::close(dup);
        lock->fd_ = -1;
        return lock;
      }
      if (err != 0) return LockError(err, fmt::format("Failed to lock byte {}", base + i));
      (pass == 0 ? lock->perms_.held : lock->perms_.unshared) |= bit;
    }
  }

  // raw_check_lock_bytes: what we want must not be denied by anybody, and what we deny must
  // not be held by anybody. Same order and wording as QEMU, so the first conflict reported is
  // the one qemu-img would report.
  std::string failure;
  int err = 0;
  for (int i = 0; i < kPermBits && failure.empty(); ++i) {
    uint8_t bit = static_cast<uint8_t>(1u << i);
    if ((perms.held & bit) && (err = TestLock(dup, kSharedBase + i)) != 0) {
      failure = fmt::format("Failed to get \"{}\" lock", LockPermName(bit));
    }
  }
  for (int i = 0; i < kPermBits && failure.empty(); ++i) {
    uint8_t bit = static_cast<uint8_t>(1u << i);
    if ((perms.unshared & bit) && (err = TestLock(dup, kPermBase + i)) != 0) {
      failure = fmt::format("Failed to get shared \"{}\" lock", LockPermName(bit));
    }
  }
  if (!failure.empty()) {
    Status s = LockError(err, failure);
    return Status::Error(
        s.code(), fmt::format("{}\nIs another process using the image [{}]?", s.ToString(), path));
  }
  return lock;
}

ImageLock::~ImageLock() {
  if (fd_ < 0) return;
  // Explicitly: closing our dup alone would keep the locks while the caller's descriptor
  // still refers to the open file description. Unlocking cannot fail for a valid descriptor.
  for (int i = 0; i < kPermBits; ++i) {
    uint8_t bit = static_cast<uint8_t>(1u << i);
    if (perms_.held & bit) SetLock(fd_, kPermBase + i, F_UNLCK);
    if (perms_.unshared & bit) SetLock(fd_, kSharedBase + i, F_UNLCK);
  }
  ::close(fd_);
}

}  // namespace qcow2kit
