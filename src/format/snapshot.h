// The internal snapshot table and the bitmap directory: variable-length entries padded to 8.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "qcow2kit/status.h"

namespace qcow2kit::format {

inline constexpr uint32_t kSnapshotFixedSize = 40;
inline constexpr uint32_t kMaxSnapshots = 65536;
inline constexpr uint64_t kMaxSnapshotTableBytes = 64ull << 20;
inline constexpr uint32_t kMaxSnapshotExtraData = 1024;

struct Snapshot {
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
  std::string id;
  std::string name;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t vm_state_size = 0;         // 64-bit value from extra data if present
  std::optional<uint64_t> disk_size;  // extra data +8
  std::optional<uint64_t> icount;     // extra data +16; absent or ~0 = off
  std::vector<uint8_t> extra_data;    // verbatim

  friend bool operator==(const Snapshot&, const Snapshot&) = default;
};

// Total size of the entry whose first 40 bytes are `fixed` (padded to 8). Refuses more than
// 1 KiB of extra data, as QEMU does.
Result<uint64_t> SnapshotEntrySize(std::span<const uint8_t> fixed);
// Decodes one entry (`entry` holds exactly SnapshotEntrySize bytes). `index` is for messages.
Result<Snapshot> ParseSnapshotEntry(std::span<const uint8_t> entry, uint32_t index);
// A version 3 entry needs at least 16 bytes of extra data (VM state size and disk size). QEMU
// opens an image with a shorter one (the fields take their version 2 meaning); check reports
// it and a repair rewrites the entry.
bool SnapshotEntryIncomplete(const Snapshot& s, uint32_t version);
// Whether the snapshot's L1 table can be used: cluster aligned, at most 32 MiB, inside the
// largest file offset. Separate from parsing, so that check can report a bad entry.
Status ValidateSnapshotL1(const Snapshot& s, uint32_t index, uint32_t cluster_bits);
// Encodes one entry, padded to 8 bytes.
// Like QEMU, writes at least 24 bytes of extra data: `extra_data` (resized to 24 if shorter)
// with its first 24 bytes replaced by vm_state_size, disk_size (absent: 0, so set it -- QEMU
// uses the current virtual size) and icount (absent: ~0). id and name must fit in 16 bits.
std::vector<uint8_t> EncodeSnapshotEntry(const Snapshot& s);

inline constexpr uint64_t kMaxBitmapDirectoryBytes = 64ull << 20;
inline constexpr uint32_t kMaxBitmaps = 65535;

struct BitmapInfo {
  std::string name;
  uint64_t table_offset = 0;
  uint32_t table_size = 0;  // entries
  uint32_t flags = 0;       // bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible
  uint8_t type = 1;
  uint8_t granularity_bits = 16;

  friend bool operator==(const BitmapInfo&, const BitmapInfo&) = default;
};
// Decodes the bitmap directory (`nb` entries in `dir`).
Result<std::vector<BitmapInfo>> ParseBitmapDirectory(std::span<const uint8_t> dir, uint32_t nb);

}  // namespace qcow2kit::format
