// qcow2kit bench: qemu-img bench's read and write benchmark, options and messages.
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "fmt/format.h"
#include "qcow2kit/block.h"
#include "tools/bench.h"
#include "tools/open_layer.h"

namespace qcow2kit::cli {
namespace {

struct BenchCliArgs {
  ImageOptions image;
  tools::BenchArgs bench;
  bool quiet = false;  // accepted; qemu-img 7.2 prints the summary regardless
};

int RunBenchCommand(const Cli& cli, const BenchCliArgs& a) {
  auto parsed = tools::ParseBenchArgs(a.bench);
  if (!parsed.ok()) return Fail(parsed.status());
  const tools::BenchOptions& o = *parsed;

  EngineKind engine;
  if (o.engine) {
    engine = *o.engine;  // -i / -n name the engine
  } else {
    auto kind = ChosenEngine(cli, a.image.engine);
    if (!kind.ok()) return Fail(kind.status());
    engine = *kind;
  }
  if (o.native_aio && o.cache != CacheMode::kNone) {
    return Fail("Could not open '" + a.image.filename +
                "': aio=native was specified, but it requires cache.direct=on, which was not "
                "specified.");
  }
  auto open = ReadOnlyOpenOptions(a.image);
  if (!open.ok()) return Fail(open.status());
  open->cache = o.cache;
  open->writable = o.write;
  auto reactor = MakeReactor(engine);
  if (!reactor.ok()) return Fail(reactor.status());
  auto img = (*reactor)->BlockOn(tools::OpenImageChain(a.image.filename, *open));
  if (!img.ok()) return Fail(img.status());
  BlockDevice dev(std::move(*img));

  std::string head = tools::BenchSummaryLine(o) + "\n";
  if (o.flush_interval) head += fmt::format("Sending flush every {} requests\n", o.flush_interval);
  if (o.random) {
    head += fmt::format("Using random offsets aligned to {} bytes\n",
                        o.buffer_size ? o.buffer_size : 512);
  }
  WriteAll(stdout, head);
  std::fflush(stdout);

  auto result = tools::RunBench(**reactor, dev, o);
  // A written image must be closed cleanly, also after a failed request.
  Status closed = o.write ? (*reactor)->BlockOn(dev.Close()) : Status::Ok();
  if (!result.ok()) return Fail(result.status());
  if (!closed.ok()) return Fail(closed.WithContext("Could not close '" + a.image.filename + "'"));
  std::printf("Run completed in %3.3f seconds.\n", result->seconds);
  return 0;
}

}  // namespace

void AddBenchCommand(Cli& cli) {
  auto a = std::make_shared<BenchCliArgs>();
  CLI::App* cmd =
      AddCommand(cli, "bench", "Run a simple read or write benchmark (as qemu-img bench)",
                 [&cli, a] { return RunBenchCommand(cli, *a); });
  AddImageOptions(cmd, &a->image, /*with_cache=*/false);
  tools::BenchArgs& b = a->bench;
  cmd->add_option("-c,--count", b.count, "Number of requests (default 75000)");
  cmd->add_option("-d,--depth", b.depth, "Requests in flight (default 64)");
  cmd->add_option("-o,--offset", b.offset, "Offset of the first request (default 0)");
  cmd->add_option("-s,--buffer-size", b.buffer_size, "Bytes per request (default 4096)");
  cmd->add_option("-S,--step-size", b.step_size, "Advance between requests (default: -s)");
  cmd->add_option("-t,--cache", b.cache, "Cache mode: none or writeback (default)");
  cmd->add_option("-i,--aio", b.aio, "AIO backend: threads (sync), native or io_uring");
  cmd->add_option("--pattern", b.pattern, "Fill byte for write requests");
  cmd->add_option("--flush-interval", b.flush_interval, "Flush every N write requests");
  cmd->add_flag("-w,--write", b.write, "Write test");
  cmd->add_flag("-n,--native", b.native, "Native AIO (needs -t none)");
  cmd->add_flag("--no-drain", b.no_drain, "Flush without draining the queue");
  cmd->add_flag("--random", b.random, "Random request offsets (fixed seed)");
  cmd->add_flag("-q,--quiet", a->quiet, "Accepted for compatibility");
}

}  // namespace qcow2kit::cli
