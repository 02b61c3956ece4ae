// qcow2kit compare: qemu-img compare, with its messages and exit codes (0 identical,
// 1 different, 2 an image did not open, 3 block status failed, 4 a read failed).
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "qcow2kit/block.h"
#include "tools/compare.h"
#include "tools/open_layer.h"
#include "tools/progress.h"

namespace qcow2kit::cli {
namespace {

struct CompareArgs {
  std::string format_a;  // -f
  std::string format_b;  // -F
  std::string cache = "writeback";
  bool strict = false;
  bool progress = false;
  bool quiet = false;
  bool force_share = false;
  std::string engine;
  std::vector<std::string> files;
};

int RunCompare(const Cli& cli, const CompareArgs& a) {
  if (a.files.size() != 2) return UsageError("Expecting two image file names", "compare");
  auto cache = ParseCacheMode(a.cache == "off" ? "none" : a.cache);
  if (!cache.ok()) {
    Fail("Invalid source cache option: " + a.cache);
    return 2;
  }
  for (const std::string* f : {&a.format_a, &a.format_b}) {
    if (!f->empty() && *f != "qcow2" && *f != "raw") {
      Fail("Unknown file format '" + *f + "' (qcow2 or raw)");
      return 2;
    }
  }
  tools::Progress progress(a.progress && !a.quiet, 2.0);
  auto reactor = MakeReactor(cli, a.engine);
  if (!reactor.ok()) {
    Fail(reactor.status());
    return 2;
  }
  Reactor& r = **reactor;
  std::unique_ptr<BlockDevice> dev[2];
  for (int i = 0; i < 2; ++i) {
    OpenOptions o;
    o.format = i == 0 ? a.format_a : a.format_b;
    o.cache = *cache;
    o.force_share = a.force_share;
    auto img = r.BlockOn(tools::OpenImageChain(a.files[i], o));
    if (!img.ok()) {
      Fail(img.status());
      return 2;
    }
    dev[i] = std::make_unique<BlockDevice>(std::move(*img));
  }
  std::function<void(double)> report;
  if (progress.enabled()) report = [&progress](double p) { progress.Set(p); };
  const tools::CompareOutcome out =
      r.BlockOn(tools::CompareImages(*dev[0], a.files[0], *dev[1], a.files[1], a.strict, report));
  progress.End();
  if (!out.err.empty()) Fail(out.err.substr(0, out.err.size() - 1));
  if (!a.quiet && !WriteAll(stdout, out.out)) return 4;
  return out.exit_code;
}

}  // namespace

void AddCompareCommand(Cli& cli) {
  auto a = std::make_shared<CompareArgs>();
  CLI::App* cmd =
      AddCommand(cli, "compare", "Compare the guest contents of two images (as qemu-img compare)",
                 [&cli, a] { return RunCompare(cli, *a); });
  cmd->add_option("-f,--a-format", a->format_a, "Format of the first image (default: probe)");
  cmd->add_option("-F,--b-format", a->format_b, "Format of the second image (default: probe)");
  cmd->add_option("-T,--cache", a->cache, "Cache mode of both images (default: writeback)");
  cmd->add_flag("-s,--strict", a->strict, "Strict: sizes and allocation must match too");
  cmd->add_flag("-p,--progress", a->progress, "Show progress (on a terminal)");
  cmd->add_flag("-q,--quiet", a->quiet, "Print nothing but errors");
  cmd->add_flag("-U,--force-share", a->force_share, "Open the images without locking");
  cmd->add_option("--engine", a->engine, "I/O engine: auto, io_uring or sync");
  cmd->add_option("files", a->files, "FILE1 FILE2")->expected(0, -1);
}

}  // namespace qcow2kit::cli
