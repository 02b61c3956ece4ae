// qcow2kit read: guest data of an image (range -o/-l) as raw bytes, a hexdump or a SHA-256.
#include <cstdio>
#include <memory>
#include <optional>

#include "cli/commands.h"
#include "fmt/format.h"
#include "qcow2kit/block.h"
#include "tools/hexdump.h"
#include "tools/open_layer.h"
#include "tools/read_stream.h"
#include "tools/sha256.h"
#include "tools/size_format.h"

namespace qcow2kit::cli {
namespace {

constexpr size_t kChunk = 1 << 20;
constexpr unsigned kReadsInFlight = 4;

struct ReadArgs {
  ImageOptions image;
  std::string offset;
  std::string length;
  std::string output_file;
  bool hexdump = false;
  bool sha256 = false;
};

Result<uint64_t> ParseArg(const std::string& what, const std::string& text) {
  auto v = tools::ParseQemuSizeText(text);
  if (!v.ok()) return Status::Invalid("Invalid " + what + " specified: '" + text + "'");
  return v;
}

// Closes the output file on every path.
struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f) std::fclose(f);
  }
};

int RunRead(const Cli& cli, const ReadArgs& a) {
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
  auto open = ReadOnlyOpenOptions(a.image);
  if (!open.ok()) return Fail(open.status());
  auto reactor = MakeReactor(cli, a.image.engine);
  if (!reactor.ok()) return Fail(reactor.status());
  auto img = (*reactor)->BlockOn(tools::OpenImageChain(a.image.filename, *open));
  if (!img.ok()) return Fail(img.status());
  BlockDevice dev(std::move(*img));

  const uint64_t size = dev.size();
  if (offset > size || (length && *length > size - offset)) {
    std::string range = length ? fmt::format("Offset {} + length {}", offset, *length)
                               : fmt::format("Offset {}", offset);
    return Fail(
        fmt::format("{} is past the end of '{}' (image size {})", range, a.image.filename, size));
  }
  const uint64_t n = length.value_or(size - offset);

  std::unique_ptr<std::FILE, FileCloser> file;
  std::FILE* out = stdout;
  if (!a.output_file.empty()) {
    file.reset(std::fopen(a.output_file.c_str(), "wb"));
    if (!file) {
      return Fail(Status::FromErrno(errno, "Could not open '" + a.output_file + "'"));
    }
    out = file.get();
  }
  const std::string out_name = a.output_file.empty() ? "standard output" : a.output_file;
  auto write = [&](std::string_view data) -> Status {
    if (WriteAll(out, data)) return Status::Ok();
    return Status::FromErrno(errno, "Could not write to " + out_name);
  };

  tools::Hexdumper hexdumper(offset);
  tools::Sha256 sha;
  std::string text;
  tools::ChunkSink sink = [&](uint64_t, std::span<const std::byte> data) -> Status {
    if (a.sha256) return sha.Update(data);
    if (a.hexdump) {
      text.clear();
      hexdumper.Feed(data, &text);
      return write(text);
    }
    return write(std::string_view(reinterpret_cast<const char*>(data.data()), data.size()));
  };
  Status s = tools::StreamRead(**reactor, dev, offset, n, kChunk, kReadsInFlight, sink);
  if (!s.ok()) return Fail(s.WithContext("Could not read '" + a.image.filename + "'"));
  if (a.sha256) {
    auto digest = sha.HexDigest();
    if (!digest.ok()) return Fail(digest.status());
    s = write(*digest + "\n");
  } else if (a.hexdump) {
    text.clear();
    hexdumper.Finish(&text);
    s = write(text);
  }
  if (s.ok() && std::fflush(out) != 0)
    s = Status::FromErrno(errno, "Could not write to " + out_name);
  if (s.ok() && file && std::fclose(file.release()) != 0) {
    s = Status::FromErrno(errno, "Could not write to " + out_name);
  }
  if (!s.ok()) return Fail(s);
  return 0;
}

}  // namespace

void AddReadCommand(Cli& cli) {
  auto a = std::make_shared<ReadArgs>();
  CLI::App* cmd = AddCommand(cli, "read", "Read guest data (whole image by default)",
                             [&cli, a] { return RunRead(cli, *a); });
  AddImageOptions(cmd, &a->image, /*with_cache=*/true);
  cmd->add_option("-o,--offset", a->offset, "First guest byte (size suffixes allowed)");
  cmd->add_option("-l,--length", a->length, "Bytes to read (default: to the end)");
  auto* output = cmd->add_option("--output", a->output_file, "Write the bytes to FILE");
  auto* hexdump = cmd->add_flag("--hexdump", a->hexdump, "Print a hexdump (as hexdump -C)");
  auto* sha256 = cmd->add_flag("--sha256", a->sha256, "Print the SHA-256 of the data");
  output->excludes(hexdump)->excludes(sha256);
  hexdump->excludes(sha256);
}

}  // namespace qcow2kit::cli
