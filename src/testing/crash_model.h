// The guest-side model of the crash tests (src/block/crash_test.cc): the operations a
// workload runs, the bytes each gives the guest, and which of them an image left by a power
// failure or an I/O error must hold.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace qcow2kit::testing {

uint64_t Mix(uint64_t x);  // splitmix64
inline uint64_t AlignUp(uint64_t v, uint64_t a) {
  return (v + a - 1) / a * a;
}
inline uint64_t AlignDown(uint64_t v, uint64_t a) {
  return v / a * a;
}

// One call on the block device, as generated; the fields after `index` are filled in when it
// runs.
struct GuestOp {
  enum class Kind : uint8_t { kWrite, kZeroes, kDiscard, kFlush, kClose, kGrow };
  Kind kind = Kind::kFlush;
  uint64_t offset = 0;
  uint64_t length = 0;  // kGrow: the new size
  bool may_unmap = false;
  bool fua = false;  // kWrite, kZeroes: durable when the call returns
  // kWrite of whole clusters, stored compressed (tag has kCompressibleTag: data that shrinks)
  bool compressed = false;
  uint64_t tag = 0;  // seeds the bytes of a write
  size_t index = 0;  // position in the workload: operations on one byte run in this order
  // Discard: what the discarded whole clusters read afterwards (zeros, or the old data if
  // the discard was ignored), at effect_offset.
  uint64_t effect_offset = 0;
  std::vector<uint8_t> effect;
  // Recorder events completed when the call was issued and when it returned, and the test's
  // sequence numbers of those two moments (one counter over every issue and return).
  size_t start_event = 0;
  size_t end_event = 0;
  uint64_t issue_seq = 0;
  uint64_t done_seq = 0;

  bool changes_data() const {
    return kind == Kind::kWrite || kind == Kind::kZeroes || kind == Kind::kDiscard ||
           kind == Kind::kGrow;
  }
  bool is_flush() const { return kind == Kind::kFlush || kind == Kind::kClose; }
};

const char* KindName(GuestOp::Kind k);
std::string Describe(const GuestOp& op);

// Whether the guest ranges of `a` and `b` intersect (flushes, closes and grows touch none).
bool Overlap(const GuestOp& a, const GuestOp& b);

// A tag with this bit makes data that compresses (each word repeated over 512 bytes).
inline constexpr uint64_t kCompressibleTag = 1ull << 63;
// The bytes a write with `tag` puts at guest [pos, pos + len).
void FillPattern(uint64_t tag, uint64_t pos, uint64_t len, uint8_t* out);
// Applies `op` (a discard: its recorded effect) to a guest image.
void ApplyOp(const GuestOp& op, std::vector<uint8_t>* model);

// A deterministic mix of operations over an image of `size` bytes, about 15% of the writes
// and write-zeroes with FUA; ends with kClose. Indices are positions in the result.
std::vector<GuestOp> MakeOps(uint64_t size, uint64_t cs, int count, uint64_t seed);

// Compares what the guest reads (`got`) with `expect`, the content every durable operation
// gives it (zeros past its end). A byte may differ only if one of `candidates` (operations
// that may have reached the disk) gives it that value and, when `owner` is not empty, the
// candidate comes after owner[p], the index of the last durable operation that set byte p (-1
// for none). The size may differ only by an unflushed grow among the candidates. Returns ""
// or the first problem; counts in `unflushed` the bytes that hold a candidate's value.
std::string CheckGuestBytes(const std::vector<uint8_t>& got, std::span<const uint8_t> expect,
                            std::span<const int32_t> owner,
                            const std::vector<const GuestOp*>& candidates, uint64_t* unflushed);

// What a power failure after `cut` recorder events must leave of a run whose operations
// overlapped in time. An operation is durable at the cut if it returned before a flush was
// issued that returned by the cut, or if it is a FUA write that returned by the cut; any
// other operation issued by the cut may or may not have reached the disk, but never over a
// later durable operation's bytes. Cuts are visited in increasing order.
class DurabilityModel {
 public:
  DurabilityModel(const std::vector<uint8_t>& initial, const std::vector<GuestOp>& ops);

  void AdvanceTo(size_t cut);
  // "" if `got` is a content a crash at the current cut may leave, else the first problem.
  std::string Check(const std::vector<uint8_t>& got, uint64_t* unflushed) const;
  // The flush issued last of those that returned by the cut (nullptr: none), for messages.
  const GuestOp* last_flush() const { return last_flush_; }

 private:
  void MakeDurable(const GuestOp& op);

  const std::vector<GuestOp>& ops_;
  std::vector<uint8_t> expect_;  // sized for the largest grow; the guest size is size_
  std::vector<int32_t> owner_;
  uint64_t size_;
  std::vector<bool> durable_;
  std::vector<const GuestOp*> candidates_;
  const GuestOp* last_flush_ = nullptr;
  size_t cut_ = 0;
};

}  // namespace qcow2kit::testing
