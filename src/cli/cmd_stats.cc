// qcow2kit stats: cluster usage, metadata size and fragmentation of a qcow2 image.
#include <memory>

#include "cli/commands.h"
#include "image/qcow2_image.h"
#include "tools/open_layer.h"
#include "tools/stats.h"

namespace qcow2kit::cli {
namespace {

struct StatsArgs {
  ImageOptions image;
  std::string output = "human";
};

int RunStats(const Cli& cli, const StatsArgs& a) {
  auto open = ReadOnlyOpenOptions(a.image);
  if (!open.ok()) return Fail(open.status());
  auto reactor = MakeReactor(cli, a.image.engine);
  if (!reactor.ok()) return Fail(reactor.status());
  auto img = (*reactor)->BlockOn(tools::OpenSingleLayer(a.image.filename, *open));
  if (!img.ok()) return Fail(img.status());
  auto* qcow2 = dynamic_cast<Qcow2Image*>(img->get());
  if (!qcow2) {
    return Fail("'" + a.image.filename + "' is not a qcow2 image (format " + (*img)->format_name() +
                ")");
  }
  auto stats = (*reactor)->BlockOn(tools::ComputeStats(*qcow2));
  if (!stats.ok()) return Fail(stats.status().WithContext("'" + a.image.filename + "'"));
  std::string out = a.output == "json" ? tools::JsonDump(tools::StatsJson(*stats)) + "\n"
                                       : tools::StatsHuman(*stats);
  if (!WriteAll(stdout, out)) return Fail(Status::FromErrno(errno, "Could not write output"));
  return 0;
}

}  // namespace

void AddStatsCommand(Cli& cli) {
  auto a = std::make_shared<StatsArgs>();
  CLI::App* cmd = AddCommand(cli, "stats", "Count data, zero, compressed and metadata clusters",
                             [&cli, a] { return RunStats(cli, *a); });
  AddImageOptions(cmd, &a->image, /*with_cache=*/false);
  AddOutputOption(cmd, &a->output);
}

}  // namespace qcow2kit::cli
