#include "qcow2kit/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fmt/format.h"
#include "io/image_lock.h"
#include "qcow2kit/buffer.h"
#include "qcow2kit/reactor.h"

namespace qcow2kit {
namespace {

// One engine request moves at most this much; larger transfers are split.
constexpr size_t kMaxChunk = 1u << 30;

bool Aligned(uint64_t v) {
  return v % kIoAlignment == 0;
}

Result<std::unique_ptr<File>> OpenWithFlags(const std::string& path, int flags, CacheMode cache,
                                            bool writable);

}  // namespace

Result<CacheMode> ParseCacheMode(const std::string& name) {
  if (name == "none" || name == "directsync") return CacheMode::kNone;
  if (name == "writeback" || name == "writethrough") return CacheMode::kWriteback;
  if (name == "unsafe") return CacheMode::kUnsafe;
  return Status::Invalid("Invalid cache mode: " + name);
}

File::File(std::string path, int fd, bool writable, bool direct)
    : path_(std::move(path)), fd_(fd), writable_(writable), direct_(direct) {}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
  if (buffered_fd_ >= 0) ::close(buffered_fd_);
}

void File::HoldLock(std::unique_ptr<ImageLock> lock) {
  lock_ = std::move(lock);
}

namespace {
Result<std::unique_ptr<File>> OpenWithFlags(const std::string& path, int flags, CacheMode cache,
                                            bool writable) {
  flags |= O_CLOEXEC;
  bool direct = cache == CacheMode::kNone;
  int fd = ::open(path.c_str(), flags | (direct ? O_DIRECT : 0), 0644);
  if (fd < 0 && direct && errno == EINVAL) {
    // The filesystem does not support O_DIRECT (tmpfs): use the page cache instead.
    direct = false;
    fd = ::open(path.c_str(), flags, 0644);
  }
  if (fd < 0) return Status::FromErrno(errno, "Could not open '" + path + "'");
  struct stat st;
  if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    ::close(fd);
    return Status::Error(EISDIR, "Could not open '" + path + "': Is a directory");
  }
  auto file = File::Adopt(path, fd, writable, direct);
  file->set_skip_sync(cache == CacheMode::kUnsafe);
  return file;
}
}  // namespace

std::unique_ptr<File> File::Adopt(std::string path, int fd, bool writable, bool direct) {
  return std::unique_ptr<File>(new File(std::move(path), fd, writable, direct));
}

Result<std::unique_ptr<File>> File::Open(const std::string& path, bool writable, CacheMode cache) {
  return OpenWithFlags(path, writable ? O_RDWR : O_RDONLY, cache, writable);
}

Result<std::unique_ptr<File>> File::Create(const std::string& path, CacheMode cache) {
  return OpenWithFlags(path, O_RDWR | O_CREAT | O_TRUNC, cache, true);
}

Task<Result<size_t>> File::Transfer(bool write, std::byte* buf, size_t len, uint64_t offset,
                                    int fd) {
  if (fd < 0) fd = fd_;
  size_t done = 0;
  while (done < len) {
    IoAwaiter io;
    io.req.op = write ? IoOp::kWrite : IoOp::kRead;
    io.req.fd = fd;
    io.req.buf = buf + done;
    io.req.len = static_cast<uint32_t>(std::min(len - done, kMaxChunk));
    io.req.offset = offset + done;
    int64_t r = co_await io;
    if (r == -EINTR || r == -EAGAIN) continue;
    if (r < 0) {
      co_return Status::FromErrno(static_cast<int>(-r),
                                  fmt::format("{} failed on '{}' at offset {:#x}",
                                              write ? "write" : "read", path_, offset + done));
    }
    if (r == 0) {
      if (!write) break;  // end of file
      co_return Status::IoError(
          fmt::format("write to '{}' at offset {:#x} made no progress", path_, offset + done));
    }
    done += static_cast<size_t>(r);
    // O_DIRECT may stop short at end of file in the middle of a block: that is EOF too.
    if (direct_ && fd == fd_ && !write && !Aligned(done)) break;
  }
  co_return done;
}

Task<Result<size_t>> File::BounceRead(std::span<std::byte> buf, uint64_t offset) {
  uint64_t start = offset / kIoAlignment * kIoAlignment;
  uint64_t end = (offset + buf.size() + kIoAlignment - 1) / kIoAlignment * kIoAlignment;
  AlignedBuffer bounce(end - start);
  auto r = co_await Transfer(false, bounce.data(), end - start, start);
  if (!r.ok()) co_return r.status();
  uint64_t head = offset - start;
  size_t got = *r > head ? std::min<size_t>(*r - head, buf.size()) : 0;
  std::memcpy(buf.data(), bounce.data() + head, got);
  co_return got;
}

Task<Result<size_t>> File::ReadAt(std::span<std::byte> buf, uint64_t offset) {
  if (direct_ && !(Aligned(offset) && Aligned(buf.size()) &&
                   Aligned(reinterpret_cast<uintptr_t>(buf.data())))) {
    co_return co_await BounceRead(buf, offset);
  }
  co_return co_await Transfer(false, buf.data(), buf.size(), offset);
}

Task<Status> File::ReadExact(std::span<std::byte> buf, uint64_t offset) {
  auto r = co_await ReadAt(buf, offset);
  if (!r.ok()) co_return r.status();
  if (*r < buf.size()) {
    co_return Status::IoError(fmt::format(
        "'{}': read of {} bytes at offset {:#x} runs past end of file", path_, buf.size(), offset));
  }
  co_return Status::Ok();
}

Task<Status> File::ReadZeroPadded(std::span<std::byte> buf, uint64_t offset) {
  auto r = co_await ReadAt(buf, offset);
  if (!r.ok()) co_return r.status();
  std::memset(buf.data() + *r, 0, buf.size() - *r);
  co_return Status::Ok();
}

Task<Status> File::BounceWrite(std::span<const std::byte> buf, uint64_t offset) {
  // Read-modify-write of the aligned blocks around the request.
  auto guard = co_await bounce_mutex_.Lock();
  uint64_t start = offset / kIoAlignment * kIoAlignment;
  uint64_t end = (offset + buf.size() + kIoAlignment - 1) / kIoAlignment * kIoAlignment;
  auto old_size = Size();
  if (!old_size.ok()) co_return old_size.status();
  if (end > std::max<uint64_t>(*old_size, offset + buf.size())) {
    // The padded block would reach past both the old end of the file and the end of the
    // write: it would grow a file of fixed size (a raw image whose size is not a multiple of
    // the block), and cutting it back afterwards races with other writes that extend the file
    // (truncate waits for their direct I/O and then drops it). Write exactly these bytes
    // through the page cache instead; direct reads and writes of the range later flush and
    // drop those pages first, and fdatasync covers them.
    auto fd = BufferedFd();
    if (!fd.ok()) co_return fd.status();
    auto w = co_await Transfer(true, const_cast<std::byte*>(buf.data()), buf.size(), offset, *fd);
    if (!w.ok()) co_return w.status();
    co_return Status::Ok();
  }
  AlignedBuffer bounce(end - start);
  auto r = co_await Transfer(false, bounce.data(), end - start, start);
  if (!r.ok()) co_return r.status();
  std::memcpy(bounce.data() + (offset - start), buf.data(), buf.size());
  auto w = co_await Transfer(true, bounce.data(), end - start, start);
  if (!w.ok()) co_return w.status();
  co_return Status::Ok();
}

Result<int> File::BufferedFd() {
  std::call_once(buffered_once_, [this] {
    const std::string self = "/proc/self/fd/" + std::to_string(fd_);
    buffered_fd_ = ::open(self.c_str(), O_WRONLY | O_CLOEXEC);
    buffered_errno_ = buffered_fd_ < 0 ? errno : 0;
  });
  if (buffered_fd_ < 0) {
    return Status::FromErrno(buffered_errno_, "reopen '" + path_ + "' for buffered writes");
  }
  return buffered_fd_;
}

Task<Status> File::WriteAt(std::span<const std::byte> buf, uint64_t offset) {
  if (direct_ && !(Aligned(offset) && Aligned(buf.size()) &&
                   Aligned(reinterpret_cast<uintptr_t>(buf.data())))) {
    co_return co_await BounceWrite(buf, offset);
  }
  auto r = co_await Transfer(true, const_cast<std::byte*>(buf.data()), buf.size(), offset);
  if (!r.ok()) co_return r.status();
  co_return Status::Ok();
}

Task<Status> File::Sync() {
  if (skip_sync_) co_return Status::Ok();
  IoAwaiter io;
  io.req.op = IoOp::kFdatasync;
  io.req.fd = fd_;
  int64_t r = co_await io;
  if (r < 0) co_return Status::FromErrno(static_cast<int>(-r), "fdatasync '" + path_ + "'");
  co_return Status::Ok();
}

Result<uint64_t> File::Size() const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) return Status::FromErrno(errno, "stat '" + path_ + "'");
  if (S_ISBLK(st.st_mode)) {
    off_t end = ::lseek(fd_, 0, SEEK_END);
    if (end < 0) return Status::FromErrno(errno, "seek '" + path_ + "'");
    return static_cast<uint64_t>(end);
  }
  return static_cast<uint64_t>(st.st_size);
}

Result<uint64_t> File::AllocatedBytes() const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) return Status::FromErrno(errno, "stat '" + path_ + "'");
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

Result<std::pair<bool, uint64_t>> File::ProbeHole(uint64_t offset, uint64_t len) const {
  off_t data = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0) {
    if (errno == ENXIO) return std::make_pair(true, len);  // only a hole (or EOF) follows
    return std::make_pair(false, len);                     // no SEEK_DATA support: all data
  }
  if (static_cast<uint64_t>(data) > offset) {
    return std::make_pair(true, std::min<uint64_t>(len, data - offset));
  }
  off_t hole = ::lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
  if (hole < 0 || static_cast<uint64_t>(hole) <= offset) return std::make_pair(false, len);
  return std::make_pair(false, std::min<uint64_t>(len, hole - offset));
}

const char* PreallocationName(Preallocation p) {
  switch (p) {
    case Preallocation::kOff:
      return "off";
    case Preallocation::kMetadata:
      return "metadata";
    case Preallocation::kFalloc:
      return "falloc";
    case Preallocation::kFull:
      return "full";
  }
  return "?";
}

Task<Status> File::Truncate(uint64_t length, Preallocation mode) {
  auto old = Size();
  if (!old.ok()) co_return old.status();
  const uint64_t from = *old;
  if (length > from && mode == Preallocation::kFalloc) {
    int err = ::posix_fallocate(fd_, static_cast<off_t>(from), static_cast<off_t>(length - from));
    if (err != 0) co_return Status::FromErrno(err, "Could not preallocate new data");
  } else if (::ftruncate(fd_, static_cast<off_t>(length)) != 0) {
    co_return Status::FromErrno(errno, "Could not resize file");
  }
  if (length <= from) co_return Status::Ok();
  if (mode == Preallocation::kFull) {
    const std::vector<std::byte> zeros(std::min<uint64_t>(length - from, 1 << 20));
    for (uint64_t at = from; at < length;) {
      const uint64_t n = std::min<uint64_t>(zeros.size(), length - at);
      Status s = co_await WriteAt(std::span(zeros).first(n), at);
      if (!s.ok()) co_return s.WithContext("Could not write zeros for preallocation");
      at += n;
    }
  } else if (from == 0) {
    // file-posix allocate_first_block; failures do not matter.
    static const char zeros[4096] = {};
    (void)!::pwrite(fd_, zeros, length < sizeof(zeros) ? 512 : sizeof(zeros), 0);
  }
  co_return Status::Ok();
}

}  // namespace qcow2kit
