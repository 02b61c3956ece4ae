// Snapshot table entries (reference §1.9) and bitmap directory entries (§1.10).

#include "format/snapshot.h"

#include <algorithm>
#include <cassert>

#include "format/endian.h"
#include "format/hex.h"

namespace qcow2kit::format {
namespace {

// Snapshot entry field offsets.
constexpr size_t kSnL1TableOffset = 0;
constexpr size_t kSnL1Size = 8;
constexpr size_t kSnIdSize = 12;
constexpr size_t kSnNameSize = 14;
constexpr size_t kSnDateSec = 16;
constexpr size_t kSnDateNsec = 20;
constexpr size_t kSnVmClock = 24;
constexpr size_t kSnVmStateSize32 = 32;
constexpr size_t kSnExtraDataSize = 36;
// Offsets inside the extra data.
constexpr size_t kExVmStateSize = 0;
constexpr size_t kExDiskSize = 8;
constexpr size_t kExIcount = 16;
constexpr size_t kQemuExtraDataSize = 24;  // what QEMU writes
constexpr uint32_t kV3MinExtraData = 16;   // vm state size and disk size
constexpr uint64_t kIcountOff = ~0ull;
constexpr uint64_t kMaxL1Entries = (32ull << 20) / 8;

// Bitmap directory entry field offsets.
constexpr size_t kBmTableOffset = 0;
constexpr size_t kBmTableSize = 8;
constexpr size_t kBmFlags = 12;
constexpr size_t kBmType = 16;
constexpr size_t kBmGranularityBits = 17;
constexpr size_t kBmNameSize = 18;
constexpr size_t kBmExtraDataSize = 20;
constexpr size_t kBmFixedSize = 24;
constexpr uint32_t kMaxBitmapNameSize = 1023;
constexpr uint32_t kMinGranularityBits = 9;
constexpr uint32_t kMaxGranularityBits = 31;
constexpr uint32_t kMaxBitmapTableSize = 0x8000000;  // QEMU's BME_MAX_TABLE_SIZE

uint64_t AlignUp8(uint64_t v) {
  return (v + 7) & ~uint64_t{7};
}

std::string StringAt(std::span<const uint8_t> b, size_t offset, size_t size) {
  return std::string(b.begin() + offset, b.begin() + offset + size);
}

void ParseExtraData(std::span<const uint8_t> extra, Snapshot* s) {
  s->extra_data.assign(extra.begin(), extra.end());
  // Fields missing from a short extra data area keep their v2 meaning.
  if (extra.size() >= kExVmStateSize + 8) s->vm_state_size = LoadBE64(&extra[kExVmStateSize]);
  if (extra.size() >= kExDiskSize + 8) s->disk_size = LoadBE64(&extra[kExDiskSize]);
  if (extra.size() >= kExIcount + 8) {
    const uint64_t icount = LoadBE64(&extra[kExIcount]);
    if (icount != kIcountOff) s->icount = icount;
  }
}

Status CheckBitmapEntry(std::span<const uint8_t> e, uint32_t index) {
  const std::string where = "bitmap directory entry " + std::to_string(index) + ": ";
  const uint32_t name_size = LoadBE16(&e[kBmNameSize]);
  if (name_size == 0 || name_size > kMaxBitmapNameSize) {
    return Status::Invalid(where + "name_size " + std::to_string(name_size) + " is not in 1.." +
                           std::to_string(kMaxBitmapNameSize));
  }
  const uint32_t granularity_bits = e[kBmGranularityBits];
  if (granularity_bits < kMinGranularityBits || granularity_bits > kMaxGranularityBits) {
    return Status::Invalid(where + "granularity_bits " + std::to_string(granularity_bits) +
                           " is not in " + std::to_string(kMinGranularityBits) + ".." +
                           std::to_string(kMaxGranularityBits));
  }
  const uint32_t table_size = LoadBE32(&e[kBmTableSize]);
  if (table_size > kMaxBitmapTableSize) {
    return Status::Invalid(where + "bitmap table size " + std::to_string(table_size) + " exceeds " +
                           std::to_string(kMaxBitmapTableSize));
  }
  return Status::Ok();
}

}  // namespace

Result<uint64_t> SnapshotEntrySize(std::span<const uint8_t> fixed) {
  if (fixed.size() < kSnapshotFixedSize) {
    return Status::Invalid("snapshot table entry truncated (" + std::to_string(fixed.size()) +
                           " bytes)");
  }
  const uint32_t extra = LoadBE32(&fixed[kSnExtraDataSize]);
  if (extra > kMaxSnapshotExtraData) {
    return Status::Invalid("Too much extra metadata in snapshot table entry (extra_data_size " +
                           std::to_string(extra) + ", at most " +
                           std::to_string(kMaxSnapshotExtraData) + ")");
  }
  return AlignUp8(uint64_t{kSnapshotFixedSize} + extra + LoadBE16(&fixed[kSnIdSize]) +
                  LoadBE16(&fixed[kSnNameSize]));
}

Result<Snapshot> ParseSnapshotEntry(std::span<const uint8_t> entry, uint32_t index) {
  Result<uint64_t> size = SnapshotEntrySize(entry);
  if (!size.ok()) {
    return Status::Invalid("snapshot " + std::to_string(index) + ": " + size.status().message());
  }
  if (entry.size() != *size) {
    return Status::Invalid("snapshot " + std::to_string(index) + ": entry of " +
                           std::to_string(entry.size()) + " bytes, expected " +
                           std::to_string(*size));
  }
  Snapshot s;
  s.l1_table_offset = LoadBE64(&entry[kSnL1TableOffset]);
  s.l1_size = LoadBE32(&entry[kSnL1Size]);
  s.date_sec = LoadBE32(&entry[kSnDateSec]);
  s.date_nsec = LoadBE32(&entry[kSnDateNsec]);
  s.vm_clock_nsec = LoadBE64(&entry[kSnVmClock]);
  s.vm_state_size = LoadBE32(&entry[kSnVmStateSize32]);
  const size_t extra = LoadBE32(&entry[kSnExtraDataSize]);
  const size_t id_size = LoadBE16(&entry[kSnIdSize]);
  const size_t name_size = LoadBE16(&entry[kSnNameSize]);
  ParseExtraData(entry.subspan(kSnapshotFixedSize, extra), &s);
  s.id = StringAt(entry, kSnapshotFixedSize + extra, id_size);
  s.name = StringAt(entry, kSnapshotFixedSize + extra + id_size, name_size);
  return s;
}

bool SnapshotEntryIncomplete(const Snapshot& s, uint32_t version) {
  return version >= 3 && s.extra_data.size() < kV3MinExtraData;
}

Status ValidateSnapshotL1(const Snapshot& s, uint32_t index, uint32_t cluster_bits) {
  const std::string where = "snapshot " + std::to_string(index) + ": ";
  if (s.l1_table_offset & ((1ull << cluster_bits) - 1)) {
    return Status::Invalid(where + "L1 table offset " + Hex(s.l1_table_offset) +
                           " is not cluster aligned");
  }
  if (s.l1_size > kMaxL1Entries) {
    return Status::Invalid(where + "L1 table too large: l1_size " + std::to_string(s.l1_size) +
                           " exceeds " + std::to_string(kMaxL1Entries));
  }
  if (s.l1_table_offset > uint64_t{INT64_MAX} - uint64_t{s.l1_size} * 8) {
    return Status::Invalid(where + "L1 table offset " + Hex(s.l1_table_offset) +
                           " lies beyond the largest file offset");
  }
  return Status::Ok();
}

std::vector<uint8_t> EncodeSnapshotEntry(const Snapshot& s) {
  assert(s.id.size() <= UINT16_MAX && s.name.size() <= UINT16_MAX);
  // Like QEMU, always write at least the 24 bytes of extra data it knows; unknown extra data
  // after them is kept verbatim.
  std::vector<uint8_t> extra = s.extra_data;
  if (extra.size() < kQemuExtraDataSize) extra.resize(kQemuExtraDataSize);
  StoreBE64(&extra[kExVmStateSize], s.vm_state_size);
  StoreBE64(&extra[kExDiskSize], s.disk_size.value_or(0));
  StoreBE64(&extra[kExIcount], s.icount.value_or(kIcountOff));

  const size_t size = AlignUp8(kSnapshotFixedSize + extra.size() + s.id.size() + s.name.size());
  std::vector<uint8_t> out(size);
  StoreBE64(&out[kSnL1TableOffset], s.l1_table_offset);
  StoreBE32(&out[kSnL1Size], s.l1_size);
  StoreBE16(&out[kSnIdSize], static_cast<uint16_t>(s.id.size()));
  StoreBE16(&out[kSnNameSize], static_cast<uint16_t>(s.name.size()));
  StoreBE32(&out[kSnDateSec], s.date_sec);
  StoreBE32(&out[kSnDateNsec], s.date_nsec);
  StoreBE64(&out[kSnVmClock], s.vm_clock_nsec);
  // The 32-bit field is superseded by the extra data; QEMU stores the truncated value.
  StoreBE32(&out[kSnVmStateSize32], static_cast<uint32_t>(s.vm_state_size));
  StoreBE32(&out[kSnExtraDataSize], static_cast<uint32_t>(extra.size()));
  uint8_t* p = out.data() + kSnapshotFixedSize;
  p = std::copy(extra.begin(), extra.end(), p);
  p = std::copy(s.id.begin(), s.id.end(), p);
  std::copy(s.name.begin(), s.name.end(), p);
  return out;
}

Result<std::vector<BitmapInfo>> ParseBitmapDirectory(std::span<const uint8_t> dir, uint32_t nb) {
  if (nb > kMaxBitmaps) {
    return Status::Invalid("bitmap directory: " + std::to_string(nb) + " bitmaps exceed " +
                           std::to_string(kMaxBitmaps));
  }
  std::vector<BitmapInfo> bitmaps;
  uint64_t pos = 0;
  for (uint32_t i = 0; i < nb; ++i) {
    std::span<const uint8_t> rest = dir.subspan(pos);
    const uint64_t size =
        rest.size() < kBmFixedSize
            ? kBmFixedSize
            : AlignUp8(kBmFixedSize + uint64_t{LoadBE32(&rest[kBmExtraDataSize])} +
                       LoadBE16(&rest[kBmNameSize]));
    if (size > rest.size()) {
      return Status::Invalid("bitmap directory entry " + std::to_string(i) + " at byte " +
                             std::to_string(pos) + " runs past the end of the directory (" +
                             std::to_string(dir.size()) + " bytes)");
    }
    QK_RETURN_IF_ERROR(CheckBitmapEntry(rest, i));
    BitmapInfo b;
    b.table_offset = LoadBE64(&rest[kBmTableOffset]);
    b.table_size = LoadBE32(&rest[kBmTableSize]);
    b.flags = LoadBE32(&rest[kBmFlags]);
    b.type = rest[kBmType];
    b.granularity_bits = rest[kBmGranularityBits];
    b.name = StringAt(rest, kBmFixedSize + LoadBE32(&rest[kBmExtraDataSize]),
                      LoadBE16(&rest[kBmNameSize]));
    bitmaps.push_back(std::move(b));
    pos += size;
  }
  if (pos != dir.size()) {
    return Status::Invalid("bitmap directory has " + std::to_string(dir.size() - pos) +
                           " bytes after its " + std::to_string(nb) + " entries");
  }
  return bitmaps;
}

}  // namespace qcow2kit::format
