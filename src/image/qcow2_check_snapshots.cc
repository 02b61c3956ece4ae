// The snapshot table in a check: QEMU's qcow2_check_read_snapshot_table and
// qcow2_check_fix_snapshot_table, with their diagnostics.

#include <climits>

#include "fmt/format.h"
#include "format/endian.h"
#include "image/qcow2_check.h"
#include "image/qcow2_check_walk.h"
#include "image/qcow2_image.h"

namespace qcow2kit {

using check_detail::ErrnoText;

Task<Status> Qcow2Checker::ReadSnapshotTable(CheckResult& res) {
  img_.snapshots_.clear();
  img_.snapshot_table_bytes_ = 0;
  // The header as it is on disk now (an earlier run of this check may have changed it).
  uint8_t pointer[12];
  Status s = co_await img_.file_->ReadExact(std::as_writable_bytes(std::span(pointer)), 60);
  if (!s.ok()) {
    ++res.check_errors;
    Log("ERROR failed to read the snapshot table pointer from the image header: " +
        ErrnoText(s));
    co_return Status::Error(s.code(), "");
  }
  uint32_t count = format::LoadBE32(pointer);
  const uint64_t offset = format::LoadBE64(pointer + 4);
  const bool repair = fix_ & kFixErrors;
  uint32_t reduced = 0;  // entries dropped from the table
  if (count > format::kMaxSnapshots && repair) {
    Log(fmt::format("Discarding {} overhanging snapshots", count - format::kMaxSnapshots));
    reduced += count - format::kMaxSnapshots;
    count = format::kMaxSnapshots;
  }
  // qcow2_validate_table: the count, the offset's alignment and range, not the file size.
  std::string invalid;
  int code = 0;
  const uint64_t bytes = uint64_t{count} * format::kSnapshotFixedSize;
  if (count > format::kMaxSnapshots) {
    invalid = "snapshot table too large";
    code = EFBIG;
  } else if (uint64_t{INT64_MAX} - bytes < offset ||
             offset % img_.geometry_.cluster_size() != 0) {
    invalid = "snapshot table offset invalid";
    code = EINVAL;
  }
  if (!invalid.empty()) {
    ++res.check_errors;
    std::string report = "ERROR " + invalid;
    if (count > format::kMaxSnapshots) {
      report += fmt::format(
          "\nYou can force-remove all {} overhanging snapshots with qcow2kit check -r all",
          count - format::kMaxSnapshots);
    }
    co_return Status::Error(code, report);
  }
  auto table = co_await img_.ReadSnapshotTable(offset, count, /*for_check=*/true, repair, log_);
  if (!table.ok()) {
    ++res.check_errors;
    co_return Status::Error(table.status().code(),
                            "ERROR failed to read the snapshot table: " + table.status().message());
  }
  img_.snapshots_ = std::move(table->snapshots);
  img_.snapshot_table_bytes_ = table->bytes;
  img_.parsed_.header.snapshots_offset = offset;
  img_.parsed_.header.nb_snapshots = static_cast<uint32_t>(img_.snapshots_.size());
  reduced += table->discarded;
  res.corruptions += reduced + table->extra_data_dropped;
  if (reduced) {
    // The header's count now, so that the refcount check and the table agree; the dropped
    // entries' clusters leak, which the refcount repair frees.
    uint8_t nb[4];
    format::StoreBE32(nb, img_.parsed_.header.nb_snapshots);
    s = co_await img_.WriteHeaderBytes(60, nb);
    if (s.ok()) s = co_await img_.SyncFiles();
    if (!s.ok()) {
      ++res.check_errors;
      Log("ERROR failed to update the snapshot count in the image header: " + ErrnoText(s));
      co_return Status::Error(s.code(), "");
    }
    res.corruptions_fixed += reduced;
    res.corruptions -= reduced;
  }
  for (size_t i = 0; i < img_.snapshots_.size(); ++i) {
    if (format::SnapshotEntryIncomplete(img_.snapshots_[i], img_.parsed_.header.version)) {
      ++res.corruptions;
      Log(fmt::format("{} snapshot table entry {} is incomplete", repair ? "Repairing" : "ERROR",
                      i));
    }
  }
  // The overlap checks of a repair know the snapshot tables now (a read-only check writes
  // nothing and needs no map: for many L2 tables it is most of the check's memory).
  if (img_.file_->writable()) img_.RebuildMetadataMap();
  co_return Status::Ok();
}

Task<Status> Qcow2Checker::FixSnapshotTable(CheckResult& res) {
  if (res.corruptions == 0 || !(fix_ & kFixErrors)) co_return Status::Ok();
  Status s = co_await img_.WriteSnapshotTable();
  if (!s.ok()) {
    ++res.check_errors;
    Log("ERROR failed to update snapshot table: " + ErrnoText(s));
    co_return Status::Error(s.code(), "");
  }
  res.corruptions_fixed += res.corruptions;
  res.corruptions = 0;
  co_return Status::Ok();
}

}  // namespace qcow2kit
