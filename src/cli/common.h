// What every qcow2kit subcommand shares: the command table, the options common to image
// commands (-f, -t, -U, --engine), making the reactor, and qemu-img's way of reporting errors
// ("qcow2kit: <message>" on stderr, exit status 1).
#pragma once

#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "CLI/CLI.hpp"
#include "qcow2kit/image.h"
#include "qcow2kit/reactor.h"
#include "qcow2kit/status.h"

namespace qcow2kit::cli {

inline constexpr const char* kProgram = "qcow2kit";

// The program's command line: the top-level app, the global options, and the subcommand
// chosen by the parse (set from the subcommand's callback, run after parsing succeeded).
struct Cli {
  CLI::App app{"qcow2kit: inspect and benchmark qcow2 and raw disk images", kProgram};
  std::string engine;  // --engine before the subcommand
  std::function<int()> run;
};

// Options of commands that open one image.
struct ImageOptions {
  std::string filename;
  std::string format;  // -f; empty: probe
  std::string cache;   // -t; empty: writeback
  std::string engine;  // --engine after the subcommand (wins over the global one)
  bool force_share = false;
};

// Adds FILENAME, -f, -U and --engine (and -t with `with_cache`) to `cmd`.
void AddImageOptions(CLI::App* cmd, ImageOptions* o, bool with_cache);
// Adds --output=human|json.
void AddOutputOption(CLI::App* cmd, std::string* output);

// Registers `name` and arranges for `fn` to run if it is the command chosen.
CLI::App* AddCommand(Cli& cli, const std::string& name, const std::string& description,
                     std::function<int()> fn);

// OpenOptions for a read-only open of o.filename.
Result<OpenOptions> ReadOnlyOpenOptions(const ImageOptions& o);

// The engine: --engine after the subcommand, else before it, else $QCOW2KIT_ENGINE, else auto.
Result<EngineKind> ChosenEngine(const Cli& cli, const std::string& command_engine);
Result<std::unique_ptr<Reactor>> MakeReactor(const Cli& cli, const std::string& command_engine);
Result<std::unique_ptr<Reactor>> MakeReactor(EngineKind kind);

// Prints "qcow2kit: <message>" (each line of a multi-line message prefixed) to stderr and
// returns 1, the exit status of a failed command.
int Fail(const std::string& message);
int Fail(const Status& status);
// A usage error: the message and a pointer to --help. Returns 1.
int UsageError(const std::string& message, const std::string& command);

// qemu-img's is_valid_option_list for -o: not empty, no leading comma, no dangling trailing
// comma (",," is an escaped comma).
bool IsValidOptionList(const std::string& s);

// Writes all of `data` to `f`; false (with errno set) on failure.
bool WriteAll(std::FILE* f, std::string_view data);

}  // namespace qcow2kit::cli
