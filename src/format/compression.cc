// Compressed clusters (reference §1.6). Decoding: raw DEFLATE via libdeflate and bare zstd
// frames via the zstd streaming API. Encoding: zlib (libdeflate cannot limit its window to
// the 4 KiB QEMU decodes with) and zstd's one-shot API.

#include "format/compression.h"

#include <libdeflate.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include <memory>
#include <string>
#include <vector>

namespace qcow2kit::format {
namespace {

// A 2 MiB cluster never needs a larger window; the limit bounds what a hostile frame header
// can make the decoder allocate (zstd's default allows 128 MiB).
constexpr int kZstdWindowLogMax = 24;

Status CorruptData(const std::string& why) {
  return Status::Corrupt("compressed cluster data is corrupt (" + why + ")");
}

struct DeflateFree {
  void operator()(libdeflate_decompressor* d) const { libdeflate_free_decompressor(d); }
};
struct ZstdFree {
  void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); }
};

// One decoder per thread: allocation is not free, and decoders are not thread safe.
libdeflate_decompressor* DeflateDecoder() {
  thread_local std::unique_ptr<libdeflate_decompressor, DeflateFree> d(
      libdeflate_alloc_decompressor());
  return d.get();
}

ZSTD_DCtx* ZstdDecoder() {
  thread_local std::unique_ptr<ZSTD_DCtx, ZstdFree> d([] {
    ZSTD_DCtx* ctx = ZSTD_createDCtx();
    if (ctx) ZSTD_DCtx_setParameter(ctx, ZSTD_d_windowLogMax, kZstdWindowLogMax);
    return ctx;
  }());
  return d.get();
}

Status InflateRaw(std::span<const uint8_t> in, std::span<uint8_t> out) {
  libdeflate_decompressor* d = DeflateDecoder();
  if (d == nullptr) return Status::Error(ENOMEM, "cannot allocate a deflate decompressor");
  size_t in_used = 0;
  size_t produced = 0;
  // Passing `in_used` lets the stream end before the input does: the read bound of a
  // compressed cluster may include bytes of the next stream.
  const libdeflate_result r = libdeflate_deflate_decompress_ex(d, in.data(), in.size(), out.data(),
                                                               out.size(), &in_used, &produced);
  switch (r) {
    case LIBDEFLATE_SUCCESS:
      if (produced != out.size()) {
        return CorruptData("deflate stream ends after " + std::to_string(produced) + " of " +
                           std::to_string(out.size()) + " bytes");
      }
      return Status::Ok();
    case LIBDEFLATE_INSUFFICIENT_SPACE:
      return CorruptData("deflate stream produces more than " + std::to_string(out.size()) +
                         " bytes");
    default:
      return CorruptData("invalid or truncated deflate stream");
  }
}

// After `out` is full the current frame must end without producing another byte.
Status FinishZstdFrame(ZSTD_DCtx* d, ZSTD_inBuffer* input, size_t out_size) {
  for (;;) {
    uint8_t extra;
    ZSTD_outBuffer probe = {&extra, 1, 0};
    const size_t before = input->pos;
    const size_t r = ZSTD_decompressStream(d, &probe, input);
    if (ZSTD_isError(r)) return CorruptData(std::string("zstd: ") + ZSTD_getErrorName(r));
    if (probe.pos > 0) {
      return CorruptData("zstd stream produces more than " + std::to_string(out_size) + " bytes");
    }
    if (r == 0) return Status::Ok();
    if (input->pos == before) return CorruptData("zstd frame is truncated");
  }
}

// Several frames may follow each other; decode until `out` is exactly full.
Status DecompressZstd(std::span<const uint8_t> in, std::span<uint8_t> out) {
  ZSTD_DCtx* d = ZstdDecoder();
  if (d == nullptr) return Status::Error(ENOMEM, "cannot allocate a zstd decompressor");
  ZSTD_DCtx_reset(d, ZSTD_reset_session_only);
  ZSTD_inBuffer input = {in.data(), in.size(), 0};
  ZSTD_outBuffer output = {out.data(), out.size(), 0};
  size_t r = 0;
  while (output.pos < output.size) {
    const size_t in_before = input.pos;
    const size_t out_before = output.pos;
    r = ZSTD_decompressStream(d, &output, &input);
    if (ZSTD_isError(r)) return CorruptData(std::string("zstd: ") + ZSTD_getErrorName(r));
    // No progress means the input ran out before the cluster was complete.
    if (input.pos == in_before && output.pos == out_before) {
      return CorruptData("zstd stream ends after " + std::to_string(output.pos) + " of " +
                         std::to_string(out.size()) + " bytes");
    }
  }
  if (r != 0) return FinishZstdFrame(d, &input, out.size());
  return Status::Ok();
}

// A deflate stream with QEMU's parameters. deflateReset keeps the allocation between clusters.
class Deflater {
 public:
  Deflater() {
    ok_ = deflateInit2(&z_, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) == Z_OK;
  }
  ~Deflater() {
    if (ok_) deflateEnd(&z_);
  }
  Result<size_t> Compress(std::span<const uint8_t> in, std::span<uint8_t> out) {
    if (!ok_) return Status::Error(ENOMEM, "cannot allocate a deflate compressor");
    deflateReset(&z_);
    z_.next_in = const_cast<uint8_t*>(in.data());
    z_.avail_in = static_cast<uInt>(in.size());
    z_.next_out = out.data();
    z_.avail_out = static_cast<uInt>(out.size());
    const int r = deflate(&z_, Z_FINISH);
    if (r == Z_STREAM_END) return out.size() - z_.avail_out;
    if (r == Z_OK || r == Z_BUF_ERROR) return size_t{0};  // does not fit: store plain
    return Status::Error(EIO, "deflate failed: " + std::to_string(r));
  }

 private:
  z_stream z_{};
  bool ok_ = false;
};

struct ZstdCFree {
  void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};

Result<size_t> CompressZstdLevel(std::span<const uint8_t> in, std::span<uint8_t> out, int level) {
  thread_local std::unique_ptr<ZSTD_CCtx, ZstdCFree> c(ZSTD_createCCtx());
  if (!c) return Status::Error(ENOMEM, "cannot allocate a zstd compressor");
  const size_t r = ZSTD_compressCCtx(c.get(), out.data(), out.size(), in.data(), in.size(), level);
  if (ZSTD_isError(r)) {
    if (ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall) return size_t{0};
    return Status::Error(EIO, std::string("zstd: ") + ZSTD_getErrorName(r));
  }
  return r;
}

}  // namespace

Result<size_t> CompressCluster(CompressionType type, std::span<const uint8_t> in,
                               std::span<uint8_t> out) {
  switch (type) {
    case CompressionType::kZlib: {
      // Deflate at QEMU's level is slow, slowest on data it cannot shrink. zstd's fastest
      // level looks first: what it cannot fit in the room (with a far larger window and the
      // same kind of entropy coding), deflate with a 4 KiB window cannot either, so such a
      // cluster is stored plain at once. At worst a cluster on the edge is stored plain where
      // QEMU would have saved a few bytes.
      thread_local std::vector<uint8_t> probe;
      probe.resize(out.size());
      auto quick = CompressZstdLevel(in, probe, 1);
      if (quick.ok() && *quick == 0) return size_t{0};
      thread_local Deflater d;
      return d.Compress(in, out);
    }
    case CompressionType::kZstd:
      return CompressZstdLevel(in, out, ZSTD_CLEVEL_DEFAULT);
  }
  return Status::Unsupported("Unknown compression type: " +
                             std::to_string(static_cast<unsigned>(type)));
}

Status DecompressCluster(CompressionType type, std::span<const uint8_t> in,
                         std::span<uint8_t> out) {
  switch (type) {
    case CompressionType::kZlib:
      return InflateRaw(in, out);
    case CompressionType::kZstd:
      return DecompressZstd(in, out);
  }
  return Status::Unsupported("Unknown compression type: " +
                             std::to_string(static_cast<unsigned>(type)));
}

}  // namespace qcow2kit::format
