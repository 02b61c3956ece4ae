#include "tools/bench_options.h"

#include <cerrno>
#include <climits>
#include <cstdlib>

#include "fmt/format.h"
#include "tools/size_format.h"

namespace qcow2kit::tools {

std::optional<uint64_t> ParseQemuUlong(const std::string& text, uint64_t max) {
  if (text.empty()) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  unsigned long long v = std::strtoull(text.c_str(), &end, 0);
  if (end == text.c_str() || *end != '\0') return std::nullopt;
  if (errno == ERANGE || v > max) return std::nullopt;
  return v;
}

Result<uint64_t> ParseQemuSize(const std::string& name, const std::string& text, uint64_t min,
                               uint64_t max) {
  auto range_error = [&] {
    return Status::Invalid(
        fmt::format("Invalid {} specified. Must be between {} and {}.", name, min, max));
  };
  auto parsed = ParseQemuSizeText(text);
  if (!parsed.ok()) {
    if (parsed.status().code() == ERANGE) return range_error();
    return Status::Invalid(
        fmt::format("Invalid {} specified. You may use k, M, G, T, P or E suffixes for\n"
                    "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
                    name));
  }
  if (*parsed < min || *parsed > max) return range_error();
  return *parsed;
}

Result<BenchOptions> ParseBenchArgs(const BenchArgs& a) {
  BenchOptions o;
  if (a.count) {
    auto v = ParseQemuUlong(*a.count, INT_MAX);
    if (!v) return Status::Invalid("Invalid request count specified");
    o.count = static_cast<uint32_t>(*v);
  }
  if (a.depth) {
    auto v = ParseQemuUlong(*a.depth, INT_MAX);
    // qemu-img 7.2 accepts 0 and then waits forever.
    if (!v || *v == 0) return Status::Invalid("Invalid queue depth specified");
    o.depth = static_cast<uint32_t>(*v);
  }
  if (a.offset) {
    QK_ASSIGN_OR_RETURN(o.offset, ParseQemuSize("offset", *a.offset, 0, INT64_MAX));
  }
  if (a.buffer_size) {
    QK_ASSIGN_OR_RETURN(uint64_t v, ParseQemuSize("buffer size", *a.buffer_size, 0, INT_MAX));
    o.buffer_size = static_cast<uint32_t>(v);
  }
  uint32_t step = 0;
  if (a.step_size) {
    QK_ASSIGN_OR_RETURN(uint64_t v, ParseQemuSize("step_size", *a.step_size, 0, INT_MAX));
    step = static_cast<uint32_t>(v);
  }
  o.step = step ? step : o.buffer_size;
  if (a.pattern) {
    auto v = ParseQemuUlong(*a.pattern, 0xff);
    if (!v) return Status::Invalid("Invalid pattern byte specified");
    o.pattern = static_cast<uint8_t>(*v);
  }
  if (a.flush_interval) {
    auto v = ParseQemuUlong(*a.flush_interval, INT_MAX);
    if (!v) return Status::Invalid("Invalid flush interval specified");
    o.flush_interval = static_cast<uint32_t>(*v);
  }
  if (a.cache) {
    std::string mode = *a.cache == "off" ? "none" : *a.cache;
    auto c = ParseCacheMode(mode);
    if (!c.ok()) return Status::Invalid("Invalid cache mode");
    o.cache = *c;
  }
  if (a.aio) {
    if (*a.aio == "threads") {
      o.engine = EngineKind::kSync;
    } else if (*a.aio == "native" || *a.aio == "io_uring") {
      o.engine = EngineKind::kUring;
      o.native_aio = *a.aio == "native";
    } else {
      return Status::Invalid("Invalid aio option: " + *a.aio);
    }
  }
  if (a.native) {
    o.native_aio = true;
    if (!o.engine) o.engine = EngineKind::kUring;
  }
  o.write = a.write;
  o.drain_on_flush = !a.no_drain;
  o.random = a.random;
  if (!o.write && o.flush_interval) {
    return Status::Invalid("--flush-interval is only available in write tests");
  }
  if (o.flush_interval && o.flush_interval < o.depth) {
    return Status::Invalid("Flush interval can't be smaller than depth");
  }
  return o;
}

std::string BenchSummaryLine(const BenchOptions& o) {
  return fmt::format(
      "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size "
      "{})",
      o.count, o.write ? "write" : "read", o.buffer_size, o.depth, o.offset, o.step);
}

}  // namespace qcow2kit::tools
