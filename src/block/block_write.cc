// The write side of the block layer: in-place writes, allocating writes with copy-on-write,
// write-zeroes, discard and flush, all expressed through the mapping interface.
#include <algorithm>
#include <cstring>

#include "block/align.h"
#include "block/read_layer.h"
#include "block/scratch_extents.h"
#include "qcow2kit/block.h"
#include "qcow2kit/buffer.h"

namespace qcow2kit {
namespace {

bool InPlace(const Extent& e) {
  return e.kind == ExtentKind::kData && e.writable;
}

// Writes zeros as data (where the format cannot record them as zero ranges).
Task<Status> WriteZeroBytes(BlockDevice* dev, uint64_t offset, uint64_t length) {
  static const AlignedBuffer kZeros(1 << 20);
  while (length > 0) {
    uint64_t n = std::min<uint64_t>(length, kZeros.size());
    QK_CO_RETURN_IF_ERROR(co_await dev->Write(offset, kZeros.span().first(n)));
    offset += n;
    length -= n;
  }
  co_return Status::Ok();
}

// Bytes in whole zero blocks at the start / end of `b` (blocks of 4 KiB, the direct-I/O
// alignment, so the rest stays aligned).
constexpr uint64_t kZeroBlock = 4096;
uint64_t ZeroBlocksAtStart(std::span<const std::byte> b) {
  uint64_t n = 0;
  while (n + kZeroBlock <= b.size() && IsAllZero(b.subspan(n, kZeroBlock))) n += kZeroBlock;
  return n;
}
uint64_t ZeroBlocksAtEnd(std::span<const std::byte> b) {
  uint64_t n = 0;
  while (n + kZeroBlock <= b.size() &&
         IsAllZero(b.subspan(b.size() - n - kZeroBlock, kZeroBlock))) {
    n += kZeroBlock;
  }
  return n;
}

// Host space the image owns but has not filled yet (preallocated zero clusters, reserved
// subclusters): written in place, then committed as data at the same host offset.
bool FillInPlace(const Extent& e) {
  return e.kind != ExtentKind::kData && e.kind != ExtentKind::kCompressed && e.writable &&
         e.has_host();
}

// The bytes of whole units [lo, hi) for a write of `data` at `pos`: the write itself, or a
// buffer with the head and tail the write does not cover copied from the current mapping
// (backing file, zeros, compressed or shared data).
Task<Result<std::span<const std::byte>>> WithCopyOnWrite(FormatDriver* d, uint64_t lo, uint64_t hi,
                                                         uint64_t pos,
                                                         std::span<const std::byte> data,
                                                         AlignedBuffer* buffer) {
  const uint64_t end = pos + data.size();
  if (lo == pos && hi == end) co_return data;
  buffer->Resize(hi - lo);
  QK_CO_RETURN_IF_ERROR(co_await ReadLayer(d, lo, buffer->span().first(pos - lo)));
  std::memcpy(buffer->data() + (pos - lo), data.data(), data.size());
  QK_CO_RETURN_IF_ERROR(co_await ReadLayer(d, end, buffer->span().subspan(end - lo, hi - end)));
  co_return std::span<const std::byte>(buffer->span());
}

// Writes guest data to host space of d->file(file_index), once the driver agreed that the
// range holds no metadata (a damaged mapping could point there).
Task<Status> WriteData(FormatDriver* d, uint8_t file_index, std::span<const std::byte> data,
                       uint64_t host) {
  QK_CO_RETURN_IF_ERROR(co_await d->GuardDataWrite(file_index, host, data.size()));
  const uint64_t epoch = d->BeginIo();
  Status s = co_await d->file(file_index)->WriteAt(data, host);
  d->EndIo(epoch);
  co_return s;
}

// Writes guest [lo, hi) to host space at `host` and maps it there. `payload` holds the bytes
// from lo + skip on (the rest is already on disk).
Task<Status> WriteAndCommit(FormatDriver* d, uint8_t file_index, uint64_t host, uint64_t lo,
                            uint64_t hi, std::span<const std::byte> payload, uint64_t skip = 0) {
  if (!payload.empty())
    QK_CO_RETURN_IF_ERROR(co_await WriteData(d, file_index, payload, host + skip));
  MappingUpdate u;
  u.guest_offset = lo;
  u.length = hi - lo;
  u.kind = MappingUpdate::Kind::kData;
  u.host_offset = host;
  co_return co_await d->Commit(std::span(&u, 1));
}

// Allocating write of [pos, run_end) (which starts with a range that cannot be written in
// place). Returns how far it got: less than run_end if, under the lock, the mapping turned
// out to allow in-place writes after all, or if only part of the run could be placed.
Task<Result<uint64_t>> AllocatingWrite(FormatDriver* d, uint64_t pos, uint64_t run_end,
                                       std::span<const std::byte> data) {
  const uint64_t cs = d->cluster_size();
  const uint64_t g = d->write_granule();
  const uint64_t size = d->size();
  auto guard = co_await d->LockRange(pos, run_end - pos);
  // The mapping may have changed while we waited for the lock: look again.
  const uint64_t cstart = AlignDown(pos, cs);
  const uint64_t cend = std::min(AlignUp(run_end, cs), size);
  ScratchExtents scratch;
  std::vector<Extent>& extents = scratch.get();
  QK_CO_RETURN_IF_ERROR(co_await d->Fetch(cstart, cend - cstart, &extents));
  AlignedBuffer buffer;
  for (const Extent& e : extents) {
    if (e.end() <= pos) continue;
    if (e.guest_offset >= run_end) break;
    if (!InPlace(e) && !FillInPlace(e)) continue;
    if (e.guest_offset > pos) {
      run_end = e.guest_offset;  // relocate only up to it (a cluster boundary)
      break;
    }
    if (InPlace(e)) co_return pos;  // writable now: let the caller write in place
    // Owned space: fill whole granules in place. Extents start and end on granules.
    const uint64_t end = std::min(run_end, e.end());
    const uint64_t lo = AlignDown(pos, g);
    const uint64_t hi = std::min(AlignUp(end, g), size);
    QK_CO_ASSIGN_OR_RETURN(
        auto payload, co_await WithCopyOnWrite(d, lo, hi, pos, data.first(end - pos), &buffer));
    QK_CO_RETURN_IF_ERROR(co_await WriteAndCommit(
        d, e.file_index, e.host_offset + (lo - e.guest_offset), lo, hi, payload));
    co_return end;
  }
  // New clusters. A cluster whose current data lives in host space we cannot write (shared
  // with a snapshot, or compressed) moves whole; otherwise only the touched granules are
  // written (with subclusters) and the rest keep reading as before.
  bool keeps_host_data = false;
  for (const Extent& e : extents) {
    if (e.guest_offset >= AlignUp(run_end, cs)) break;
    if (e.has_host() || e.kind == ExtentKind::kCompressed) keeps_host_data = true;
  }
  const uint64_t unit = (g < cs && !keeps_host_data) ? g : cs;
  const uint64_t lo = AlignDown(pos, unit);
  uint64_t hi = std::min(AlignUp(run_end, unit), size);
  QK_CO_ASSIGN_OR_RETURN(FormatDriver::Reservation r,
                         co_await d->Reserve(cstart, AlignUp(hi, cs) - cstart));
  if (cstart + r.length < hi) {
    // Only part of the run could be placed contiguously: write that part now.
    hi = cstart + r.length;
    run_end = std::min(run_end, hi);
  }
  QK_CO_ASSIGN_OR_RETURN(
      auto payload, co_await WithCopyOnWrite(d, lo, hi, pos, data.first(run_end - pos), &buffer));
  const uint64_t host = r.host_offset + (lo - cstart);
  uint64_t skip_head = 0, skip_tail = 0;
  if (r.reads_zeros) {
    // Zero blocks at either end (usually the copy-on-write of an empty head and tail) are
    // already zeros in never-written space: write only the middle. But the file must reach
    // into the last cluster: qemu-img check calls a cluster wholly past the end of the file
    // an error.
    const uint64_t size = payload.size();
    const uint64_t last_cluster = std::max(AlignDown(host + size - 1, cs), host) - host;
    const uint64_t must_end = std::min(size, last_cluster + kZeroBlock);
    skip_tail = std::min(ZeroBlocksAtEnd(payload), size - must_end);
    skip_head = ZeroBlocksAtStart(payload.first(size - skip_tail));
    if (skip_head >= size - skip_tail) {
      skip_head = size - skip_tail > kZeroBlock ? AlignDown(size - skip_tail - 1, kZeroBlock) : 0;
    }
  }
  QK_CO_RETURN_IF_ERROR(co_await WriteAndCommit(
      d, r.file_index, host, lo, hi,
      payload.subspan(skip_head, payload.size() - skip_head - skip_tail), skip_head));
  co_return run_end;
}

}  // namespace

Task<Status> BlockDevice::Write(uint64_t offset, std::span<const std::byte> buf, bool fua) {
  if (offset > size() || buf.size() > size() - offset) {
    co_return Status::Invalid("write past the end of the image");
  }
  FormatDriver* d = top_.get();
  const uint64_t end = offset + buf.size();
  ScratchExtents scratch;
  std::vector<Extent>& extents = scratch.get();
  uint64_t pos = offset;
  while (pos < end) {
    extents.clear();
    QK_CO_RETURN_IF_ERROR(co_await d->Fetch(pos, end - pos, &extents));
    size_t i = 0;
    for (; i < extents.size() && pos < end && InPlace(extents[i]); ++i) {
      const Extent& e = extents[i];
      uint64_t n = std::min(e.end(), end) - pos;
      QK_CO_RETURN_IF_ERROR(co_await WriteData(d, e.file_index, buf.subspan(pos - offset, n),
                                               e.host_offset + (pos - e.guest_offset)));
      pos += n;
    }
    if (pos >= end || i == extents.size()) continue;
    uint64_t run_end = pos;
    for (; i < extents.size() && !InPlace(extents[i]) && run_end < end; ++i) {
      run_end = std::min(extents[i].end(), end);
    }
    QK_CO_ASSIGN_OR_RETURN(
        pos, co_await AllocatingWrite(d, pos, run_end, buf.subspan(pos - offset, run_end - pos)));
  }
  if (fua) QK_CO_RETURN_IF_ERROR(co_await Flush());
  co_return Status::Ok();
}

Task<Status> BlockDevice::WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap, bool fua,
                                      bool no_fallback) {
  if (offset > size() || length > size() - offset) {
    co_return Status::Invalid("write-zeroes past the end of the image");
  }
  FormatDriver* d = top_.get();
  const uint64_t g = d->write_granule();
  const uint64_t end = offset + length;
  const uint64_t a = AlignUp(offset, g);
  const uint64_t b = end == size() ? end : AlignDown(end, g);
  if (no_fallback && length > 0 && (offset != a || end != b || a >= b)) {
    co_return Status::Unsupported("zeroing a partial cluster would write data");
  }
  bool recorded = false;
  if (a < b) {
    auto guard = co_await d->LockRange(a, b - a);
    MappingUpdate u;
    u.guest_offset = a;
    u.length = b - a;
    u.kind = MappingUpdate::Kind::kZero;
    u.keep_host = !may_unmap;
    Status s = co_await d->Commit(std::span(&u, 1));
    if (s.ok()) {
      recorded = true;
    } else if (s.code() != ENOTSUP || no_fallback) {
      co_return s;
    }
  }
  if (recorded) {
    // Partial granules at the edges are written as data.
    if (offset < a) QK_CO_RETURN_IF_ERROR(co_await WriteZeroBytes(this, offset, a - offset));
    if (b < end) QK_CO_RETURN_IF_ERROR(co_await WriteZeroBytes(this, b, end - b));
  } else {
    QK_CO_RETURN_IF_ERROR(co_await WriteZeroBytes(this, offset, length));
  }
  if (fua) QK_CO_RETURN_IF_ERROR(co_await Flush());
  co_return Status::Ok();
}

Task<Status> BlockDevice::Discard(uint64_t offset, uint64_t length) {
  if (offset > size() || length > size() - offset) {
    co_return Status::Invalid("discard past the end of the image");
  }
  FormatDriver* d = top_.get();
  const uint64_t cs = d->cluster_size();
  const uint64_t end = offset + length;
  const uint64_t a = AlignUp(offset, cs);
  const uint64_t b = end == size() ? end : AlignDown(end, cs);
  if (a >= b) co_return Status::Ok();  // discard is advisory: partial clusters stay
  auto guard = co_await d->LockRange(a, b - a);
  MappingUpdate u;
  u.guest_offset = a;
  u.length = b - a;
  u.kind = MappingUpdate::Kind::kDiscard;
  Status s = co_await d->Commit(std::span(&u, 1));
  if (!s.ok() && s.code() != ENOTSUP) co_return s;
  co_return Status::Ok();
}

Task<Status> BlockDevice::Resize(uint64_t new_size, Preallocation prealloc) {
  FormatDriver* d = top_.get();
  const uint64_t old_size = d->size();
  QK_CO_RETURN_IF_ERROR(co_await d->Resize(new_size, prealloc));
  if (new_size <= old_size) co_return Status::Ok();
  // The grown range must read as zeros. Two things could show through: bytes left past the
  // old end in its last cluster (by an earlier shrink), and a backing file longer than the
  // old size (QEMU then zeroes the whole grown range, and so do we).
  uint64_t zero_end = old_size;
  const uint64_t tail_end = std::min(AlignUp(old_size, d->cluster_size()), new_size);
  if (tail_end > old_size) {
    AlignedBuffer tail(tail_end - old_size);
    QK_CO_RETURN_IF_ERROR(co_await Read(old_size, tail.span()));
    const auto bytes = tail.span();
    if (std::any_of(bytes.begin(), bytes.end(), [](std::byte b) { return b != std::byte{0}; })) {
      zero_end = tail_end;
    }
  }
  if (d->backing() && d->backing()->size() > old_size) zero_end = new_size;
  if (zero_end > old_size) {
    QK_CO_RETURN_IF_ERROR(co_await WriteZeroes(old_size, zero_end - old_size,
                                               /*may_unmap=*/prealloc == Preallocation::kOff));
  }
  co_return co_await Flush();
}

Task<Status> BlockDevice::Flush() {
  co_return co_await top_->Flush();
}

Task<Status> BlockDevice::Close() {
  co_return co_await top_->Close();
}

}  // namespace qcow2kit
