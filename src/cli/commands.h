// The subcommands, each registered from its own cmd_<name>.cc.
#pragma once

#include "cli/common.h"

namespace qcow2kit::cli {

void AddInfoCommand(Cli& cli);
void AddMapCommand(Cli& cli);
void AddDumpCommand(Cli& cli);
void AddStatsCommand(Cli& cli);
void AddReadCommand(Cli& cli);
void AddBenchCommand(Cli& cli);
void AddCreateCommand(Cli& cli);

}  // namespace qcow2kit::cli
