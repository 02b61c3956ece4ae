// qcow2kit convert: qemu-img convert for qcow2 and raw images. Opens the sources (their
// backing chains too), creates the target (or opens it with -n), and runs the copy engine
// (tools/convert.h) with compression on every core. Options, checks and messages are
// qemu-img 7.2's; a target this command created is removed again if the copy fails, so that
// a failed convert never leaves a file that looks complete.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "fmt/format.h"
#include "image/create.h"
#include "image/create_options.h"
#include "io/worker_pool.h"
#include "qcow2kit/block.h"
#include "qcow2kit/buffer.h"
#include "tools/bench_options.h"
#include "tools/convert.h"
#include "tools/open_layer.h"
#include "tools/progress.h"

namespace qcow2kit::cli {
namespace {

constexpr uint64_t kMaxBufferBytes = 16 << 20;  // qemu-img's MAX_BUF_SECTORS

struct ConvertArgs {
  bool compress = false;
  bool progress = false;
  bool quiet = false;
  bool skip_create = false;  // -n
  std::string format;        // -f
  std::string out_format;    // -O
  std::vector<std::string> options;
  std::string backing;         // -B
  std::string backing_format;  // -F
  std::string snapshot;        // -l
  std::string sparse;          // -S
  std::string cache = "unsafe";
  std::string src_cache = "writeback";
  unsigned coroutines = 8;
  bool out_of_order = false;  // -W
  bool copy_offload = false;  // -C
  bool force_share = false;
  bool salvage = false;
  bool target_is_zero = false;
  unsigned threads = 0;
  std::string engine;
  std::vector<std::string> files;
  CLI::Option* sparse_opt = nullptr;
  CLI::Option* backing_opt = nullptr;
  CLI::Option* snapshot_opt = nullptr;
};

uint64_t Pow2Floor(uint64_t v) {
  uint64_t p = 1;
  while (p <= v / 2) p *= 2;
  return v == 0 ? 0 : p;
}

int RunConvert(const Cli& cli, const ConvertArgs& a) {
  // ---- options, checked in qemu-img's order ----
  std::string options;
  for (const std::string& o : a.options) {
    if (!IsValidOptionList(o)) return Fail("Invalid option list: " + o);
    options += (options.empty() ? "" : ",") + o;
  }
  uint64_t min_sparse = 4096;
  if (a.sparse_opt->count()) {
    auto v = tools::ParseQemuSize("buffer size for sparse output", a.sparse, 0, INT64_MAX);
    if (!v.ok()) return Fail(v.status().message());
    if (*v % 512 != 0 || *v > kMaxBufferBytes) {
      return Fail(
          "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up "
          "to 16777216. Select 0 to disable sparse detection (fully allocates output).");
    }
    min_sparse = *v;
  }
  if (a.coroutines < 1 || a.coroutines > 16) {
    return Fail("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");
  }
  const std::string out_format = a.out_format.empty() ? "raw" : a.out_format;
  if (a.compress && a.copy_offload) return Fail("Cannot enable copy offloading when -c is used");
  if (a.sparse_opt->count() && a.copy_offload) {
    return Fail("Cannot enable copy offloading when -S is used");
  }
  if (a.copy_offload && a.salvage) return Fail("Cannot use copy offloading in salvaging mode");
  if (a.skip_create && !options.empty()) {
    return Fail("-o has no effect when skipping image creation");
  }
  if (a.target_is_zero && !a.skip_create) return Fail("--target-is-zero requires use of -n flag");
  if (WantsOptionHelp(options)) {
    auto help = OptionHelp(out_format, a.files.size() >= 1);
    if (!help.ok()) return Fail(help.status());
    return WriteAll(stdout, *help) ? 0 : 1;
  }
  if (a.files.size() < 2) return Fail("Must specify image file name");
  const std::string out_filename = a.files.back();
  const std::vector<std::string> src_names(a.files.begin(), a.files.end() - 1);

  auto src_cache = ParseCacheMode(a.src_cache == "off" ? "none" : a.src_cache);
  if (!src_cache.ok()) return Fail("Invalid source cache option: " + a.src_cache);
  auto cache = ParseCacheMode(a.cache == "off" ? "none" : a.cache);
  if (!cache.ok()) return Fail("Invalid cache option: " + a.cache);
  if (!a.format.empty() && a.format != "qcow2" && a.format != "raw") {
    return Fail("Unknown file format '" + a.format + "' (qcow2 or raw)");
  }

  tools::Progress progress(a.progress && !a.quiet, 1.0);
  // Through the page cache a convert is memory copying: blocking calls on this thread do it
  // with the least overhead (io_uring hands buffered writes to kernel workers, which costs
  // more than it overlaps; bench/bench_convert.py). With direct I/O on either side, or an
  // engine chosen by the user, io_uring's concurrency pays.
  const bool buffered = *cache != CacheMode::kNone && *src_cache != CacheMode::kNone;
  const char* env_engine = std::getenv("QCOW2KIT_ENGINE");
  const bool engine_chosen =
      !a.engine.empty() || !cli.engine.empty() || (env_engine && *env_engine);
  auto reactor_or =
      buffered && !engine_chosen ? MakeReactor(EngineKind::kSync) : MakeReactor(cli, a.engine);
  if (!reactor_or.ok()) return Fail(reactor_or.status());
  Reactor& r = **reactor_or;

  // ---- the sources ----
  OpenOptions src_open;
  src_open.format = a.format;
  src_open.cache = *src_cache;
  src_open.force_share = a.force_share;
  std::vector<std::unique_ptr<BlockDevice>> sources;
  std::vector<BlockDevice*> source_ptrs;
  for (const std::string& name : src_names) {
    auto img = r.BlockOn(tools::OpenImageChain(name, src_open));
    if (!img.ok()) return Fail(img.status());
    sources.push_back(std::make_unique<BlockDevice>(std::move(*img)));
    source_ptrs.push_back(sources.back().get());
  }
  if (a.snapshot_opt->count()) {
    if (sources.size() > 1) return Fail("No support for concatenating multiple snapshot");
    Status s = r.BlockOn(tools::LoadSnapshotForReading(sources[0]->top(), a.snapshot));
    if (!s.ok()) return Fail(s);
  }
  const uint64_t total = tools::ConcatenatedSize(source_ptrs);

  // ---- the target ----
  bool has_backing = a.backing_opt->count() > 0;
  if (!a.skip_create) {
    if (out_format != "qcow2" && out_format != "raw") {
      return Fail("Unknown file format '" + out_format + "' (qcow2 or raw)");
    }
    CreateRequest request;
    request.filename = out_filename;
    request.format = out_format;
    request.options = options;
    request.size = total;
    if (has_backing) request.backing_file = a.backing;
    if (!a.backing_format.empty()) request.backing_format = a.backing_format;
    auto parsed = ParseCreateRequest(request);
    if (!parsed.ok()) return Fail(parsed.status());
    const auto backing_file = OptionValue(parsed->options, "backing_file");
    has_backing = backing_file.has_value();
    if (has_backing && src_names.size() > 1) {
      return Fail(
          "Having a backing file for the target makes no sense when concatenating multiple "
          "input images");
    }
    if (has_backing && !OptionValue(parsed->options, "backing_fmt")) {
      return Fail("Use of backing file requires explicit backing format");
    }
    auto create = ResolveCreateOptions(*parsed);
    if (!create.ok()) {
      return Fail(fmt::format("{}: error while converting {}: {}", out_filename, out_format,
                              create.status().message()));
    }
    if (a.compress) {
      if (out_format != "qcow2") return Fail("Compression not supported for this file format");
      if (create->preallocation != Preallocation::kOff) {
        return Fail("Compression and preallocation not supported at the same time");
      }
    }
    create->size = total;
    Status s = r.BlockOn(CreateImage(*create));
    if (!s.ok()) {
      return Fail(
          fmt::format("{}: error while converting {}: {}", out_filename, out_format, s.message()));
    }
  } else if (a.target_is_zero && has_backing) {
    return Fail("Cannot use --target-is-zero when the destination image has a backing file");
  }
  // From here on a target this command created is removed if the copy does not complete.
  auto fail_target = [&](const Status& s) {
    if (!a.skip_create) ::unlink(out_filename.c_str());
    return Fail(s);
  };

  OpenOptions out_open;
  out_open.writable = true;
  out_open.format = out_format;
  out_open.cache = *cache;
  auto target_img = r.BlockOn(tools::OpenImageChain(out_filename, out_open));
  if (!target_img.ok()) return fail_target(target_img.status());
  BlockDevice target(std::move(*target_img));
  if (a.skip_create) has_backing = target.top().backing() != nullptr;
  if (a.compress) {
    AlignedBuffer probe(target.top().cluster_size());
    AlignedBuffer out(target.top().cluster_size());
    auto can = target.top().CompressCluster(probe.span(), out.span());
    if (!can.ok()) {
      (void)r.BlockOn(target.Close());
      return fail_target(Status::Unsupported("Compression not supported for this file format"));
    }
  }
  if (target.size() < total) {
    (void)r.BlockOn(target.Close());
    return Fail("output file is smaller than input file");
  }

  tools::ConvertOptions o;
  o.compressed = a.compress;
  o.min_sparse = min_sparse;
  // Zero runs on the grid of -S and of the target's direct I/O blocks.
  const uint64_t request_alignment = *cache == CacheMode::kNone ? 4096 : 512;
  o.alignment = std::max({Pow2Floor(min_sparse), request_alignment, uint64_t{512}});
  o.requests = a.coroutines;
  o.in_order = !a.out_of_order;
  o.target_reads_zeros = (!a.skip_create && min_sparse != 0 && !has_backing) || a.target_is_zero;
  o.target_has_backing = has_backing;
  if (has_backing && !a.skip_create && target.top().backing()) {
    o.target_backing_size = target.top().backing()->size();
  }
  o.salvage = a.salvage;
  o.warn = [&a](const std::string& m) {
    if (!a.quiet) std::fprintf(stderr, "%s: warning: %s\n", kProgram, m.c_str());
  };
  if (progress.enabled()) o.progress = [&progress](double p) { progress.Set(p); };

  std::unique_ptr<WorkerPool> pool;
  if (a.compress) {
    auto p = WorkerPool::Create(a.threads);
    if (!p.ok()) return fail_target(p.status());
    pool = std::move(*p);
    r.Spawn(pool->Serve());
    o.compress_pool = pool.get();
  }
  Status s = r.BlockOn(tools::Convert(source_ptrs, target, o));
  if (pool) {
    pool->Stop();
    r.RunUntilIdle();
  }
  Status closed = r.BlockOn(target.Close());
  if (s.ok() && !closed.ok()) s = closed.WithContext("Could not close '" + out_filename + "'");
  if (!s.ok()) return fail_target(s);
  progress.Set(100);
  progress.End();
  return 0;
}

}  // namespace

void AddConvertCommand(Cli& cli) {
  auto a = std::make_shared<ConvertArgs>();
  CLI::App* cmd =
      AddCommand(cli, "convert", "Copy images into a new qcow2 or raw image (as qemu-img convert)",
                 [&cli, a] { return RunConvert(cli, *a); });
  cmd->add_flag("-c", a->compress, "Write data clusters compressed (qcow2 targets)");
  cmd->add_flag("-p", a->progress, "Show progress (on a terminal)");
  cmd->add_flag("-q", a->quiet, "Quiet: no progress, no warnings");
  cmd->add_flag("-n", a->skip_create, "Write into an existing target (-O gives its format)");
  cmd->add_option("-f", a->format, "Source format: qcow2 or raw (default: probe)");
  cmd->add_option("-O", a->out_format, "Target format: qcow2 or raw (default: raw)");
  cmd->add_option("-o", a->options, "Target options, key=value,... ('-o help' lists them)")
      ->allow_extra_args(false)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  a->backing_opt = cmd->add_option("-B", a->backing, "Make the target an overlay of BACKING");
  cmd->add_option("-F", a->backing_format, "Format of the -B backing file");
  a->snapshot_opt = cmd->add_option("-l", a->snapshot, "Convert an internal snapshot");
  a->sparse_opt = cmd->add_option(
      "-S", a->sparse, "Zero runs at least this long are not written (default 4k; 0: none)");
  cmd->add_option("-t", a->cache, "Target cache mode (default: unsafe)");
  cmd->add_option("-T", a->src_cache, "Source cache mode (default: writeback)");
  cmd->add_option("-m", a->coroutines, "Requests in flight, 1 to 16 (default 8)");
  cmd->add_flag("-W", a->out_of_order, "Allow out-of-order writes to the target");
  cmd->add_flag("-C", a->copy_offload, "Copy offload (accepted; copies normally)");
  cmd->add_flag("-U,--force-share", a->force_share, "Open the sources without locking");
  cmd->add_flag("--salvage", a->salvage, "Read errors become zeros (with a warning)");
  cmd->add_flag("--target-is-zero", a->target_is_zero,
                "With -n: the target reads as zeros, zero ranges need no write");
  cmd->add_option("--threads", a->threads, "Compression threads (default: one per core)");
  cmd->add_option("--engine", a->engine, "I/O engine: auto, io_uring or sync");
  cmd->add_option("files", a->files, "SOURCE... TARGET")->expected(0, -1);
}

}  // namespace qcow2kit::cli
