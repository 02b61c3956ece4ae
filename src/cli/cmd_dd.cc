// qcow2kit dd: qemu-img dd. Copies the input's guest data from block `skip` into a new image
// (every byte written, zeros too, as qemu-img does), `count` blocks counted from the start of
// the input: qemu-img 7.2 counts the skipped blocks too, so bs=64k count=2 skip=1 copies one
// block. Operands, messages and exit codes are qemu-img's.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "fmt/format.h"
#include "image/create.h"
#include "image/create_options.h"
#include "qcow2kit/block.h"
#include "qcow2kit/buffer.h"
#include "tools/bench_options.h"
#include "tools/open_layer.h"

namespace qcow2kit::cli {
namespace {

constexpr uint64_t kCopyChunk = 4 << 20;

struct DdArgs {
  std::string format;
  std::string out_format = "raw";
  bool force_share = false;
  std::string engine;
  std::vector<std::string> operands;
};

int RunDd(const Cli& cli, const DdArgs& a) {
  uint64_t bs = 512;
  std::optional<uint64_t> count, skip;
  std::string in_name, out_name;
  for (const std::string& op : a.operands) {
    const size_t eq = op.find('=');
    const std::string key = op.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : op.substr(eq + 1);
    if (eq == std::string::npos ||
        (key != "bs" && key != "count" && key != "skip" && key != "if" && key != "of")) {
      return Fail("unrecognized operand " + key);
    }
    if (key == "if" || key == "of") {
      (key == "if" ? in_name : out_name) = value;
      continue;
    }
    const uint64_t max = key == "bs" ? INT32_MAX : INT64_MAX;
    auto v = tools::ParseQemuSize(key, value, key == "bs" ? 1 : 0, max);
    if (!v.ok()) return Fail(v.status().message());
    if (key == "bs") bs = *v;
    if (key == "count") count = *v;
    if (key == "skip") skip = *v;
  }
  if (in_name.empty() || out_name.empty()) {
    return Fail("Must specify both input and output files");
  }
  if (!a.format.empty() && a.format != "qcow2" && a.format != "raw") {
    return Fail("Unknown file format '" + a.format + "' (qcow2 or raw)");
  }
  if (a.out_format != "qcow2" && a.out_format != "raw") {
    return Fail("Unknown file format '" + a.out_format + "' (qcow2 or raw)");
  }
  auto reactor = MakeReactor(cli, a.engine);
  if (!reactor.ok()) return Fail(reactor.status());
  Reactor& r = **reactor;
  OpenOptions in_open;
  in_open.format = a.format;
  in_open.force_share = a.force_share;
  auto in_img = r.BlockOn(tools::OpenImageChain(in_name, in_open));
  if (!in_img.ok()) return Fail(in_img.status());
  BlockDevice in(std::move(*in_img));

  uint64_t size = in.size();
  if (count && *count <= INT64_MAX / bs && size > *count * bs) size = *count * bs;
  const uint64_t skip_bytes = skip ? *skip * bs : 0;
  const bool skip_too_far = skip && (*skip > INT64_MAX / bs || size < skip_bytes);

  CreateOptions create;
  create.filename = out_name;
  create.format = a.out_format;
  create.size = skip_too_far ? 0 : size - skip_bytes;
  Status s = r.BlockOn(CreateImage(create));
  if (!s.ok()) {
    return Fail(fmt::format("{}: error while creating output image: {}", out_name, s.message()));
  }
  OpenOptions out_open;
  out_open.writable = true;
  out_open.format = a.out_format;
  auto out_img = r.BlockOn(tools::OpenImageChain(out_name, out_open));
  if (!out_img.ok()) return Fail(out_img.status());
  BlockDevice out(std::move(*out_img));

  uint64_t in_pos = skip_bytes;
  if (skip_too_far) {
    // Like dd(1): a warning and an empty output.
    Fail(in_name + ": cannot skip to specified offset");
    in_pos = size;
  }
  AlignedBuffer buf(kCopyChunk);
  for (uint64_t out_pos = 0; in_pos < size;) {
    const uint64_t n = std::min(kCopyChunk, size - in_pos);
    s = r.BlockOn(in.Read(in_pos, buf.span().first(n)));
    if (!s.ok()) {
      (void)r.BlockOn(out.Close());
      return Fail("error while reading from input image file: " + s.message());
    }
    s = r.BlockOn(out.Write(out_pos, buf.span().first(n)));
    if (!s.ok()) {
      (void)r.BlockOn(out.Close());
      return Fail("error while writing to output image file: " + s.message());
    }
    in_pos += n;
    out_pos += n;
  }
  s = r.BlockOn(out.Close());
  if (!s.ok()) return Fail(s.WithContext("Could not close '" + out_name + "'"));
  return 0;
}

}  // namespace

void AddDdCommand(Cli& cli) {
  auto a = std::make_shared<DdArgs>();
  CLI::App* cmd = AddCommand(
      cli, "dd",
      "Copy blocks of an image into a new image (as qemu-img dd): bs= count= skip= if= of=",
      [&cli, a] { return RunDd(cli, *a); });
  cmd->add_option("-f", a->format, "Input format (default: probe)");
  cmd->add_option("-O", a->out_format, "Output format: qcow2 or raw (default: raw)");
  cmd->add_flag("-U,--force-share", a->force_share, "Open the input without locking");
  cmd->add_option("--engine", a->engine, "I/O engine: auto, io_uring or sync");
  cmd->add_option("operands", a->operands, "bs=N count=N skip=N if=INPUT of=OUTPUT")
      ->expected(0, -1);
}

}  // namespace qcow2kit::cli
