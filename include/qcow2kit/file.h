// File: an open host file whose I/O goes through the current reactor's engine.
//
// Reads and writes are positional and complete fully: short transfers are continued and
// EINTR/EAGAIN retried. With direct I/O (O_DIRECT), requests that are not aligned go through an
// aligned bounce buffer (read-modify-write for writes), so callers may use any offset/length.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include "qcow2kit/async_mutex.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

class ImageLock;  // src/io/image_lock.h: QEMU-compatible image locks

enum class CacheMode {
  kWriteback,  // page cache
  kNone,       // O_DIRECT
  kUnsafe,     // page cache, and syncs are skipped (QEMU's cache=unsafe: a crash may lose
               // anything, even what a flush completed)
};
// Parses qemu-img's -t names: "none", "writeback", "unsafe" (also "directsync" -> none,
// "writethrough" -> writeback).
Result<CacheMode> ParseCacheMode(const std::string& name);

// How space for a grown range is reserved (qemu-img's preallocation= for create and resize;
// file-posix's truncate modes for plain files).
enum class Preallocation { kOff, kMetadata, kFalloc, kFull };
const char* PreallocationName(Preallocation p);  // "off", "metadata", "falloc", "full"

class File {
 public:
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  // Opens `path` read-only or read-write. With kNone, falls back to buffered I/O if the
  // filesystem refuses O_DIRECT (tmpfs), as QEMU does not: we prefer working over failing.
  static Result<std::unique_ptr<File>> Open(const std::string& path, bool writable,
                                            CacheMode cache = CacheMode::kWriteback);
  // Creates (or truncates) `path` for writing.
  static Result<std::unique_ptr<File>> Create(const std::string& path,
                                              CacheMode cache = CacheMode::kWriteback);
  // Wraps an already open descriptor (takes ownership).
  static std::unique_ptr<File> Adopt(std::string path, int fd, bool writable, bool direct);

  const std::string& path() const { return path_; }
  int fd() const { return fd_; }
  bool writable() const { return writable_; }
  bool direct() const { return direct_; }
  // CacheMode::kUnsafe: Sync() does nothing.
  void set_skip_sync(bool skip) { skip_sync_ = skip; }
  // Keeps `lock` (taken on this file's descriptor) until the file is closed.
  void HoldLock(std::unique_ptr<ImageLock> lock);

  // Reads up to buf.size() bytes at `offset`; fewer only at end of file. Returns bytes read.
  Task<Result<size_t>> ReadAt(std::span<std::byte> buf, uint64_t offset);
  // Reads exactly buf.size() bytes; reaching end of file first is an error naming the offset.
  Task<Status> ReadExact(std::span<std::byte> buf, uint64_t offset);
  // Reads buf.size() bytes, zero-filling whatever lies past end of file.
  Task<Status> ReadZeroPadded(std::span<std::byte> buf, uint64_t offset);
  Task<Status> WriteAt(std::span<const std::byte> buf, uint64_t offset);
  Task<Status> Sync();  // fdatasync
  // Sets the file length as QEMU's file-posix truncate does: growing with kFalloc allocates
  // the new range (posix_fallocate), with kFull writes zeros over it, otherwise leaves a hole
  // (kMetadata means kOff for a plain file). A file grown from empty gets its first block
  // written, as QEMU does, so that alignment probing sees data.
  Task<Status> Truncate(uint64_t length, Preallocation mode = Preallocation::kOff);

  // Current file length (fstat).
  Result<uint64_t> Size() const;
  // Bytes of disk the file occupies (st_blocks * 512), as qemu-img's "disk size".
  Result<uint64_t> AllocatedBytes() const;
  // SEEK_DATA/SEEK_HOLE probe: whether [offset, offset+len) starts in a hole, and how far that
  // (hole or data) run goes, capped at `len`. Past EOF counts as a hole.
  Result<std::pair<bool, uint64_t>> ProbeHole(uint64_t offset, uint64_t len) const;

 private:
  File(std::string path, int fd, bool writable, bool direct);
  // Moves len bytes through `fd` (this file's descriptor when -1).
  Task<Result<size_t>> Transfer(bool write, std::byte* buf, size_t len, uint64_t offset,
                                int fd = -1);
  // A second descriptor of the file without O_DIRECT (opened on first use, any thread).
  Result<int> BufferedFd();
  Task<Result<size_t>> BounceRead(std::span<std::byte> buf, uint64_t offset);
  Task<Status> BounceWrite(std::span<const std::byte> buf, uint64_t offset);

  std::string path_;
  int fd_;
  bool writable_;
  bool direct_;
  bool skip_sync_ = false;
  std::unique_ptr<ImageLock> lock_;
  // Read-modify-writes of partial blocks (direct I/O) go one at a time: two of them in one
  // block would each write back the other's old bytes.
  AsyncMutex bounce_mutex_;
  std::once_flag buffered_once_;
  int buffered_fd_ = -1;
  int buffered_errno_ = 0;
};

}  // namespace qcow2kit
