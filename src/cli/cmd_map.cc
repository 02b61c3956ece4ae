// qcow2kit map: qemu-img map's allocation map (JSON in QEMU 8.2's layout, or human).
#include <cinttypes>
#include <memory>

#include "cli/commands.h"
#include "qcow2kit/block.h"
#include "tools/bench_options.h"
#include "tools/map.h"
#include "tools/open_layer.h"

namespace qcow2kit::cli {
namespace {

// Block status is asked for this much at a time, as qemu-img does.
constexpr uint64_t kWindow = 1ull << 30;
// Enough L2 slices for a window at any cluster size.
constexpr uint64_t kMapL2CacheBytes = 1ull << 20;

struct MapArgs {
  ImageOptions image;
  std::string output = "human";
  std::string start_offset;
  std::string max_length;
};

int RunMap(const Cli& cli, const MapArgs& a) {
  uint64_t start = 0;
  uint64_t length = INT64_MAX;
  if (!a.start_offset.empty()) {
    auto v = tools::ParseQemuSize("start offset", a.start_offset, 0, INT64_MAX);
    if (!v.ok()) return Fail(v.status());
    start = *v;
  }
  if (!a.max_length.empty()) {
    auto v = tools::ParseQemuSize("max length", a.max_length, 0, INT64_MAX);
    if (!v.ok()) return Fail(v.status());
    length = *v;
  }
  auto open = ReadOnlyOpenOptions(a.image);
  if (!open.ok()) return Fail(open.status());
  // The map is one pass in guest order: each L2 slice is needed once, so a small cache does
  // as well as one covering the disk, and the memory no longer grows with the disk's size.
  open->l2_cache_bytes = kMapL2CacheBytes;
  auto reactor = MakeReactor(cli, a.image.engine);
  if (!reactor.ok()) return Fail(reactor.status());
  auto img = (*reactor)->BlockOn(tools::OpenImageChain(a.image.filename, *open));
  if (!img.ok()) return Fail(img.status());
  BlockDevice dev(std::move(*img));

  const bool json = a.output == "json";
  std::string error;  // set when the human format cannot show an entry
  tools::MapEmitFn emit = [&](const tools::MapEntry& e, bool last) -> Status {
    std::string line;
    if (json) {
      line = tools::MapEntryJson(e) + (last ? "]\n" : ",\n");
    } else if (e.data && !e.has_offset) {
      error = "File contains external, encrypted or compressed clusters.";
      return Status::Unsupported(error);
    } else if (e.data && !e.zero) {
      line = tools::MapEntryHuman(e) + "\n";
    }
    if (!WriteAll(stdout, line)) return Status::FromErrno(errno, "Could not write output");
    return Status::Ok();
  };
  if (!WriteAll(stdout, json ? "[" : tools::MapHumanHeader() + "\n")) {
    return Fail(Status::FromErrno(errno, "Could not write output"));
  }
  Status s = (*reactor)->BlockOn(tools::WalkMap(dev, start, length, kWindow, emit));
  if (!s.ok()) {
    if (!error.empty()) return Fail(error);
    return Fail(s.WithContext("Could not read file metadata"));
  }
  if (std::fflush(stdout) != 0) return Fail(Status::FromErrno(errno, "Could not write output"));
  return 0;
}

}  // namespace

void AddMapCommand(Cli& cli) {
  auto a = std::make_shared<MapArgs>();
  CLI::App* cmd = AddCommand(cli, "map", "Show the allocation map of an image (as qemu-img map)",
                             [&cli, a] { return RunMap(cli, *a); });
  AddImageOptions(cmd, &a->image, /*with_cache=*/false);
  AddOutputOption(cmd, &a->output);
  cmd->add_option("--start-offset", a->start_offset, "First guest byte to map");
  cmd->add_option("--max-length", a->max_length, "Number of guest bytes to map");
}

}  // namespace qcow2kit::cli
