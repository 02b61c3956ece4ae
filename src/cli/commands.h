// The subcommands, each registered from its own cmd_<name>.cc.
#pragma once

#include <string>
#include <vector>

#include "cli/common.h"

namespace qcow2kit::cli {

void AddInfoCommand(Cli& cli);
void AddMapCommand(Cli& cli);
void AddDumpCommand(Cli& cli);
void AddStatsCommand(Cli& cli);
void AddReadCommand(Cli& cli);
void AddBenchCommand(Cli& cli);
void AddCreateCommand(Cli& cli);
void AddWriteCommand(Cli& cli);
void AddResizeCommand(Cli& cli);
void AddServeCommand(Cli& cli);
void AddCheckCommand(Cli& cli);
void AddUblkCommand(Cli& cli);
void AddConvertCommand(Cli& cli);
void AddCompareCommand(Cli& cli);
void AddMeasureCommand(Cli& cli);
void AddDdCommand(Cli& cli);

// qemu-img resize takes its size argument off the end of the command line before parsing
// options, so "-1G" is a size: main() calls this (with the index of the "resize" word) before
// parsing, and it marks a last argument that starts with '-' as positional.
void ProtectResizeSize(std::vector<std::string>& args, size_t command_index);

}  // namespace qcow2kit::cli
