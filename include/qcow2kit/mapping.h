// The mapping interface: the seam between an image format and whoever does the data I/O.
//
// A format driver never reads or writes guest data itself. Fetch() answers where guest bytes
// live as a list of extents; the block layer (or an export) then performs the data I/O against
// the named file at the host offset. Compressed clusters are an extent kind that must be
// decoded through the driver (ReadCompressed), never used as raw bytes.
//
// Mapping lifetime rule: an extent is valid until the next operation that changes mappings
// (write, write-zeroes, discard, resize, snapshot apply). A host cluster freed by discard or
// overwrite is not handed out again while I/O issued from an older mapping of it may still be
// in flight; the write path enforces this by quarantining freed clusters until the requests
// that were in flight when they were freed have completed.
#pragma once

#include <cstdint>
#include <limits>

namespace qcow2kit {

enum class ExtentKind : uint8_t {
  kData,         // bytes at host_offset in the target file
  kZero,         // reads as zeros (zero flag); host space may be reserved (has_host())
  kUnallocated,  // not allocated in this layer: read the backing layer at the same guest
                 // offset (zeros without one); host space may be reserved (extended L2)
  kCompressed,   // a compressed cluster: decode through FormatDriver::ReadCompressed
};

const char* ExtentKindName(ExtentKind k);

struct Extent {
  static constexpr uint64_t kNoHost = std::numeric_limits<uint64_t>::max();

  uint64_t guest_offset = 0;
  uint64_t length = 0;
  ExtentKind kind = ExtentKind::kUnallocated;
  uint8_t file_index = 0;  // FormatDriver::file(i): 0 = image file, 1 = data file
  // The host space (has_host()) belongs to this image alone (refcount 1): kData may be
  // overwritten in place; kZero / kUnallocated space may be filled in place and then committed
  // as kData at the same host offset.
  bool writable = false;
  uint64_t host_offset = kNoHost;  // of guest_offset; for kCompressed the stream start
  uint64_t compressed_length = 0;  // kCompressed: upper bound of the stream's length

  bool has_host() const { return host_offset != kNoHost; }
  uint64_t end() const { return guest_offset + length; }
};

// A change of mapping, applied by FormatDriver::Commit after any data it exposes is written.
// Ranges are aligned to the driver's write granularity (cluster, or subcluster with extended
// L2), except at the end of the image.
struct MappingUpdate {
  enum class Kind : uint8_t {
    kData,        // guest range -> host_offset (a reservation, or the cluster already mapped there)
    kZero,        // reads as zeros from now on
    kUnmap,       // deallocate: reads from the backing layer (or zeros) from now on
    kDiscard,     // QEMU's guest discard: zero on v3 or with a backing file, else deallocate
    kCompressed,  // a whole cluster -> the compressed stream at host_offset (a byte offset)
  };
  uint64_t guest_offset = 0;
  uint64_t length = 0;
  Kind kind = Kind::kData;
  uint64_t host_offset = Extent::kNoHost;  // kData
  bool keep_host = false;          // kZero: keep the host cluster allocated (preallocated zero)
  uint64_t compressed_length = 0;  // kCompressed: bytes of the stream
};

}  // namespace qcow2kit
