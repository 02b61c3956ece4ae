// Qcow2Image: the qcow2 format driver (read side). It validates the image at open, keeps the
// L1 table and the refcount table in memory, caches L2 tables and refcount blocks in slices,
// and answers Fetch() with the extents one L2 slice describes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "format/entries.h"
#include "format/header.h"
#include "format/refcount.h"
#include "format/snapshot.h"
#include "image/metadata_cache.h"
#include "qcow2kit/buffer.h"
#include "qcow2kit/driver.h"
#include "qcow2kit/image.h"

namespace qcow2kit {

class Qcow2Image final : public FormatDriver {
 public:
  // Reads and validates the header, L1 table, refcount table, snapshot table and bitmap
  // directory of `file`. Does not open the data file or the backing file (see OpenImage).
  static Task<Result<std::unique_ptr<Qcow2Image>>> Open(std::unique_ptr<File> file,
                                                        const OpenOptions& options);
  ~Qcow2Image() override;

  const char* format_name() const override { return "qcow2"; }
  uint64_t size() const override { return parsed_.header.size; }
  Task<Status> Fetch(uint64_t offset, uint64_t length, std::vector<Extent>* out) override;
  Task<Status> ReadCompressed(const Extent& e, uint64_t offset,
                              std::span<std::byte> out) override;
  File* file(uint8_t index) const override {
    return index == 0 ? file_.get() : index == 1 ? data_file_.get() : nullptr;
  }
  void set_data_file(std::unique_ptr<File> f) { data_file_ = std::move(f); }
  Task<HostHoles> ProbeHostHoles() override;

  const format::ParsedHeader& parsed() const { return parsed_; }
  const format::Header& header() const { return parsed_.header; }
  const format::Geometry& geometry() const { return geometry_; }
  const format::RefcountGeometry& refcount_geometry() const { return refcount_geometry_; }
  const std::vector<uint64_t>& l1_table() const { return l1_; }
  const std::vector<uint64_t>& refcount_table() const { return reftable_; }
  const std::vector<format::Snapshot>& snapshots() const { return snapshots_; }
  const std::vector<format::BitmapInfo>& bitmaps() const { return bitmaps_; }
  const MetadataCache& l2_cache() const { return *l2_cache_; }

  // One L2 table (all entries; for extended L2, entry/bitmap pairs interleaved), for
  // inspection tools. Goes through the L2 cache.
  Task<Result<std::vector<uint64_t>>> ReadL2Table(uint64_t table_offset);
  // The refcount of the host cluster containing `host_offset` (0 if no refcount block covers
  // it).
  Task<Result<uint64_t>> Refcount(uint64_t host_offset);
  // Index of the last host cluster below `file_length` with a non-zero refcount, or -1.
  Task<Result<int64_t>> LastUsedCluster(uint64_t file_length);

 private:
  Qcow2Image(std::unique_ptr<File> file, format::ParsedHeader parsed);
  Task<Status> LoadTables(const OpenOptions& options);
  Task<Status> LoadSnapshots();
  Task<Status> LoadBitmaps();
  // Appends the extents of guest clusters described by one L2 slice, starting at `offset`,
  // until `end` or the end of the slice.
  Status DecodeSlice(const uint8_t* slice, uint64_t first_entry_guest, uint64_t offset,
                     uint64_t end, std::vector<Extent>* out) const;
  void Append(std::vector<Extent>* out, const Extent& e) const;

  std::unique_ptr<File> file_;
  std::unique_ptr<File> data_file_;
  format::ParsedHeader parsed_;
  format::Geometry geometry_;
  format::RefcountGeometry refcount_geometry_;
  uint64_t file_size_ = 0;
  std::vector<uint64_t> l1_;
  std::vector<uint64_t> reftable_;
  std::vector<format::Snapshot> snapshots_;
  std::vector<format::BitmapInfo> bitmaps_;
  std::unique_ptr<MetadataCache> l2_cache_;
  std::unique_ptr<MetadataCache> refcount_cache_;
  uint32_t slice_bytes_ = 4096;
  // The most recently decompressed cluster: sequential small reads of a compressed cluster
  // decode it once.
  AlignedBuffer decompressed_;
  uint64_t decompressed_host_ = Extent::kNoHost;
  int metadata_preallocated_ = -1;  // unknown until ProbeHostHoles() first runs
};

}  // namespace qcow2kit
