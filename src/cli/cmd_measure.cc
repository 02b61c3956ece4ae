// qcow2kit measure: qemu-img measure for qcow2 and raw targets, with its checks, messages and
// its human and JSON output.
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "fmt/format.h"
#include "image/create_options.h"
#include "qcow2kit/block.h"
#include "tools/measure.h"
#include "tools/open_layer.h"
#include "tools/qemu_json.h"
#include "tools/size_format.h"

namespace qcow2kit::cli {
namespace {

struct MeasureArgs {
  std::string output = "human";
  std::string out_format = "raw";
  std::vector<std::string> options;
  std::string size;
  std::string format;
  std::string snapshot;
  bool force_share = false;
  std::string engine;
  std::vector<std::string> files;
  CLI::Option* size_opt = nullptr;
  CLI::Option* format_opt = nullptr;
  CLI::Option* snapshot_opt = nullptr;
};

int RunMeasure(const Cli& cli, const MeasureArgs& a) {
  std::string options;
  for (const std::string& o : a.options) options += (options.empty() ? "" : ",") + o;
  const bool has_size = a.size_opt->count() > 0;
  if (a.files.size() > 1) return Fail("At most one filename argument is allowed.");
  if (!has_size && a.files.size() != 1) {
    return Fail("Either --size N or one filename must be specified.");
  }
  if (has_size && !a.files.empty()) {
    return Fail("--size N cannot be used together with a filename.");
  }
  if (has_size && (a.format_opt->count() || a.snapshot_opt->count())) {
    return Fail("--image-opts, -f, and -l require a filename argument.");
  }
  std::optional<uint64_t> size;
  if (has_size) {
    auto v = tools::ParseQemuSizeText(a.size);
    if (!v.ok()) {
      return Fail(
          "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
          "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
    }
    size = *v;
  }
  if (a.out_format != "qcow2" && a.out_format != "raw") {
    return Fail("Block driver '" + a.out_format + "' does not support size measurement");
  }
  if (WantsOptionHelp(options)) {
    auto help = OptionHelp(a.out_format, false);
    if (!help.ok()) return Fail(help.status());
    return WriteAll(stdout, *help) ? 0 : 1;
  }
  CreateRequest request;
  request.filename = "measure";
  request.format = a.out_format;
  request.options = options;
  request.size = size.value_or(0);
  auto parsed = ParseCreateRequest(request);
  if (!parsed.ok()) {
    return Fail(parsed.status().message() + "\nInvalid options for file format '" + a.out_format +
                "'");
  }
  auto target = ResolveCreateOptions(*parsed);
  if (!target.ok()) return Fail(target.status());

  auto reactor = MakeReactor(cli, a.engine);
  if (!reactor.ok()) return Fail(reactor.status());
  std::unique_ptr<BlockDevice> source;
  if (!has_size) {
    if (!a.format.empty() && a.format != "qcow2" && a.format != "raw") {
      return Fail("Unknown file format '" + a.format + "' (qcow2 or raw)");
    }
    OpenOptions o;
    o.format = a.format;
    o.force_share = a.force_share;
    auto img = (*reactor)->BlockOn(tools::OpenImageChain(a.files[0], o));
    if (!img.ok()) return Fail(img.status());
    source = std::make_unique<BlockDevice>(std::move(*img));
    if (a.snapshot_opt->count()) {
      Status s = (*reactor)->BlockOn(tools::LoadSnapshotForReading(source->top(), a.snapshot));
      if (!s.ok()) return Fail(s);
    }
  }
  auto r = (*reactor)->BlockOn(tools::Measure(*target, size, source.get()));
  if (!r.ok()) return Fail(r.status());
  std::string out;
  if (a.output == "json") {
    tools::Json j;
    if (r->bitmaps) j["bitmaps"] = *r->bitmaps;
    j["required"] = r->required;
    j["fully-allocated"] = r->fully_allocated;
    out = tools::QemuJsonPretty(j) + "\n";
  } else {
    out = fmt::format("required size: {}\nfully allocated size: {}\n", r->required,
                      r->fully_allocated);
    if (r->bitmaps) out += fmt::format("bitmaps size: {}\n", *r->bitmaps);
  }
  if (!WriteAll(stdout, out)) return Fail(Status::FromErrno(errno, "Could not write output"));
  return 0;
}

}  // namespace

void AddMeasureCommand(Cli& cli) {
  auto a = std::make_shared<MeasureArgs>();
  CLI::App* cmd = AddCommand(cli, "measure",
                             "Size of an image made from FILE or of --size (as qemu-img measure)",
                             [&cli, a] { return RunMeasure(cli, *a); });
  AddOutputOption(cmd, &a->output);
  cmd->add_option("-O", a->out_format, "Target format: qcow2 or raw (default: raw)");
  cmd->add_option("-o", a->options, "Target options, key=value,...")
      ->allow_extra_args(false)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  a->size_opt = cmd->add_option("--size", a->size, "Virtual size instead of a source");
  a->format_opt = cmd->add_option("-f", a->format, "Source format (default: probe)");
  a->snapshot_opt = cmd->add_option("-l", a->snapshot, "Measure an internal snapshot");
  cmd->add_flag("-U,--force-share", a->force_share, "Open the source without locking");
  cmd->add_option("--engine", a->engine, "I/O engine: auto, io_uring or sync");
  cmd->add_option("filename", a->files, "Source image")->expected(0, -1);
}

}  // namespace qcow2kit::cli
