// The copy engine of `convert`: one or more sources, concatenated, copied into a target with
// qemu-img convert's decisions (which ranges are data, zero or left to the target's backing
// file; zero detection at -S granularity; whole compressed clusters), so that the target's
// data/zero map is the one qemu-img would make. Several requests are in flight; compression
// runs on a pool of threads; writes go out in order unless asked otherwise, so the target's
// layout does not depend on timing or the number of threads.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>

#include "io/worker_pool.h"
#include "qcow2kit/block.h"

namespace qcow2kit::tools {

struct ConvertOptions {
  bool compressed = false;  // -c: data clusters written compressed (qcow2 targets)
  // -S: zero runs at least this long (bytes, a multiple of 512) are not written; 0 writes
  // every byte, zeros included (a fully allocated target).
  uint64_t min_sparse = 4096;
  // Zero runs start and end on this grid (bytes, a power of two): qemu-img uses the larger of
  // -S (rounded down to a power of two) and the target's request alignment.
  uint64_t alignment = 4096;
  unsigned requests = 8;  // -m: chunks in flight
  bool in_order = true;   // false with -W
  // Zero ranges need no write: the target is new (and has no backing file), or the caller
  // says it reads as zeros (--target-is-zero).
  bool target_reads_zeros = false;
  // -B: ranges a source's top layer leaves to its backing file stay unallocated in the
  // target, whose own backing file is to show through there.
  bool target_has_backing = false;
  // The size of the target's backing file, when known: past it, zero ranges stay unallocated.
  std::optional<uint64_t> target_backing_size;
  bool salvage = false;             // --salvage: unreadable sectors become zeros, with a warning
  uint64_t buffer_bytes = 2 << 20;  // one chunk of data (grown to a cluster when compressing)
  WorkerPool* compress_pool = nullptr;           // where -c compresses (nullptr: on the reactor)
  std::function<void(double)> progress;          // percent of the data done
  std::function<void(const std::string&)> warn;  // --salvage's warnings
};

// Bytes `sources` occupy once concatenated: each rounded up to 512, as qemu-img sizes them.
uint64_t ConcatenatedSize(std::span<BlockDevice* const> sources);

// Copies the sources into `target` (at least ConcatenatedSize() bytes). Does not flush or
// close the target. Errors name the byte offset, as qemu-img's do.
Task<Status> Convert(std::span<BlockDevice* const> sources, BlockDevice& target,
                     const ConvertOptions& options);

}  // namespace qcow2kit::tools
