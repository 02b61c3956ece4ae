// qcow2kit: the command-line front end. Parses the global options, dispatches to the chosen
// subcommand, and turns parse errors into qemu-img style messages.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/commands.h"

namespace {

constexpr const char* kVersion = "0.1.0";

}  // namespace

int main(int argc, char** argv) {
  using namespace qcow2kit::cli;
  Cli cli;
  bool version = false;
  // As with getopt, an option given twice takes its last value.
  cli.app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  cli.app.add_option("--engine", cli.engine,
                     "I/O engine: auto (default; $QCOW2KIT_ENGINE), io_uring or sync");
  cli.app.add_flag("--version", version, "Print the version and exit");
  cli.app.require_subcommand(0, 1);
  AddInfoCommand(cli);
  AddMapCommand(cli);
  AddDumpCommand(cli);
  AddStatsCommand(cli);
  AddReadCommand(cli);
  AddBenchCommand(cli);
  AddCreateCommand(cli);
  AddWriteCommand(cli);
  AddResizeCommand(cli);
  AddServeCommand(cli);
  AddCheckCommand(cli);
  AddUblkCommand(cli);
  AddConvertCommand(cli);
  AddCompareCommand(cli);
  AddMeasureCommand(cli);
  AddDdCommand(cli);

  // The first word that is not an option must name a command.
  std::vector<std::string> args(argv + 1, argv + argc);
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--engine") {
      ++i;
      continue;
    }
    if (arg.starts_with("-")) continue;
    const auto subs = cli.app.get_subcommands([&](CLI::App* s) { return s->check_name(arg); });
    if (subs.empty()) {
      return UsageError("Unknown command '" + arg + "'", "");
    }
    if (arg == "resize") ProtectResizeSize(args, static_cast<size_t>(i - 1));
    break;
  }

  try {
    std::reverse(args.begin(), args.end());  // CLI11 takes them last first
    cli.app.parse(args);
  } catch (const CLI::CallForHelp& e) {
    return cli.app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return cli.app.exit(e);
  } catch (const CLI::ParseError& e) {
    // Name the subcommand whose options were wrong, so the hint points at its help.
    std::string command;
    for (const CLI::App* sub : cli.app.get_subcommands()) command = sub->get_name();
    return UsageError(e.what(), command);
  }
  if (version) {
    std::printf("qcow2kit version %s\n", kVersion);
    return 0;
  }
  if (!cli.run) return UsageError("a command is required", "");
  return cli.run();
}
