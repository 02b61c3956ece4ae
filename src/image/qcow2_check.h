// Consistency check and repair of a qcow2 image: qemu-img check's algorithm (QEMU's
// qcow2_check_refcounts and friends), with its diagnostics, counts and repairs, so that our
// `check` and theirs agree line for line.
//
// References are counted for every host cluster from every structure that uses one (header,
// active and snapshot L1/L2 tables, snapshot table, refcount table and blocks, bitmap
// directory, tables and data) into a RefcountArray, then compared with the refcounts on disk.
// Repair lowers (leaks) or raises (corruptions) refcounts in place, fixes COPIED flags, zeroes
// unaligned preallocated entries, and rebuilds the refcount structures when they cannot be
// fixed in place: new blocks and table are written past everything in use, synced, and only
// then does the header switch to them, so a crash leaves either the old or the new
// structures in effect (the old ones are leaked space afterwards, and repaired away).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "image/refcount_array.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

class Qcow2Image;

// What a check may repair (qemu-img check -r leaks | all).
enum CheckFix : unsigned {
  kFixNothing = 0,
  kFixLeaks = 1,
  kFixErrors = 2,
  kFixAll = kFixLeaks | kFixErrors,
};

// QEMU's BdrvCheckResult.
struct CheckResult {
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t check_errors = 0;  // the check itself could not read or write something
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  uint64_t image_end_offset = 0;  // end of the last cluster in use (or referenced)
  // Fragmentation information of the active tables.
  uint64_t total_clusters = 0;  // guest clusters of the virtual size
  uint64_t allocated_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
};

// Receives each diagnostic line (no trailing newline), as qemu-img prints them on stderr.
using CheckLog = std::function<void(const std::string&)>;

// The refcount walk and repair behind Qcow2Image::Check; one object per check run (a friend
// of Qcow2Image), split over qcow2_check.cc (counting, the run), qcow2_check_compare.cc
// (comparing, COPIED) and qcow2_rebuild.cc (new refcount structures).
class Qcow2Checker {
 public:
  Qcow2Checker(Qcow2Image& img, unsigned fix, const CheckLog& log);
  // The snapshot table's own damage (qcow2_check_snapshots.cc), before and after the
  // refcount check: too many entries, a table past 64 MiB, extra data past 1 KiB, incomplete
  // version 3 entries. A failure's message is what qemu-img reports as an error.
  Task<Status> ReadSnapshotTable(CheckResult& res);
  Task<Status> FixSnapshotTable(CheckResult& res);  // rewrites the table if it was damaged
  Task<Status> CheckRefcounts(CheckResult& res);

 private:
  Task<Status> CalculateRefcounts(CheckResult& res, unsigned fix, bool* rebuild);
  Task<Status> CheckL1(CheckResult& res, uint64_t l1_offset, uint64_t l1_size, bool active,
                       unsigned fix);
  Task<Status> CheckL2(CheckResult& res, uint64_t l2_offset, uint8_t* table, bool active,
                       unsigned fix);
  Task<Status> FixEntryByZero(uint64_t l2_offset, uint8_t* table, uint64_t index);
  Task<Status> CountBitmaps(CheckResult& res);
  Task<Status> CheckRefblocks(CheckResult& res, unsigned fix, bool* rebuild);
  Task<Status> CompareRefcounts(CheckResult& res, unsigned fix, bool* rebuild, uint64_t* highest);
  Task<Status> CheckCopied(CheckResult& res, unsigned fix);
  Task<Status> RebuildRefcounts(CheckResult& res);  // qcow2_rebuild.cc
  // Counts a reference to each cluster of [offset, offset + length). An error only when the
  // array would grow beyond what this check may allocate.
  Status Inc(CheckResult& res, uint64_t offset, uint64_t length);
  void Log(const std::string& line) const {
    if (log_) log_(line);
  }

  Qcow2Image& img_;
  unsigned fix_;
  CheckLog log_;
  RefcountArray refs_;  // references counted from the metadata
  // The refcounts on disk as the last comparison left them, where they differ from refs_:
  // whole refcount blocks (their bytes), by table index. Nothing for a consistent image.
  std::unordered_map<uint64_t, std::vector<uint8_t>> differing_blocks_;
  std::vector<bool> unreadable_blocks_;  // refcount blocks that could not be read
  bool refs_match_disk_ = true;          // false: ask the image for refcounts instead
  // The refcount on disk of the cluster at `host_offset` (for the COPIED audit); an error if
  // its block could not be read.
  Task<Result<uint64_t>> DiskRefcount(uint64_t host_offset);
  uint64_t file_length_ = 0;  // of the image file, as the counting started
};

}  // namespace qcow2kit
