#include "cli/common.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace qcow2kit::cli {

void AddImageOptions(CLI::App* cmd, ImageOptions* o, bool with_cache) {
  cmd->add_option("filename", o->filename, "Image file")->required();
  cmd->add_option("-f,--format", o->format, "Image format: qcow2 or raw (default: probe)");
  if (with_cache) {
    cmd->add_option("-t,--cache", o->cache, "Cache mode: none or writeback (default)");
  }
  cmd->add_flag("-U,--force-share", o->force_share,
                "Force shared access: take and check no image locks (read-only opens only)");
  cmd->add_option("--engine", o->engine, "I/O engine: auto, io_uring or sync");
}

void AddOutputOption(CLI::App* cmd, std::string* output) {
  cmd->add_option("--output", *output, "Output format: human (default) or json")
      ->check(CLI::IsMember({"human", "json"}));
}

CLI::App* AddCommand(Cli& cli, const std::string& name, const std::string& description,
                     std::function<int()> fn) {
  CLI::App* cmd = cli.app.add_subcommand(name, description);
  cmd->callback([&cli, fn = std::move(fn)] { cli.run = fn; });
  return cmd;
}

Result<OpenOptions> ReadOnlyOpenOptions(const ImageOptions& o) {
  OpenOptions open;
  open.writable = false;
  open.force_share = o.force_share;
  open.format = o.format;
  if (!o.format.empty() && o.format != "qcow2" && o.format != "raw") {
    return Status::Invalid("Unknown image format '" + o.format + "' (qcow2 or raw)");
  }
  if (!o.cache.empty()) {
    // qemu-img also accepts "off" for "none".
    QK_ASSIGN_OR_RETURN(open.cache, ParseCacheMode(o.cache == "off" ? "none" : o.cache));
  }
  return open;
}

Result<EngineKind> ChosenEngine(const Cli& cli, const std::string& command_engine) {
  std::string name = command_engine.empty() ? cli.engine : command_engine;
  if (name.empty()) {
    const char* env = std::getenv("QCOW2KIT_ENGINE");
    name = env && *env ? env : "auto";
  }
  auto kind = ParseEngineKind(name);
  if (!kind.ok()) {
    return Status::Invalid("Invalid engine '" + name + "' (auto, io_uring or sync)");
  }
  return *kind;
}

Result<std::unique_ptr<Reactor>> MakeReactor(EngineKind kind) {
  auto r = Reactor::Create(kind);
  if (!r.ok()) return r.status().WithContext("Could not start the I/O engine");
  return r;
}

Result<std::unique_ptr<Reactor>> MakeReactor(const Cli& cli, const std::string& command_engine) {
  QK_ASSIGN_OR_RETURN(EngineKind kind, ChosenEngine(cli, command_engine));
  return MakeReactor(kind);
}

int Fail(const std::string& message) {
  std::string out;
  size_t start = 0;
  while (start <= message.size()) {
    size_t nl = message.find('\n', start);
    if (nl == std::string::npos) nl = message.size();
    out += std::string(kProgram) + ": " + message.substr(start, nl - start) + "\n";
    start = nl + 1;
  }
  std::fflush(stdout);
  std::fputs(out.c_str(), stderr);
  return 1;
}

int Fail(const Status& status) {
  return Fail(status.ToString());
}

int UsageError(const std::string& message, const std::string& command) {
  Fail(message);
  std::string cmd = command.empty() ? "" : " " + command;
  std::fprintf(stderr, "Try '%s%s --help' for more information.\n", kProgram, cmd.c_str());
  return 1;
}

bool WriteAll(std::FILE* f, std::string_view data) {
  return std::fwrite(data.data(), 1, data.size(), f) == data.size();
}

bool IsValidOptionList(const std::string& s) {
  if (s.empty() || s[0] == ',') return false;
  size_t trailing = 0;
  while (trailing < s.size() && s[s.size() - 1 - trailing] == ',') ++trailing;
  return trailing % 2 == 0;
}

}  // namespace qcow2kit::cli
