// ReadAhead: reads a list of ranges of one file in list order, keeping several reads in
// flight, so that a walk over many tables (check, stats) waits for the device once per batch
// rather than once per table. Bytes past the end of the file read as zeros (as QEMU's block
// layer returns them).
//
//   ReadAhead ra(file, [&](ByteRange* r) { ...; return more; }, /*depth=*/16);
//   while (...) {
//     auto bytes = co_await ra.Next();   // the next range; valid until the next Next()
//   }
//
// Ranges come from a generator, called as reads are issued, so that a walk over millions of
// tables needs no list of them.
//
// Reads still in flight when the ReadAhead is destroyed finish on their own (their state is
// shared with them), so a caller may stop early.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "qcow2kit/file.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
};

class ReadAhead {
 public:
  // `next` stores the next range and returns true, or returns false at the end.
  using RangeSource = std::function<bool(ByteRange*)>;
  ReadAhead(File* file, RangeSource next, unsigned depth);
  ~ReadAhead();
  ReadAhead(const ReadAhead&) = delete;
  ReadAhead& operator=(const ReadAhead&) = delete;

  // The bytes of the next range (writable: a caller may patch and write them back).
  Task<Result<std::span<uint8_t>>> Next();

  struct State;  // shared with the reads in flight

 private:
  std::shared_ptr<State> state_;
};

}  // namespace qcow2kit
