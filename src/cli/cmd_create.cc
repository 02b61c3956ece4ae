// qcow2kit create: qemu-img create for qcow2 and raw images, with its options, its
// "Formatting ..." line and its messages, checked in the same order.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "image/create.h"
#include "image/create_options.h"

namespace qcow2kit::cli {
namespace {

struct CreateArgs {
  std::string format = "raw";
  std::vector<std::string> options;
  std::string backing_file;
  std::string backing_format;
  bool unsafe = false;
  bool quiet = false;
  std::string filename;
  std::string size;
  CLI::Option* backing_file_opt = nullptr;
  CLI::Option* backing_format_opt = nullptr;
  CLI::Option* size_opt = nullptr;
};

// "qcow2kit: FILE: message" as bdrv_img_create reports; further lines are hints, unprefixed.
int FailFor(const std::string& filename, const Status& status) {
  const std::string message = status.ToString();
  const size_t nl = message.find('\n');
  std::fflush(stdout);
  std::fprintf(stderr, "%s: %s: %s\n", kProgram, filename.c_str(), message.substr(0, nl).c_str());
  if (nl != std::string::npos) std::fprintf(stderr, "%s\n", message.substr(nl + 1).c_str());
  return 1;
}

int RunCreate(const Cli& cli, const CreateArgs& a) {
  std::string options;
  for (const std::string& o : a.options) {
    if (!IsValidOptionList(o)) return Fail("Invalid option list: " + o);
    options += (options.empty() ? "" : ",") + o;
  }
  if (WantsOptionHelp(options)) {
    auto help = OptionHelp(a.format, !a.filename.empty());
    if (!help.ok()) return Fail(help.status());
    return WriteAll(stdout, *help) ? 0 : 1;
  }
  if (a.filename.empty()) return UsageError("Expecting image file name", "create");

  CreateRequest request;
  request.filename = a.filename;
  request.format = a.format;
  request.options = options;
  request.unsafe = a.unsafe;
  if (a.backing_file_opt->count()) request.backing_file = a.backing_file;
  if (a.backing_format_opt->count()) request.backing_format = a.backing_format;
  if (a.size_opt->count()) {
    auto size = ParseSize(a.size);
    if (!size.ok()) {
      return Fail(
          "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
          "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
    }
    if (*size > INT64_MAX) {
      return Fail("Invalid image size specified. Must be between 0 and 9223372036854775807.");
    }
    request.size = *size;
  }

  auto parsed = ParseCreateRequest(request);
  if (!parsed.ok()) return FailFor(a.filename, parsed.status());
  auto reactor = MakeReactor(cli, "");
  if (!reactor.ok()) return Fail(reactor.status());
  auto size = (*reactor)->BlockOn(
      ResolveCreateSize(a.filename, OptionValue(parsed->options, "backing_file"),
                        OptionValue(parsed->options, "backing_fmt"), !a.unsafe, parsed->size));
  if (!size.ok()) return FailFor(a.filename, size.status());
  parsed->size = *size;

  if (!a.quiet) {
    WriteAll(stdout, FormattingLine(*parsed) + "\n");
    std::fflush(stdout);
  }
  auto create = ResolveCreateOptions(*parsed);
  if (!create.ok()) return FailFor(a.filename, create.status());
  Status s = (*reactor)->BlockOn(CreateImage(*create));
  if (!s.ok()) return FailFor(a.filename, s);
  return 0;
}

}  // namespace

void AddCreateCommand(Cli& cli) {
  auto a = std::make_shared<CreateArgs>();
  CLI::App* cmd = AddCommand(cli, "create", "Create a qcow2 or raw image (as qemu-img create)",
                             [&cli, a] { return RunCreate(cli, *a); });
  cmd->add_option("-f,--format", a->format, "Image format: qcow2 or raw (default: raw)");
  cmd->add_option("-o,--options", a->options,
                  "Format options, key=value,... ('-o help' lists them)")
      ->allow_extra_args(false)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);  // qemu-img joins every -o
  a->backing_file_opt = cmd->add_option("-b,--backing", a->backing_file, "Backing file");
  a->backing_format_opt =
      cmd->add_option("-F,--backing-format", a->backing_format, "Format of the backing file");
  cmd->add_flag("-u", a->unsafe, "Do not open the backing file (SIZE is then required)");
  cmd->add_flag("-q,--quiet", a->quiet, "Do not print the 'Formatting' line");
  cmd->add_option("filename", a->filename, "Image file to create");
  a->size_opt = cmd->add_option("size", a->size, "Virtual size (k, M, G, T, P, E suffixes)");
}

}  // namespace qcow2kit::cli
