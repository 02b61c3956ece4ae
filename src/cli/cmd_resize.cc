// qcow2kit resize: qemu-img resize, with its options, messages and checks in qemu-img 7.2's
// order: parse the size ([+|-]SIZE), open the image, then "New image size must be positive",
// "Preallocation can only be used for growing images", "Use the --shrink option ...", and
// the resize itself ("Image resized.").
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "fmt/format.h"
#include "qcow2kit/block.h"
#include "tools/open_layer.h"
#include "tools/size_format.h"

namespace qcow2kit::cli {
namespace {

struct ResizeArgs {
  ImageOptions image;
  std::string size;
  std::string preallocation;
  bool shrink = false;
  bool quiet = false;
  CLI::Option* prealloc_opt = nullptr;
};

Result<Preallocation> ParsePreallocation(const std::string& name) {
  if (name == "off") return Preallocation::kOff;
  if (name == "metadata") return Preallocation::kMetadata;
  if (name == "falloc") return Preallocation::kFalloc;
  if (name == "full") return Preallocation::kFull;
  return Status::Invalid("Invalid preallocation mode '" + name + "'");
}

// QEMU's QEMU_OPT_SIZE parsing of the size argument (qemu_strtosz) and its two messages.
Result<uint64_t> ParseSizeParameter(const std::string& text) {
  auto v = tools::ParseQemuSizeText(text);
  if (v.ok()) return v;
  if (v.status().code() == ERANGE) {
    return Status::Invalid("Value '" + text + "' is out of range for parameter 'size'");
  }
  return Status::Invalid(
      "Parameter 'size' expects a non-negative number below 2^64\n"
      "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
      "and exabytes, respectively.");
}

// As qemu-img's error_report_err(): the first line prefixed, the lines after it (hints) not.
int FailWithHint(const Status& status) {
  const std::string message = status.ToString();
  const size_t nl = message.find('\n');
  Fail(message.substr(0, nl));
  if (nl != std::string::npos) std::fprintf(stderr, "%s\n", message.substr(nl + 1).c_str());
  return 1;
}

int RunResize(const Cli& cli, const ResizeArgs& a) {
  if (a.image.filename.empty() || a.size.empty()) {
    return UsageError("Not enough arguments", "resize");
  }
  Preallocation prealloc = Preallocation::kOff;
  if (a.prealloc_opt->count()) {
    auto p = ParsePreallocation(a.preallocation);
    if (!p.ok()) return Fail(p.status());
    prealloc = *p;
  }
  // Grow (+), shrink (-) or absolute.
  std::string text = a.size;
  int relative = 0;
  if (text[0] == '+' || text[0] == '-') {
    relative = text[0] == '+' ? 1 : -1;
    text.erase(0, 1);
  }
  auto n = ParseSizeParameter(text);
  if (!n.ok()) return FailWithHint(n.status());

  auto open = ReadOnlyOpenOptions(a.image);
  if (!open.ok()) return Fail(open.status());
  open->writable = true;
  auto reactor = MakeReactor(cli, a.image.engine);
  if (!reactor.ok()) return Fail(reactor.status());
  auto img = (*reactor)->BlockOn(tools::OpenImageChain(a.image.filename, *open));
  if (!img.ok()) return Fail(img.status());
  BlockDevice dev(std::move(*img));

  // QEMU works in int64_t, and its current length is a whole number of 512-byte sectors (a
  // raw file of 1000 bytes is 1024 long to it).
  const int64_t current = static_cast<int64_t>((dev.size() + 511) / 512 * 512);
  int64_t total;
  if (relative) {
    const uint64_t delta = relative > 0 ? *n : 0 - *n;
    total = static_cast<int64_t>(static_cast<uint64_t>(current) + delta);
  } else {
    total = static_cast<int64_t>(*n);
  }
  Status s;
  if (total <= 0) {
    s = Status::Invalid("New image size must be positive");
  } else if (total <= current && prealloc != Preallocation::kOff) {
    s = Status::Invalid("Preallocation can only be used for growing images");
  } else if (total < current && !a.shrink) {
    Fail("Use the --shrink option to perform a shrink operation.");
    s = Status::Invalid(
        "warning: Shrinking an image will delete all data beyond the shrunken image's end. "
        "Before performing such an operation, make sure there is no important data there.");
  } else if (prealloc == Preallocation::kMetadata &&
             std::string(dev.top().format_name()) == "raw") {
    // QEMU's file-posix refuses it (the library would treat it as "off").
    s = Status::Unsupported("Unsupported preallocation mode: metadata");
  } else {
    s = (*reactor)->BlockOn(dev.Resize(static_cast<uint64_t>(total), prealloc));
  }
  // Always close: it flushes and marks the image clean, also after a failed resize.
  Status closed = (*reactor)->BlockOn(dev.Close());
  if (!s.ok()) return Fail(s);
  if (!closed.ok()) {
    return Fail(closed.WithContext("Could not close '" + a.image.filename + "'"));
  }
  if (!a.quiet) {
    std::fflush(stderr);
    if (!WriteAll(stdout, "Image resized.\n")) {
      return Fail(Status::FromErrno(errno, "Could not write to standard output"));
    }
  }
  return 0;
}

}  // namespace

void ProtectResizeSize(std::vector<std::string>& args, size_t command_index) {
  // qemu-img takes the size off the end of the command line before parsing the options, so
  // that "-1G" is not an option: do the same by putting "--" in front of it.
  if (args.size() < command_index + 3) return;  // resize FILE SIZE at least
  const std::string& last = args.back();
  if (last.size() < 2 || last[0] != '-' || last == "--" || last == "-h" || last == "--help") {
    return;
  }
  for (size_t i = command_index + 1; i + 1 < args.size(); ++i) {
    if (args[i] == "--") return;
  }
  args.insert(args.end() - 1, "--");
}

void AddResizeCommand(Cli& cli) {
  auto a = std::make_shared<ResizeArgs>();
  CLI::App* cmd =
      AddCommand(cli, "resize", "Change the virtual size of an image (as qemu-img resize)",
                 [&cli, a] { return RunResize(cli, *a); });
  cmd->add_option("filename", a->image.filename, "Image file");
  cmd->add_option("size", a->size,
                  "New size, or +SIZE / -SIZE relative to the current one (k, M, G, T, P, E "
                  "suffixes)");
  cmd->add_option("-f,--format", a->image.format, "Image format: qcow2 or raw (default: probe)");
  cmd->add_option("--engine", a->image.engine, "I/O engine: auto, io_uring or sync");
  a->prealloc_opt = cmd->add_option("--preallocation", a->preallocation,
                                    "Space for the grown range: off (default), metadata, "
                                    "falloc or full");
  cmd->add_flag("--shrink", a->shrink, "Allow shrinking (drops all data past the new end)");
  cmd->add_flag("-q,--quiet", a->quiet, "Do not print 'Image resized.'");
}

}  // namespace qcow2kit::cli
