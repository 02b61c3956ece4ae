// BlockDevice: the generic block layer over a chain of FormatDrivers. It turns mappings into
// data I/O: reads (contiguous host runs merged into single I/Os, zeros filled in memory,
// backing layers consulted for unallocated ranges, compressed clusters decoded) and block
// status (allocation depth, zero / data, as qemu-img map reports it).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "qcow2kit/driver.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

// One run of `qemu-img map --output=json`.
struct BlockStatusExtent {
  uint64_t start = 0;
  uint64_t length = 0;
  uint32_t depth = 0;  // chain level that answered (0 = top)
  bool present = false;
  bool zero = false;
  bool data = false;
  bool compressed = false;
  uint64_t offset = Extent::kNoHost;  // host offset, when there is one to report
  const File* file = nullptr;         // the file `offset` refers to
};

// Guest ranges {offset, length} that read as zeros, in ascending order.
using ZeroRuns = std::vector<std::pair<uint64_t, uint64_t>>;

class BlockDevice {
 public:
  explicit BlockDevice(std::unique_ptr<FormatDriver> top);
  ~BlockDevice();

  uint64_t size() const { return top_->size(); }
  FormatDriver& top() const { return *top_; }

  // Reads buf.size() bytes at `offset`; the range must lie inside the image.
  Task<Status> Read(uint64_t offset, std::span<std::byte> buf);
  // Like Read, but ranges known to read as zeros without any I/O (zero clusters, unallocated
  // ranges with no backing data) are appended to `zeros` and left unfilled in `buf`. For
  // exports that send holes instead of zero bytes. `zeros` is not cleared first.
  Task<Status> ReadSparse(uint64_t offset, std::span<std::byte> buf, ZeroRuns* zeros);

  // Writes buf.size() bytes at `offset` (inside the image). Clusters owned only by this
  // image are written in place; others are allocated with copy-on-write of what the write
  // does not cover. With `fua` the write is durable when this returns.
  Task<Status> Write(uint64_t offset, std::span<const std::byte> buf, bool fua = false);
  // Compressed writes (qcow2 without a data file; ENOTSUP otherwise). `buf` covers whole
  // clusters from `offset` (cluster aligned; the last may end at the end of the image). Each
  // cluster is compressed and packed with others, or written plain if it does not shrink.
  Task<Status> WriteCompressed(uint64_t offset, std::span<const std::byte> buf);
  // One cluster (or the image's short last one) that top().CompressCluster already
  // compressed, possibly on another thread: `stream`, or empty to store `cluster` plain.
  Task<Status> WriteCompressedCluster(uint64_t offset, std::span<const std::byte> cluster,
                                      std::span<const std::byte> stream);
  // Makes [offset, offset + length) read as zeros. With `may_unmap`, whole clusters may be
  // deallocated (zero flag without a host cluster) instead of keeping their space. With
  // `no_fallback`, fails with ENOTSUP, changing nothing, if that would mean writing zero
  // bytes (partial clusters, formats without a zero flag) instead of recording zeros.
  Task<Status> WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap, bool fua = false,
                           bool no_fallback = false);
  // Discards whole clusters in the range (partial ones are left alone), as QEMU does: v3
  // images (and any image with a backing file) read zeros afterwards, v2 images without a
  // backing file read zeros too (the cluster is deallocated).
  Task<Status> Discard(uint64_t offset, uint64_t length);
  // Changes the virtual size. A grown range reads as zeros (never as stale data or backing
  // data), with space reserved per `prealloc`. Shrinking drops the data past the new end: ask
  // the user first, as qemu-img resize --shrink does.
  Task<Status> Resize(uint64_t new_size, Preallocation prealloc = Preallocation::kOff);
  // Everything written before is durable when this returns (metadata in dependency order,
  // then the files synced).
  Task<Status> Flush();
  // Flushes and marks the image clean (lazy refcounts). Required before destruction of a
  // writable device for a clean shutdown; a device dropped without it is like a crash.
  Task<Status> Close();

  // Appends block status runs for [offset, offset + length) (clipped to size()), adjacent runs
  // with equal attributes merged. With `probe_host_holes`, data ranges that are holes in the
  // host file report zero (as QEMU does).
  Task<Status> BlockStatus(uint64_t offset, uint64_t length, std::vector<BlockStatusExtent>* out,
                           bool probe_host_holes = true);

 private:
  std::unique_ptr<FormatDriver> top_;
};

}  // namespace qcow2kit
