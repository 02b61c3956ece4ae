// Qcow2Image: the qcow2 format driver (read side). It validates the image at open, keeps the
// L1 table and the refcount table in memory, caches L2 tables and refcount blocks in slices,
// and answers Fetch() with the extents one L2 slice describes.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "format/entries.h"
#include "format/header.h"
#include "format/refcount.h"
#include "format/snapshot.h"
#include "image/metadata_cache.h"
#include "image/metadata_map.h"
#include "image/qcow2_check.h"
#include "qcow2kit/async_mutex.h"
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
  Task<Status> ReadCompressed(const Extent& e, uint64_t offset, std::span<std::byte> out) override;
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
  // Refcounts corrected when a dirty image was repaired at open (0 if it was clean).
  uint64_t repaired_refcounts() const { return repaired_refcounts_; }

  // ---- Write side (qcow2_alloc.cc, qcow2_commit.cc, qcow2_flush.cc) ----
  uint64_t write_granule() const override { return geometry_.subcluster_size(); }
  uint64_t cluster_size() const override { return geometry_.cluster_size(); }
  Task<std::unique_ptr<RangeGuard>> LockRange(uint64_t offset, uint64_t length) override;
  Task<Result<Reservation>> Reserve(uint64_t guest_offset, uint64_t length) override;
  Task<Status> Commit(std::span<const MappingUpdate> updates) override;
  Task<Status> Resize(uint64_t new_size, Preallocation prealloc) override;
  Result<size_t> CompressCluster(std::span<const std::byte> cluster,
                                 std::span<std::byte> out) const override;
  Task<Status> WriteCompressed(uint64_t guest_offset, std::span<const std::byte> stream) override;
  Task<Status> Flush() override;
  Task<Status> Close() override;
  Task<Status> GuardDataWrite(uint8_t file_index, uint64_t host_offset, uint64_t length) override;
  uint64_t guard_generation() const override {
    return metadata_map_.generation() * 2 + (corruption_.empty() ? 0 : 1);
  }
  bool has_backing() const { return parsed_.backing_file.has_value(); }

  // Reads the snapshot with this ID and/or name (each given one must match) from now on
  // instead of the active layer, at the image's current size (as QEMU's temporary snapshot
  // load). Only for images opened read-only. ENOENT: "Can't find snapshot".
  Task<Status> LoadSnapshotForReading(const std::optional<std::string>& id,
                                      const std::optional<std::string>& name);

  // ---- Check and repair (qcow2_check.cc) ----
  // One run of qemu-img check's algorithm; with `fix` the image must be writable (opened with
  // OpenOptions::check if it may be corrupt). Diagnostics go to `log`. An error means the
  // check could not complete (qemu-img: "Check failed").
  Task<Result<CheckResult>> Check(unsigned fix, const CheckLog& log);

  // One L2 table (all entries; for extended L2, entry/bitmap pairs interleaved), for
  // inspection tools. Goes through the L2 cache.
  Task<Result<std::vector<uint64_t>>> ReadL2Table(uint64_t table_offset);
  // The refcount of the host cluster containing `host_offset` (0 if no refcount block covers
  // it).
  Task<Result<uint64_t>> Refcount(uint64_t host_offset);
  // Host clusters below `file_length` with a non-zero refcount, counting up to `limit`.
  Task<Result<uint64_t>> CountUsedClusters(uint64_t file_length, uint64_t limit);

 private:
  Qcow2Image(std::unique_ptr<File> file, format::ParsedHeader parsed);
  Task<Status> LoadTables(const OpenOptions& options);
  // -- the snapshot table (qcow2_snapshot_table.cc) --
  Task<Status> LoadSnapshots();  // at open, refusing a damaged table as QEMU does
  struct SnapshotTableRead {
    std::vector<format::Snapshot> snapshots;
    uint64_t bytes = 0;               // of the table as read (the last entry unpadded)
    uint32_t extra_data_dropped = 0;  // entries whose extra data beyond 1 KiB was cut
    uint32_t discarded = 0;           // entries dropped because the table grew past 64 MiB
  };
  // Reads `count` entries at `table_offset`. `for_check`: reads past the end of the file as
  // zeros and leaves snapshot L1 tables unvalidated; `repair`: cuts extra data beyond 1 KiB and
  // drops the entries past 64 MiB (saying so on `log`) instead of failing.
  Task<Result<SnapshotTableRead>> ReadSnapshotTable(uint64_t table_offset, uint32_t count,
                                                    bool for_check, bool repair,
                                                    const CheckLog& log);
  Task<Status> ReadSnapshotBytes(std::span<uint8_t> out, uint64_t offset, bool zero_past_eof);
  // Writes snapshots_ as a new table in fresh clusters, switches the header to it (the order
  // keeps a crash safe) and frees the old one. meta_lock_ held.
  Task<Status> WriteSnapshotTable();
  Task<Status> LoadBitmaps();
  // Read-write open: repairs dirty images, clears autoclear bits we do not maintain (unless
  // opened `for_check`).
  Task<Status> PrepareForWriting(bool for_check);
  // Appends the extents of guest clusters described by one L2 slice, starting at `offset`,
  // until `end` or the end of the slice.
  Status DecodeSlice(const uint8_t* slice, uint64_t first_entry_guest, uint64_t offset,
                     uint64_t end, std::vector<Extent>* out) const;
  void Append(std::vector<Extent>* out, const Extent& e) const;

  // -- allocation and refcounts (qcow2_alloc.cc); callers hold meta_lock_ --
  // Up to `count` contiguous free host clusters (first fit), their refcounts set to 1.
  // Returns the offset; `*got` is how many. Without `got`, exactly `count` or an error.
  Task<Result<uint64_t>> AllocateClusters(uint64_t count, uint64_t* got = nullptr);
  // Adds `delta` to the refcount of each host cluster in [offset, offset + length).
  Task<Status> UpdateRefcounts(uint64_t offset, uint64_t length, int64_t delta);
  // Makes sure refcount block `table_index` exists (growing the refcount table if needed).
  Task<Status> EnsureRefblock(uint64_t table_index);
  Task<Status> GrowRefcountTable(uint64_t min_entries);
  // Queues the release of host clusters whose last reference a commit removed.
  // `metadata`: a table, never mapped for data I/O, so the I/O epochs do not apply.
  void ReleaseLater(uint64_t offset, uint64_t length, bool metadata);
  // Drops the refcounts queued by ReleaseLater once the removal is durable and no I/O from
  // the old mappings is in flight.
  Task<Status> ApplyReleases();

  // -- mapping updates (qcow2_commit.cc) --
  // The L2 slice for guest `offset`, writable: allocates the L2 table, or copies it if it is
  // shared with a snapshot.
  Task<Result<uint8_t*>> L2SliceForUpdate(uint64_t offset);
  Task<Status> CommitCluster(const MappingUpdate& u, uint64_t cluster_guest);
  // Writes dirty metadata back (in order) once it fills half a cache. meta_lock_ held.
  Task<Status> WriteBackIfCachesFull();

  // -- compressed writes (qcow2_compressed_write.cc); meta_lock_ held --
  // Writes the packed bytes of pack_ not yet on disk (at flush, and when the cluster is full).
  Task<Status> WritePack();
  // The packed bytes inside [host, host + length) (they may not be on disk yet), and where
  // they start relative to `host`.
  std::pair<uint64_t, std::vector<std::byte>> PackedBytes(uint64_t host, uint64_t length) const;

  friend class Qcow2Checker;

  // -- overlap protection (qcow2_overlap.cc) --
  void RebuildMetadataMap();  // after tables moved or were freed
  // OK, or EIO if [offset, offset + length) touches metadata not in `ignore` (MetadataMap
  // bits), which records the corruption; also EIO once the image was found corrupt.
  Status CheckOverlap(uint64_t offset, uint64_t length, unsigned ignore);
  Status RefuseIfCorrupt() const;  // EIO once the overlap check found damage
  // Returns `s`, first writing the corrupt bit if CheckOverlap found damage.
  Task<Status> MarkCorruptIfNeeded(Status s);

  // -- resize (qcow2_resize.cc) --
  Task<Status> WriteSize(uint64_t new_size);  // header size field, synced
  Task<Status> GrowL1(uint64_t entries);      // a bigger L1 table; meta_lock_ held
  Task<Status> Preallocate(uint64_t from, uint64_t to, Preallocation mode);
  Task<Status> Shrink(uint64_t new_size);

  // -- writeback (qcow2_flush.cc) --
  Task<Status> FlushLocked(bool write_refcounts);
  Task<Status> WriteTables(bool write_refcounts);  // FlushLocked without the corrupt marking
  Task<Status> WriteHeaderBytes(uint64_t offset, std::span<const uint8_t> bytes);
  Task<Status> SetIncompatibleBit(uint64_t bit, bool on);
  Task<Status> SyncFiles();

  std::unique_ptr<File> file_;
  std::unique_ptr<File> data_file_;
  format::ParsedHeader parsed_;
  format::Geometry geometry_;
  format::RefcountGeometry refcount_geometry_;
  uint64_t file_size_ = 0;
  std::vector<uint64_t> l1_;
  std::vector<uint64_t> reftable_;
  std::vector<format::Snapshot> snapshots_;
  uint64_t snapshot_table_bytes_ = 0;
  std::vector<format::BitmapInfo> bitmaps_;
  std::unique_ptr<MetadataCache> l2_cache_;
  std::unique_ptr<MetadataCache> refcount_cache_;
  uint32_t slice_bytes_ = 4096;
  // The most recently decompressed cluster: sequential small reads of a compressed cluster
  // decode it once.
  AlignedBuffer decompressed_;
  uint64_t decompressed_host_ = Extent::kNoHost;
  int metadata_preallocated_ = -1;  // unknown until ProbeHostHoles() first runs

  // The host cluster compressed streams are being packed into (QEMU's free_byte_offset): its
  // first pack_used_ bytes, of which pack_written_ are on disk.
  AlignedBuffer pack_;
  uint64_t pack_host_ = Extent::kNoHost;
  uint64_t pack_used_ = 0;
  uint64_t pack_written_ = 0;

  MetadataMap metadata_map_{16};
  std::string corruption_;  // what the overlap check prevented; empty while all is well

  // Write state. Metadata changes (allocation, commit, flush) happen under meta_lock_.
  AsyncMutex meta_lock_;
  std::set<uint64_t> dirty_l1_;        // L1 indices changed since the last flush
  std::set<uint64_t> dirty_reftable_;  // refcount table indices changed since the last flush
  uint64_t free_hint_ = 0;             // no free cluster below this index
  // Host clusters from here on have never been written since open (they lay past the end of
  // the file and nothing was allocated there), so they read as zeros.
  uint64_t unwritten_from_ = 0;
  uint64_t repaired_refcounts_ = 0;
  struct Release {
    uint64_t offset;
    uint64_t length;
    uint64_t epoch;        // I/O epoch of the mappings that still pointed there
    bool durable = false;  // the removal of the reference is on disk
    bool metadata = false;
  };
  std::vector<Release> releases_;
  struct HeldRange;  // a LockRange() holder
  std::vector<HeldRange*> held_ranges_;
};

}  // namespace qcow2kit
