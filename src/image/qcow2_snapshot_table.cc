// The internal snapshot table: reading it at open and in a check (QEMU's
// qcow2_do_read_snapshots, with its limits and its repairs), and writing it anew.

#include <algorithm>
#include <climits>
#include <cstring>

#include "fmt/format.h"
#include "format/endian.h"
#include "image/qcow2_image.h"

namespace qcow2kit {
namespace {

uint64_t AlignUp8(uint64_t v) {
  return (v + 7) & ~uint64_t{7};
}

}  // namespace

Task<Status> Qcow2Image::ReadSnapshotBytes(std::span<uint8_t> out, uint64_t offset,
                                           bool zero_past_eof) {
  auto got = co_await file_->ReadAt(std::as_writable_bytes(out), offset);
  if (!got.ok()) co_return got.status();
  if (*got < out.size()) {
    // A check reads what lies past the end of the file as zeros, as QEMU does.
    if (!zero_past_eof) {
      co_return Status::Corrupt(fmt::format(
          "snapshot table entry at offset {:#x} runs past the end of the file", offset));
    }
    std::memset(out.data() + *got, 0, out.size() - *got);
  }
  co_return Status::Ok();
}

Task<Result<Qcow2Image::SnapshotTableRead>> Qcow2Image::ReadSnapshotTable(
    uint64_t table_offset, uint32_t count, bool for_check, bool repair, const CheckLog& log) {
  auto say = [&](const std::string& line) {
    if (log) log(line);
  };
  const std::string hint_prefix = "You can force-remove ";
  SnapshotTableRead t;
  uint64_t pos = table_offset;  // where the next entry starts (before padding)
  uint64_t table_length = 0;    // the table as it will be kept (extra data maybe cut)
  for (uint32_t i = 0; i < count; ++i) {
    const uint64_t entry_start = pos;
    pos = AlignUp8(pos);
    table_length = AlignUp8(table_length);
    uint8_t fixed[format::kSnapshotFixedSize];
    Status s = co_await ReadSnapshotBytes(fixed, pos, for_check);
    if (!s.ok()) co_return s.WithContext("Failed to read snapshot table");
    const uint32_t extra = format::LoadBE32(fixed + 36);
    const uint32_t id_size = format::LoadBE16(fixed + 12);
    const uint32_t name_size = format::LoadBE16(fixed + 14);
    uint32_t kept_extra = extra;
    if (extra > format::kMaxSnapshotExtraData) {
      if (!repair) {
        co_return Status::Error(
            EFBIG, fmt::format("Too much extra metadata in snapshot table entry {}\n{}this extra "
                               "metadata with qcow2kit check -r all",
                               i, hint_prefix));
      }
      say(fmt::format("Discarding too much extra metadata in snapshot table entry {} ({} > {})", i,
                      extra, format::kMaxSnapshotExtraData));
      ++t.extra_data_dropped;
      kept_extra = format::kMaxSnapshotExtraData;
    }
    // The entry as it is kept: the fixed part (with the kept extra size), the first
    // `kept_extra` bytes of extra data, the ID and the name, padded to 8.
    const uint64_t kept = format::kSnapshotFixedSize + uint64_t{kept_extra} + id_size + name_size;
    std::vector<uint8_t> entry(AlignUp8(kept));
    std::memcpy(entry.data(), fixed, sizeof(fixed));
    format::StoreBE32(entry.data() + 36, kept_extra);
    uint8_t* p = entry.data() + format::kSnapshotFixedSize;
    s = co_await ReadSnapshotBytes(std::span(p, kept_extra), pos + sizeof(fixed), for_check);
    if (s.ok()) {
      s = co_await ReadSnapshotBytes(std::span(p + kept_extra, id_size + name_size),
                                     pos + sizeof(fixed) + extra, for_check);
    }
    if (!s.ok()) co_return s.WithContext("Failed to read snapshot table");
    pos += sizeof(fixed) + uint64_t{extra} + id_size + name_size;
    table_length += kept;
    if (table_length > format::kMaxSnapshotTableBytes || pos - table_offset > INT_MAX) {
      if (!repair) {
        co_return Status::Error(EFBIG,
                                fmt::format("Snapshot table is too big\n{}all {} overhanging "
                                            "snapshots with qcow2kit check -r all",
                                            hint_prefix, count - i));
      }
      say(fmt::format("Discarding {} overhanging snapshots (snapshot table is too big)",
                      count - i));
      t.discarded += count - i;
      pos = entry_start;
      break;
    }
    QK_CO_ASSIGN_OR_RETURN(format::Snapshot snap, format::ParseSnapshotEntry(entry, i));
    // A check reports a bad L1 table of a snapshot instead of refusing the image.
    if (!for_check) {
      QK_CO_RETURN_IF_ERROR(format::ValidateSnapshotL1(snap, i, parsed_.header.cluster_bits));
    }
    t.snapshots.push_back(std::move(snap));
  }
  t.bytes = pos - table_offset;
  co_return t;
}

Task<Status> Qcow2Image::LoadSnapshots() {
  const format::Header& h = parsed_.header;
  QK_CO_ASSIGN_OR_RETURN(SnapshotTableRead t,
                         co_await ReadSnapshotTable(h.snapshots_offset, h.nb_snapshots,
                                                    /*for_check=*/false, /*repair=*/false, {}));
  snapshots_ = std::move(t.snapshots);
  snapshot_table_bytes_ = t.bytes;
  co_return Status::Ok();
}

Task<Status> Qcow2Image::WriteSnapshotTable() {
  const uint64_t cs = geometry_.cluster_size();
  std::vector<uint8_t> table;
  for (const format::Snapshot& sn : snapshots_) {
    format::Snapshot complete = sn;
    // An entry without a disk size gets the current one, as QEMU writes it.
    if (!complete.disk_size) complete.disk_size = size();
    std::vector<uint8_t> e = format::EncodeSnapshotEntry(complete);
    table.insert(table.end(), e.begin(), e.end());
  }
  uint64_t new_offset = 0;
  if (!table.empty()) {
    const uint64_t clusters = (table.size() + cs - 1) / cs;
    QK_CO_ASSIGN_OR_RETURN(new_offset, co_await AllocateClusters(clusters));
    AlignedBuffer buf(clusters * cs);
    std::memcpy(buf.data(), table.data(), table.size());
    QK_CO_RETURN_IF_ERROR(CheckOverlap(new_offset, buf.size(), 0));
    QK_CO_RETURN_IF_ERROR(co_await file_->WriteAt(buf.span(), new_offset));
  }
  // The new table and its refcounts are durable before the header points at it: a crash
  // leaves the old table in effect, or the new one.
  QK_CO_RETURN_IF_ERROR(co_await WriteTables(/*write_refcounts=*/true));
  QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
  uint8_t pointer[12];
  format::StoreBE32(pointer, static_cast<uint32_t>(snapshots_.size()));
  format::StoreBE64(pointer + 4, new_offset);
  QK_CO_RETURN_IF_ERROR(co_await WriteHeaderBytes(60, pointer));
  QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
  const uint64_t old_offset = parsed_.header.snapshots_offset;
  const uint64_t old_bytes = snapshot_table_bytes_;
  parsed_.header.nb_snapshots = static_cast<uint32_t>(snapshots_.size());
  parsed_.header.snapshots_offset = new_offset;
  snapshot_table_bytes_ = table.size();
  RebuildMetadataMap();
  if (old_bytes > 0) {
    // The old table is unused now. Its refcounts may be wrong in a damaged image; failing to
    // drop them only leaks its clusters (as in QEMU), which the next check repairs.
    Status freed = co_await UpdateRefcounts(old_offset, old_bytes, -1);
    if (freed.ok()) freed = co_await WriteTables(/*write_refcounts=*/true);
    (void)freed;
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::LoadSnapshotForReading(const std::optional<std::string>& id,
                                                const std::optional<std::string>& name) {
  if (file_->writable()) co_return Status::Invalid("a snapshot can only be read, not written");
  if (!id && !name) co_return Status::Invalid("no snapshot ID or name given");
  const format::Snapshot* found = nullptr;
  for (const auto& sn : snapshots_) {
    if ((!id || sn.id == *id) && (!name || sn.name == *name)) {
      found = &sn;
      break;
    }
  }
  if (!found) co_return Status::Error(ENOENT, "Can't find snapshot");
  const uint64_t cs = geometry_.cluster_size();
  if (found->l1_table_offset % cs != 0 || found->l1_size > (32u << 20) / 8 ||
      found->l1_table_offset + uint64_t{found->l1_size} * 8 > file_size_) {
    co_return Status::Corrupt("Snapshot L1 table is invalid");
  }
  std::vector<uint64_t> l1(found->l1_size);
  QK_CO_RETURN_IF_ERROR(
      co_await file_->ReadExact(std::as_writable_bytes(std::span(l1)), found->l1_table_offset));
  for (auto& e : l1) e = format::LoadBE64(&e);
  l1_ = std::move(l1);
  co_return Status::Ok();
}

}  // namespace qcow2kit
