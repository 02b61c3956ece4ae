// qcow2kit check: qemu-img check for qcow2 images. Diagnostics on stderr, the summary (or the
// ImageCheck JSON) on stdout, and qemu-img's exit codes: 0 clean, 1 check failed, 2
// corruptions, 3 leaked clusters only, 63 a format without checks.
#include <cstdio>
#include <cstring>
#include <memory>

#include "cli/commands.h"
#include "image/qcow2_image.h"
#include "tools/check_report.h"
#include "tools/open_layer.h"

namespace qcow2kit::cli {
namespace {

constexpr int kNoChecks = 63;

struct CheckArgs {
  ImageOptions image;
  std::string output = "human";
  std::string repair;  // -r: "", "leaks" or "all"
  bool quiet = false;
};

int RunCheck(const Cli& cli, const CheckArgs& a) {
  unsigned fix = kFixNothing;
  if (a.repair == "leaks") {
    fix = kFixLeaks;
  } else if (a.repair == "all") {
    fix = kFixAll;
  } else if (!a.repair.empty()) {
    return Fail("Unknown option value for -r (expecting 'leaks' or 'all'): " + a.repair);
  }
  auto open = ReadOnlyOpenOptions(a.image);
  if (!open.ok()) return Fail(open.status());
  open->writable = fix != kFixNothing;
  open->check = true;
  auto reactor = MakeReactor(cli, a.image.engine);
  if (!reactor.ok()) return Fail(reactor.status());
  auto img = (*reactor)->BlockOn(tools::OpenSingleLayer(a.image.filename, *open));
  if (!img.ok()) return Fail(img.status());
  auto* q = dynamic_cast<Qcow2Image*>(img->get());
  if (!q && a.image.format.empty() && open->writable) {
    // What QEMU says when it opens a probed raw image for writing.
    std::fprintf(stderr,
                 "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
                 "         Automatically detecting the format is dangerous for raw images, "
                 "write operations on block 0 will be restricted.\n"
                 "         Specify the 'raw' format explicitly to remove the restrictions.\n",
                 a.image.filename.c_str());
  }
  if (!q) {
    Fail("This image format does not support checks");
    return kNoChecks;
  }
  const CheckLog log = [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); };
  auto run = [&](unsigned mode) { return (*reactor)->BlockOn(q->Check(mode, log)); };
  const bool json = a.output == "json";
  std::string out;

  auto result = run(fix);
  if (result.ok() && (result->corruptions_fixed || result->leaks_fixed)) {
    // As qemu-img: report the repairs, then the counts of a fresh check (the fixed counts
    // carried over).
    if (!json) out += tools::RepairedHuman(*result);
    const CheckResult fixed = *result;
    result = run(kFixNothing);
    if (result.ok()) {
      result->corruptions_fixed = fixed.corruptions_fixed;
      result->leaks_fixed = fixed.leaks_fixed;
    }
  }
  if (result.ok()) {
    out += json ? tools::QemuJsonPretty(tools::CheckJson(*result, a.image.filename, "qcow2")) + "\n"
                : tools::CheckHuman(*result);
  }
  if (!a.quiet && !WriteAll(stdout, out)) {
    return Fail(Status::FromErrno(errno, "Could not write output"));
  }
  std::fflush(stdout);
  if (fix) {
    Status closed = (*reactor)->BlockOn(q->Close());
    if (!closed.ok() && result.ok()) result = closed;
  }
  if (!result.ok()) {
    // What went wrong first (as qemu-img's error report), then that the check failed.
    // Lines after the first are hints, printed without the program name as qemu-img does.
    const std::string& m = result.status().message();
    if (!m.empty()) {
      const size_t nl = m.find('\n');
      Fail(m.substr(0, nl));
      if (nl != std::string::npos) std::fprintf(stderr, "%s\n", m.c_str() + nl + 1);
    }
    return Fail(std::string("Check failed: ") + std::strerror(result.status().code()));
  }
  if (result->check_errors) return Fail("Check failed");
  return tools::CheckExitCode(*result);
}

}  // namespace

void AddCheckCommand(Cli& cli) {
  auto a = std::make_shared<CheckArgs>();
  CLI::App* cmd = AddCommand(cli, "check", "Check an image for consistency and repair it",
                             [&cli, a] { return RunCheck(cli, *a); });
  AddImageOptions(cmd, &a->image, /*with_cache=*/false);
  AddOutputOption(cmd, &a->output);
  cmd->add_option("-r,--repair", a->repair,
                  "Repair: 'leaks' (leaked clusters only) or 'all' (every error)");
  cmd->add_option("-T,--cache", a->image.cache, "Cache mode: none or writeback (default)");
  cmd->add_flag("-q,--quiet", a->quiet, "Print nothing but errors");
}

}  // namespace qcow2kit::cli
