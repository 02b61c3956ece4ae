#include "tools/compare.h"

#include <algorithm>
#include <vector>

#include "fmt/format.h"
#include "qcow2kit/buffer.h"
#include "tools/first_unreadable.h"

namespace qcow2kit::tools {
namespace {

constexpr uint64_t kChunk = 2 << 20;  // qemu-img's IO_BUF_SIZE
constexpr uint64_t kSector = 512;
constexpr uint64_t kStatusWindow = 1ull << 30;

// Block status of one image, walked forwards: the run containing an offset, fetched a window
// at a time so that memory stays bounded on images with many extents.
class StatusCursor {
 public:
  explicit StatusCursor(BlockDevice& dev) : dev_(dev) {}

  Task<Result<BlockStatusExtent>> At(uint64_t offset) {
    while (i_ < runs_.size() && runs_[i_].start + runs_[i_].length <= offset) ++i_;
    if (i_ == runs_.size() || runs_[i_].start > offset) {
      runs_.clear();
      i_ = 0;
      // Windows on a fixed grid: two images' runs are cut at the same places.
      const uint64_t end = std::min((offset / kStatusWindow + 1) * kStatusWindow, dev_.size());
      QK_CO_RETURN_IF_ERROR(co_await dev_.BlockStatus(offset, end - offset, &runs_));
      if (runs_.empty() || runs_[0].start > offset) {
        co_return Status::IoError("no block status for offset " + std::to_string(offset));
      }
    }
    BlockStatusExtent e = runs_[i_];
    e.length -= offset - e.start;
    e.start = offset;
    co_return e;
  }

 private:
  BlockDevice& dev_;
  std::vector<BlockStatusExtent> runs_;
  size_t i_ = 0;
};

// What qemu-img compares in strict mode: the status flags (an allocated zero cluster and an
// unallocated range differ, as do data with and without a host offset).
bool SameStatus(const BlockStatusExtent& x, uint64_t size_x, const BlockStatusExtent& y,
                uint64_t size_y) {
  // QEMU's flags include EOF: whether the run reaches the end of the image.
  const bool eof_x = x.start + x.length == size_x;
  const bool eof_y = y.start + y.length == size_y;
  return x.present == y.present && x.zero == y.zero && x.data == y.data && eof_x == eof_y &&
         (x.offset != Extent::kNoHost) == (y.offset != Extent::kNoHost);
}

// exit 3: the block status of `name` could not be read.
CompareOutcome& StatusFailed(CompareOutcome& r, const std::string& name) {
  r.exit_code = 3;
  r.err = "Sector allocation test failed for " + name + "\n";
  return r;
}

// First non-zero byte of buf, or -1.
int64_t FirstNonZero(std::span<const std::byte> buf) {
  for (size_t at = 0; at < buf.size(); at += 4096) {
    auto piece = buf.subspan(at, std::min<size_t>(4096, buf.size() - at));
    if (IsAllZero(piece)) continue;
    for (size_t i = 0; i < piece.size(); ++i) {
      if (piece[i] != std::byte{0}) return static_cast<int64_t>(at + i);
    }
  }
  return -1;
}

// Reads for the comparison; a failure fills the outcome (exit 4), a non-zero byte where
// zeros are due too (exit 1).
struct Reader {
  explicit Reader(CompareOutcome* r) : r(r), buf_a(kChunk), buf_b(kChunk) {}

  Task<bool> Read(BlockDevice& dev, const std::string& name, uint64_t offset, uint64_t n,
                  AlignedBuffer& buf) {
    Status s = co_await dev.Read(offset, buf.span().first(n));
    if (s.ok()) co_return true;
    auto [at, why] = co_await FirstUnreadable(dev, offset, buf.span().first(n), std::move(s));
    r->exit_code = 4;
    r->err = fmt::format("Error while reading offset {} of {}: {}\n", at, name, why.message());
    co_return false;
  }

  // The range is allocated in `dev` and not in the other image: it must read as zeros.
  Task<bool> ExpectZeros(BlockDevice& dev, const std::string& name, uint64_t offset, uint64_t n) {
    const bool ok = co_await Read(dev, name, offset, n, buf_a);
    if (!ok) co_return false;
    const int64_t at = FirstNonZero(buf_a.span().first(n));
    if (at < 0) co_return true;
    r->exit_code = 1;
    r->out += fmt::format("Content mismatch at offset {}!\n", offset + at);
    co_return false;
  }

  CompareOutcome* r;
  AlignedBuffer buf_a;
  AlignedBuffer buf_b;
};

}  // namespace

Task<CompareOutcome> CompareImages(BlockDevice& a, const std::string& name_a, BlockDevice& b,
                                   const std::string& name_b, bool strict,
                                   const std::function<void(double)>& progress) {
  CompareOutcome r;
  const uint64_t size_a = a.size();
  const uint64_t size_b = b.size();
  const uint64_t common = std::min(size_a, size_b);
  const uint64_t longest = std::max(size_a, size_b);
  uint64_t done = 0;
  auto advance = [&](uint64_t n) {
    done += n;
    if (progress && longest) progress(100.0 * double(done) / double(longest));
  };
  if (strict && size_a != size_b) {
    r.exit_code = 1;
    r.out = "Strict mode: Image size mismatch!\n";
    co_return r;
  }
  Reader io(&r);
  StatusCursor cursor_a(a), cursor_b(b);
  uint64_t offset = 0;
  while (offset < common) {
    auto sa = co_await cursor_a.At(offset);
    if (!sa.ok()) {
      co_return StatusFailed(r, name_a);
    }
    auto sb = co_await cursor_b.At(offset);
    if (!sb.ok()) {
      co_return StatusFailed(r, name_b);
    }
    uint64_t chunk = std::min({sa->length, sb->length, common - offset});
    if (strict && !SameStatus(*sa, size_a, *sb, size_b)) {
      r.exit_code = 1;
      r.out = fmt::format("Strict mode: Offset {} block status mismatch!\n", offset);
      co_return r;
    }
    if (sa->zero && sb->zero) {
      // nothing to compare
    } else if (sa->present == sb->present) {
      if (sa->present) {
        chunk = std::min(chunk, kChunk);
        bool ok = co_await io.Read(a, name_a, offset, chunk, io.buf_a);
        if (ok) ok = co_await io.Read(b, name_b, offset, chunk, io.buf_b);
        if (!ok) co_return r;
        // Sector by sector, as qemu-img: the first sector that differs is named.
        for (uint64_t s = 0; s < chunk; s += kSector) {
          const uint64_t n = std::min(kSector, chunk - s);
          if (std::memcmp(io.buf_a.data() + s, io.buf_b.data() + s, n) != 0) {
            r.exit_code = 1;
            r.out = fmt::format("Content mismatch at offset {}!\n", offset + s);
            co_return r;
          }
        }
      }
    } else {
      chunk = std::min(chunk, kChunk);
      BlockDevice& dev = sa->present ? a : b;
      const bool ok = co_await io.ExpectZeros(dev, sa->present ? name_a : name_b, offset, chunk);
      if (!ok) co_return r;
    }
    offset += chunk;
    advance(chunk);
  }

  if (size_a != size_b) {
    r.out = "Warning: Image size mismatch!\n";
    BlockDevice& over = size_a > size_b ? a : b;
    const std::string& name = size_a > size_b ? name_a : name_b;
    StatusCursor cursor(over);
    while (offset < longest) {
      auto st = co_await cursor.At(offset);
      if (!st.ok()) {
        co_return StatusFailed(r, name);
      }
      uint64_t chunk = std::min(st->length, longest - offset);
      if (st->present && !st->zero) {
        chunk = std::min(chunk, kChunk);
        const bool ok = co_await io.ExpectZeros(over, name, offset, chunk);
        if (!ok) co_return r;
      }
      offset += chunk;
      advance(chunk);
    }
  }
  r.out += "Images are identical.\n";
  co_return r;
}

}  // namespace qcow2kit::tools
