// Options of `bench`, validated with qemu-img bench's (7.2) messages, minus its hangs: a queue
// depth of 0 is refused rather than waited on forever.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "qcow2kit/file.h"
#include "qcow2kit/reactor.h"
#include "qcow2kit/status.h"

namespace qcow2kit::tools {

// The option values as typed (unset = not given).
struct BenchArgs {
  std::optional<std::string> count;           // -c
  std::optional<std::string> depth;           // -d
  std::optional<std::string> offset;          // -o
  std::optional<std::string> buffer_size;     // -s
  std::optional<std::string> step_size;       // -S
  std::optional<std::string> pattern;         // --pattern
  std::optional<std::string> flush_interval;  // --flush-interval
  std::optional<std::string> cache;           // -t
  std::optional<std::string> aio;             // -i
  bool write = false;                         // -w
  bool native = false;                        // -n
  bool no_drain = false;                      // --no-drain
  bool random = false;                        // --random
};

struct BenchOptions {
  uint32_t count = 75000;
  uint32_t depth = 64;
  uint64_t offset = 0;
  uint32_t buffer_size = 4096;
  uint32_t step = 4096;  // -S 0 (or none) means the buffer size
  uint8_t pattern = 0;
  uint32_t flush_interval = 0;
  bool drain_on_flush = true;
  bool write = false;
  bool random = false;
  CacheMode cache = CacheMode::kWriteback;
  std::optional<EngineKind> engine;  // from -i / -n; unset: the global --engine
  // qemu-img refuses aio=native without O_DIRECT when it opens the image.
  bool native_aio = false;
};

// Validates like qemu-img bench. The message of a failure is the text qemu-img prints (some
// are two lines, separated by '\n'), without the "qemu-img: " prefix.
Result<BenchOptions> ParseBenchArgs(const BenchArgs& args);

// qemu_strtoul(text, NULL, 0) with an upper bound: strtoul syntax (decimal, 0x hex, 0 octal,
// a '-' wraps around), the whole text consumed.
std::optional<uint64_t> ParseQemuUlong(const std::string& text, uint64_t max);

// qemu-img's cvtnum_full(): a size with optional suffix in [min, max]; the error is qemu's
// "Invalid <name> specified. ..." text.
Result<uint64_t> ParseQemuSize(const std::string& name, const std::string& text, uint64_t min,
                               uint64_t max);

// The summary line qemu-img bench prints before the run.
std::string BenchSummaryLine(const BenchOptions& o);

}  // namespace qcow2kit::tools
