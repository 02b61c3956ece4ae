// FormatDriver: one layer of an image chain (a qcow2 image or a raw file), seen through the
// mapping interface (qcow2kit/mapping.h). The block layer (qcow2kit/block.h) turns mappings
// into reads; drivers perform only metadata I/O.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
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
  virtual Task<Status> ReadCompressed(const Extent& e, uint64_t offset,
                                      std::span<std::byte> out);

  // Whether block status looks for holes in the host file under data extents, and what it
  // reports for them, so that maps match qemu-img's: a raw file's holes are zeros without
  // data; a qcow2 image that looks metadata-preallocated (QEMU's heuristic) reports its
  // unwritten data clusters as data that reads as zeros; other qcow2 images are not probed.
  enum class HostHoles { kIgnore, kZero, kZeroData };
  virtual Task<HostHoles> ProbeHostHoles() { co_return HostHoles::kIgnore; }

  // The files extents point into: 0 is the image file, 1 an external data file. nullptr if
  // there is no such file.
  virtual File* file(uint8_t index) const = 0;

  // The backing layer, or nullptr.
  virtual FormatDriver* backing() const { return backing_.get(); }
  void set_backing(std::unique_ptr<FormatDriver> b) { backing_ = std::move(b); }

 protected:
  std::unique_ptr<FormatDriver> backing_;
};

}  // namespace qcow2kit
