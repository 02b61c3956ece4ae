// qcow2kit write: writes guest data through the block layer, as qemu-io's write does: a
// pattern byte, the contents of a file (or standard input), zeros (optionally deallocating)
// or a discard, over -o OFFSET / -l LENGTH. Large ranges go in chunks with a few requests in
// flight; the image is closed (flushed, marked clean) at the end.
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "cli/commands.h"
#include "fmt/format.h"
#include "qcow2kit/block.h"
#include "qcow2kit/buffer.h"
#include "tools/bench_options.h"
#include "tools/open_layer.h"
#include "tools/size_format.h"

namespace qcow2kit::cli {
namespace {

// Data writes: 1 MiB buffers, 4 in flight. Zeroes / discard carry no data: bigger steps.
constexpr uint64_t kDataChunk = 1 << 20;
constexpr uint64_t kMetaChunk = 64 << 20;
constexpr unsigned kInFlight = 4;

enum class Mode { kPattern, kInput, kZeroes, kDiscard };

struct WriteArgs {
  ImageOptions image;
  std::string offset;
  std::string length;
  std::string pattern;
  std::string input;
  bool zeroes = false;
  bool unmap = false;
  bool discard = false;
  bool compressed = false;
  bool quiet = false;
  bool verbose = false;
  CLI::Option* pattern_opt = nullptr;
  CLI::Option* input_opt = nullptr;
};

Result<uint64_t> ParseArg(const std::string& what, const std::string& text) {
  auto v = tools::ParseQemuSizeText(text);
  if (!v.ok()) return Status::Invalid("Invalid " + what + " specified: '" + text + "'");
  return v;
}

struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f && f != stdin) std::fclose(f);
  }
};

// One request slot of the pipeline: its buffer (input mode) and the state of the request
// issued from it.
struct Slot {
  AlignedBuffer buf;
  bool busy = false;
  Status status;
};

Task<void> IssueChunk(BlockDevice* dev, Mode mode, uint64_t offset, uint64_t length,
                      std::span<const std::byte> data, bool unmap, bool compressed, Slot* slot) {
  Status s;
  switch (mode) {
    case Mode::kPattern:
    case Mode::kInput:
      data = data.first(static_cast<size_t>(length));
      // GCC 12: no co_await inside a conditional expression.
      if (compressed) {
        s = co_await dev->WriteCompressed(offset, data);
      } else {
        s = co_await dev->Write(offset, data);
      }
      break;
    case Mode::kZeroes:
      s = co_await dev->WriteZeroes(offset, length, unmap);
      break;
    case Mode::kDiscard:
      s = co_await dev->Discard(offset, length);
      break;
  }
  slot->status = std::move(s);
  slot->busy = false;
}

// Waits until `slot` has no request in flight.
Status WaitSlot(Reactor& reactor, Slot& slot) {
  while (slot.busy) {
    if (!reactor.RunOnce(true) && slot.busy) {
      return Status::Error(EDEADLK, "internal error: a write never completed");
    }
  }
  return Status::Ok();
}

// The input of --input: the open file and, for a regular file, its size.
struct Input {
  std::unique_ptr<std::FILE, FileCloser> file;
  std::FILE* f = nullptr;
  std::string name;
  std::optional<uint64_t> size;  // unknown for pipes, terminals, stdin
};

Result<Input> OpenInput(const std::string& path) {
  Input in;
  if (path == "-") {
    in.f = stdin;
    in.name = "standard input";
  } else {
    in.file.reset(std::fopen(path.c_str(), "rb"));
    if (!in.file) return Status::FromErrno(errno, "Could not open '" + path + "'");
    in.f = in.file.get();
    in.name = "'" + path + "'";
  }
  struct stat st;
  if (fstat(fileno(in.f), &st) == 0 && S_ISREG(st.st_mode)) {
    // From the current position: stdin may be a file already partly read.
    const off_t pos = ftello(in.f);
    const uint64_t start = pos > 0 ? static_cast<uint64_t>(pos) : 0;
    in.size = static_cast<uint64_t>(st.st_size) > start ? st.st_size - start : 0;
  }
  return in;
}

// Reads up to `n` bytes (fewer only at end of input).
Result<size_t> ReadInput(Input& in, std::span<std::byte> buf) {
  size_t got = std::fread(buf.data(), 1, buf.size(), in.f);
  if (got < buf.size() && std::ferror(in.f)) {
    return Status::FromErrno(errno ? errno : EIO, "Could not read " + in.name);
  }
  return got;
}

std::string Summary(Mode mode, uint64_t bytes, uint64_t offset, uint64_t ops, double seconds) {
  const char* verb = mode == Mode::kDiscard ? "discard" : "wrote";
  std::string out = fmt::format("{} {}/{} bytes at offset {}\n", verb, bytes, bytes, offset);
  const double secs = std::max(seconds, 1e-9);
  out += fmt::format("{}, {} ops; {:.4f} sec ({}/sec and {:.4f} ops/sec)\n",
                     tools::QemuSizeToStr(bytes), ops, seconds,
                     tools::QemuSizeToStr(static_cast<uint64_t>(static_cast<double>(bytes) / secs)),
                     static_cast<double>(ops) / secs);
  return out;
}

int RunWrite(const Cli& cli, const WriteArgs& a) {
  // ---- what to write ----
  const int modes =
      (a.pattern_opt->count() > 0) + (a.input_opt->count() > 0) + a.zeroes + a.discard;
  if (modes == 0) {
    return UsageError("Nothing to write: give one of --pattern, --input, --zeroes or --discard",
                      "write");
  }
  if (modes > 1) {
    return UsageError("Only one of --pattern, --input, --zeroes and --discard may be given",
                      "write");
  }
  if (a.unmap && !a.zeroes) return UsageError("--unmap is only valid with --zeroes", "write");
  if (a.compressed && (a.zeroes || a.discard)) {
    return UsageError("--compressed is only valid with --pattern or --input", "write");
  }
  Mode mode = a.zeroes                 ? Mode::kZeroes
              : a.discard              ? Mode::kDiscard
              : a.pattern_opt->count() ? Mode::kPattern
                                       : Mode::kInput;
  uint8_t pattern = 0;
  if (mode == Mode::kPattern) {
    auto v = tools::ParseQemuUlong(a.pattern, 0xff);
    if (!v) return Fail("Invalid pattern byte specified: '" + a.pattern + "'");
    pattern = static_cast<uint8_t>(*v);
  }
  uint64_t offset = 0;
  if (!a.offset.empty()) {
    auto v = ParseArg("offset", a.offset);
    if (!v.ok()) return Fail(v.status());
    offset = *v;
  }
  std::optional<uint64_t> length;
  if (!a.length.empty()) {
    auto v = ParseArg("length", a.length);
    if (!v.ok()) return Fail(v.status());
    length = *v;
  }
  Input input;
  if (mode == Mode::kInput) {
    auto in = OpenInput(a.input);
    if (!in.ok()) return Fail(in.status());
    input = std::move(*in);
    if (length && input.size && *input.size < *length) {
      return Fail(fmt::format("{} holds {} bytes, fewer than the length {} to write", input.name,
                              *input.size, *length));
    }
    if (!length) length = input.size;  // still unknown for a pipe: until end of input
  }

  // ---- the image ----
  auto open = ReadOnlyOpenOptions(a.image);
  if (!open.ok()) return Fail(open.status());
  open->writable = true;
  auto reactor = MakeReactor(cli, a.image.engine);
  if (!reactor.ok()) return Fail(reactor.status());
  auto img = (*reactor)->BlockOn(tools::OpenImageChain(a.image.filename, *open));
  if (!img.ok()) return Fail(img.status());
  BlockDevice dev(std::move(*img));
  Reactor& r = **reactor;
  const std::string& name = a.image.filename;

  const uint64_t size = dev.size();
  Status status;
  if (offset > size || (length && *length > size - offset)) {
    std::string range = length ? fmt::format("Offset {} + length {}", offset, *length)
                               : fmt::format("Offset {}", offset);
    status = Status::Invalid(
        fmt::format("{} is past the end of '{}' (image size {})", range, name, size));
  }
  // Pattern, zeroes and discard default to the rest of the image.
  if (!length && mode != Mode::kInput) length = size - std::min(offset, size);
  const uint64_t cluster = dev.top().cluster_size();
  if (status.ok() && a.compressed &&
      (offset % cluster != 0 || (length && *length % cluster != 0 && offset + *length != size))) {
    status = Status::Invalid(fmt::format(
        "Compressed writes cover whole clusters: offset and length must be multiples of the "
        "cluster size {} (the length may also reach the end of the image)",
        cluster));
  }

  // ---- the requests: chunks on a grid of the chunk size, so that concurrent requests do
  // not share clusters (up to 1 MiB clusters) ----
  const auto started = std::chrono::steady_clock::now();
  const uint64_t chunk = (mode == Mode::kZeroes || mode == Mode::kDiscard) ? kMetaChunk
                         : a.compressed ? std::max(kDataChunk, cluster)
                                        : kDataChunk;
  AlignedBuffer pattern_buf;
  if (mode == Mode::kPattern && status.ok()) {
    pattern_buf.Resize(static_cast<size_t>(std::min<uint64_t>(chunk, *length)));
    std::memset(pattern_buf.data(), pattern, pattern_buf.size());
  }
  std::vector<Slot> slots(kInFlight);
  uint64_t pos = offset;
  uint64_t ops = 0;
  while (status.ok()) {
    if (length && pos == offset + *length) break;
    Slot& slot = slots[ops % kInFlight];
    status = WaitSlot(r, slot);
    if (!status.ok()) break;
    if (!slot.status.ok()) break;  // reported below
    uint64_t n = (pos / chunk + 1) * chunk - pos;
    if (length) n = std::min(n, offset + *length - pos);
    std::span<const std::byte> data;
    if (mode == Mode::kPattern) {
      data = pattern_buf.span();
    } else if (mode == Mode::kInput) {
      if (slot.buf.size() < chunk) slot.buf.Resize(chunk);
      auto got = ReadInput(input, slot.buf.span().first(static_cast<size_t>(n)));
      if (!got.ok()) {
        status = got.status();
        break;
      }
      if (*got < n) {
        if (length) {  // the file shrank under us
          status = Status::IoError(fmt::format("{} ended after {} bytes, before the length {}",
                                               input.name, pos - offset + *got, *length));
          break;
        }
        n = *got;
        length = pos - offset + n;  // end of input: this is the last chunk
        if (n == 0) break;
      }
      if (n > size - std::min(pos, size)) {
        status = Status::Invalid(fmt::format(
            "{} is longer than the {} bytes from offset {} to the end of '{}' (image size {})",
            input.name, size - std::min(offset, size), offset, name, size));
        break;
      }
      data = slot.buf.span();
    }
    slot.busy = true;
    slot.status = Status::Ok();
    if (a.compressed && n % cluster != 0 && pos + n != size) {
      status = Status::Invalid(fmt::format(
          "{} ended at {} bytes, not at a cluster boundary: compressed writes cover whole "
          "clusters",
          input.name, pos - offset + n));
      break;
    }
    r.Spawn(IssueChunk(&dev, mode, pos, n, data, a.unmap, a.compressed, &slot));
    pos += n;
    ++ops;
  }
  // Slots and buffers live in this frame: let every request in flight finish.
  r.RunUntilIdle();
  for (Slot& s : slots) {
    if (status.ok() && !s.status.ok()) {
      status = s.status.WithContext("Could not write to '" + name + "'");
    }
  }
  // Always close: it flushes what was written and marks the image clean.
  Status closed = r.BlockOn(dev.Close());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (!status.ok()) return Fail(status);
  if (!closed.ok()) return Fail(closed.WithContext("Could not close '" + name + "'"));
  if (a.verbose && !a.quiet) {
    const uint64_t bytes = pos - offset;
    if (!WriteAll(stdout, Summary(mode, bytes, offset, ops, seconds))) {
      return Fail(Status::FromErrno(errno, "Could not write to standard output"));
    }
  }
  return 0;
}

}  // namespace

void AddWriteCommand(Cli& cli) {
  auto a = std::make_shared<WriteArgs>();
  CLI::App* cmd = AddCommand(
      cli, "write",
      "Write a pattern, a file's contents, zeros or a discard to a guest range (as qemu-io write)",
      [&cli, a] { return RunWrite(cli, *a); });
  AddImageOptions(cmd, &a->image, /*with_cache=*/true);
  cmd->add_option("-o,--offset", a->offset, "First guest byte (size suffixes allowed; default 0)");
  cmd->add_option("-l,--length", a->length,
                  "Bytes to write (default: the input's size, else to the end of the image)");
  // -P, -z and -u as qemu-io's write spells them.
  a->pattern_opt = cmd->add_option("-P,--pattern", a->pattern, "Fill byte (0xab or decimal)");
  a->input_opt =
      cmd->add_option("--input", a->input, "Write the contents of FILE ('-': standard input)");
  cmd->add_flag("-z,--zeroes", a->zeroes, "Make the range read as zeros");
  cmd->add_flag("-u,--unmap", a->unmap, "With --zeroes: whole clusters may be deallocated");
  cmd->add_flag("--discard", a->discard, "Discard whole clusters of the range");
  cmd->add_flag("-c,--compressed", a->compressed,
                "Store whole clusters compressed (qcow2; the image's compression type)");
  cmd->add_flag("-q,--quiet", a->quiet, "Print nothing (the default; wins over -v)");
  cmd->add_flag("-v,--verbose", a->verbose, "Print a summary line as qemu-io does");
}

}  // namespace qcow2kit::cli
