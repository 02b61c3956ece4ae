// FormatDriver: one layer of an image chain (a qcow2 image or a raw file), seen through the
// mapping interface (qcow2kit/mapping.h). The block layer (qcow2kit/block.h) turns mappings
// into reads; drivers perform only metadata I/O.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "qcow2kit/file.h"
#include "qcow2kit/mapping.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

class FormatDriver {
 public:
  virtual ~FormatDriver() = default;

  virtual const char* format_name() const = 0;  // "qcow2" or "raw"
  virtual uint64_t size() const = 0;            // virtual size in bytes
  const std::string& filename() const { return file(0)->path(); }

  // Appends to `out` extents covering [offset, offset + length) clipped to size(). The first
  // starts at `offset`, each starts where the previous ends, and the last may run past the
  // requested end (up to what one metadata lookup revealed). Requires offset < size().
  virtual Task<Status> Fetch(uint64_t offset, uint64_t length, std::vector<Extent>* out) = 0;

  // Fills `out` with the guest bytes at `offset` (inside compressed extent `e`).
  virtual Task<Status> ReadCompressed(const Extent& e, uint64_t offset, std::span<std::byte> out);

  // Whether block status looks for holes in the host file under data extents, and what it
  // reports for them, so that maps match qemu-img's: a raw file's holes are zeros without
  // data; a qcow2 image that looks metadata-preallocated (QEMU's heuristic) reports its
  // unwritten data clusters as data that reads as zeros; other qcow2 images are not probed.
  enum class HostHoles { kIgnore, kZero, kZeroData };
  virtual Task<HostHoles> ProbeHostHoles() { co_return HostHoles::kIgnore; }

  // The files extents point into: 0 is the image file, 1 an external data file. nullptr if
  // there is no such file.
  virtual File* file(uint8_t index) const = 0;

  // ---- Write side (only for images opened writable). ----
  //
  // An allocating write: hold the clusters (LockClusters), fetch the current mapping, reserve
  // host clusters (Reserve), write the data with any copy-on-write head and tail, then
  // Commit. In-place writes to writable data extents need none of this.

  // Write granularity: updates cover whole granules (subclusters with extended L2);
  // allocations cover whole clusters.
  virtual uint64_t write_granule() const { return 512; }
  virtual uint64_t cluster_size() const { return write_granule(); }
  // Holds the granules covering [offset, offset + length) against other allocating writers
  // until the returned guard is destroyed. Waits while another holder overlaps.
  class RangeGuard;
  virtual Task<std::unique_ptr<RangeGuard>> LockRange(uint64_t offset, uint64_t length);
  // Contiguous host space for up to `length` bytes (whole clusters) of guest data at
  // `guest_offset` (cluster aligned), covering at least one cluster. Not visible to readers
  // until committed.
  struct Reservation {
    uint64_t host_offset = 0;
    uint64_t length = 0;     // bytes reserved
    uint8_t file_index = 0;  // file(file_index) holds the space
    // The space is known to read as zeros (never written: past the end of the file), so
    // zeros need not be written into it.
    bool reads_zeros = false;
  };
  virtual Task<Result<Reservation>> Reserve(uint64_t guest_offset, uint64_t length);
  // Applies mapping updates (see MappingUpdate). Clusters that lose their last reference are
  // freed once the change is durable and no I/O issued under the old mapping is in flight.
  virtual Task<Status> Commit(std::span<const MappingUpdate> updates);
  // Changes the virtual size. Growing reserves space for the new range per `prealloc` (whose
  // contents the block layer makes read as zeros); shrinking (only with kOff) unmaps everything
  // past the new end and returns the freed space. Mappings change: see the lifetime rule.
  virtual Task<Status> Resize(uint64_t new_size, Preallocation prealloc);
  // Called by the block layer before it writes guest data to host space of file(file_index):
  // refuses (EIO) a write that would land on the image's metadata, which only a damaged
  // mapping can ask for, and marks the image corrupt.
  virtual Task<Status> GuardDataWrite(uint8_t file_index, uint64_t host_offset, uint64_t length);
  // Moves whenever a write GuardDataWrite allowed might be refused now (metadata placed
  // somewhere new, the image found corrupt): for those who keep its answers (SharedDevice).
  virtual uint64_t guard_generation() const { return 0; }
  // Compressed clusters (formats that have them; ENOTSUP otherwise). CompressCluster encodes
  // one whole cluster of guest data (cluster_size() bytes, zero-padded at the end of the
  // image) as this image stores it and returns the stream's length in `out`, or 0 if it does
  // not shrink (store the cluster plain instead). It touches no state: any thread may call it
  // while the image is in use, which is how callers compress on several cores.
  virtual Result<size_t> CompressCluster(std::span<const std::byte> cluster,
                                         std::span<std::byte> out) const;
  // Stores a stream from CompressCluster as the cluster at `guest_offset` (cluster aligned),
  // replacing what was mapped there. The caller holds the cluster (LockRange). Streams are
  // packed into shared host clusters; packed bytes not yet written are written at Flush.
  virtual Task<Status> WriteCompressed(uint64_t guest_offset, std::span<const std::byte> stream);
  // Makes everything committed so far durable: metadata written in dependency order, files
  // synced.
  virtual Task<Status> Flush();
  // Flushes and marks the image clean. Call before destroying a writable image.
  virtual Task<Status> Close() { co_return co_await Flush(); }

  // Data I/O issued from a mapping is bracketed by these, so that freed host clusters are not
  // reused while I/O from an older mapping of them may still be in flight.
  uint64_t BeginIo() {
    if (io_in_epoch_.empty() || io_in_epoch_.back().first != epoch_) {
      io_in_epoch_.emplace_back(epoch_, 0);
    }
    ++io_in_epoch_.back().second;
    return epoch_;
  }
  void EndIo(uint64_t epoch);

  // The backing layer, or nullptr.
  virtual FormatDriver* backing() const { return backing_.get(); }
  void set_backing(std::unique_ptr<FormatDriver> b) { backing_ = std::move(b); }

 protected:
  // A mapping change that frees host space starts a new I/O epoch; it returns the epoch that
  // I/Os under the old mapping belong to.
  uint64_t NextEpoch() { return epoch_++; }
  // Whether any I/O of epoch <= `epoch` may still be in flight.
  bool IoInFlightUpTo(uint64_t epoch) const {
    return !io_in_epoch_.empty() && io_in_epoch_.front().first <= epoch;
  }

  std::unique_ptr<FormatDriver> backing_;

 private:
  uint64_t epoch_ = 0;
  // {epoch, I/Os in flight} for the epochs that have any, oldest first (a short list; a
  // vector keeps its capacity, so the data path does not allocate).
  std::vector<std::pair<uint64_t, uint64_t>> io_in_epoch_;
};

class FormatDriver::RangeGuard {
 public:
  virtual ~RangeGuard() = default;
};

}  // namespace qcow2kit
