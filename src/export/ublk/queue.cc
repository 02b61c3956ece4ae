#include "export/ublk/queue.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <span>

#include "export/ublk/ublk_abi.h"
#include "fmt/format.h"
#include "qcow2kit/buffer.h"
#include "qcow2kit/reactor.h"

namespace qcow2kit::ublk {

Result<std::unique_ptr<UblkQueue>> UblkQueue::Create(int char_fd, SharedDevice::Port* dev,
                                                     const QueueOptions& options) {
  auto q = std::unique_ptr<UblkQueue>(new UblkQueue(char_fd, dev, options));
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  q->mapped_bytes_ = (options.depth * kDescBytes + page - 1) / page * page;
  void* m =
      ::mmap(nullptr, q->mapped_bytes_, PROT_READ, MAP_SHARED | MAP_POPULATE, char_fd,
             static_cast<off_t>(UBLKSRV_CMD_BUF_OFFSET + options.queue_id * kQueueMmapStride));
  if (m == MAP_FAILED) {
    return Status::FromErrno(errno,
                             fmt::format("mmap of queue {}'s descriptors", options.queue_id));
  }
  q->descs_ = static_cast<const ublksrv_io_desc*>(m);
  void* b = nullptr;
  if (::posix_memalign(&b, page, size_t{options.depth} * options.max_io_bytes) != 0) {
    return Status::Error(ENOMEM, "ublk request buffers");
  }
  q->buffers_ = static_cast<std::byte*>(b);
  return q;
}

UblkQueue::~UblkQueue() {
  if (descs_) ::munmap(const_cast<ublksrv_io_desc*>(descs_), mapped_bytes_);
  std::free(buffers_);
}

void UblkQueue::Start() {
  for (uint16_t tag = 0; tag < options_.depth; ++tag) {
    ++running_;
    Reactor::Current()->Spawn(ServeTag(tag));
  }
}

Task<void> UblkQueue::ServeTag(uint16_t tag) {
  std::byte* buf = buffers_ + size_t{tag} * options_.max_io_bytes;
  int32_t result = 0;
  for (bool first = true;; first = false) {
    ublksrv_io_cmd cmd{};
    cmd.q_id = options_.queue_id;
    cmd.tag = tag;
    cmd.result = result;
    cmd.addr = reinterpret_cast<uint64_t>(buf);
    IoAwaiter io{};
    io.req.op = IoOp::kUringCmd;
    io.req.fd = char_fd_;
    io.req.msg_flags = first ? kIoFetchReq : kIoCommitAndFetchReq;
    io.req.buf = &cmd;
    const int64_t fetched = co_await io;
    // UBLK_IO_RES_ABORT: the device is stopping; any other error ends this tag too.
    if (fetched != UBLK_IO_RES_OK) break;
    const ublksrv_io_desc desc = descs_[tag];
    const int32_t handled = co_await Handle(desc, buf);
    result = handled;
  }
  --running_;
}

Task<int32_t> UblkQueue::Handle(const ublksrv_io_desc& desc, std::byte* buf) {
  const uint64_t offset = desc.start_sector << 9;
  const uint64_t length = uint64_t{desc.nr_sectors} << 9;
  const uint32_t flags = ublksrv_get_flags(&desc);
  const uint8_t op = ublksrv_get_op(&desc);
  const bool moves_data = op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE;
  if (moves_data && length > options_.max_io_bytes) co_return -EINVAL;
  if (op != UBLK_IO_OP_FLUSH && (offset > dev_->size() || length > dev_->size() - offset)) {
    co_return -EIO;  // past the end: the kernel should not send it
  }
  Status s;
  switch (op) {
    case UBLK_IO_OP_READ: {
      Status r = co_await dev_->Read(offset, std::span(buf, length));
      s = r;
      break;
    }
    case UBLK_IO_OP_WRITE: {
      const std::span<const std::byte> data(buf, length);
      const bool fua = (flags & UBLK_IO_F_FUA) != 0;
      if (options_.detect_zeroes != QueueOptions::DetectZeroes::kOff && IsAllZero(data)) {
        const bool unmap =
            options_.discard && options_.detect_zeroes == QueueOptions::DetectZeroes::kUnmap;
        Status z = co_await dev_->WriteZeroes(offset, length, unmap, fua);
        s = z;
        break;
      }
      Status w = co_await dev_->Write(offset, data, fua);
      s = w;
      break;
    }
    case UBLK_IO_OP_FLUSH: {
      Status f = co_await dev_->Flush();
      s = f;
      break;
    }
    case UBLK_IO_OP_DISCARD: {
      if (options_.discard) {
        Status d = co_await dev_->Discard(offset, length);
        s = d;
      }
      break;
    }
    case UBLK_IO_OP_WRITE_ZEROES: {
      Status z = co_await dev_->WriteZeroes(offset, length, (flags & UBLK_IO_F_NOUNMAP) == 0,
                                            (flags & UBLK_IO_F_FUA) != 0);
      s = z;
      break;
    }
    default:
      co_return -EOPNOTSUPP;
  }
  if (!s.ok()) {
    const int code = s.code();
    co_return -(code == ENOSPC || code == EROFS || code == EOPNOTSUPP ? code : EIO);
  }
  co_return moves_data ? static_cast<int32_t>(length) : 0;
}

}  // namespace qcow2kit::ublk
