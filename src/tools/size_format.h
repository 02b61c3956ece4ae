// Sizes as QEMU prints them for people ("64 MiB", "196 KiB", "1.5 GiB", "0 B") and parses
// them from command lines ("64k", "1.5G", "0x1000").
#pragma once

#include <cstdint>
#include <string>

#include "qcow2kit/status.h"

namespace qcow2kit::tools {

// QEMU's size_to_str(): three significant digits ("%0.3g") in the largest binary unit that
// keeps the number below 1000.
std::string QemuSizeToStr(uint64_t bytes);

// qemu_strtosz(): ParseSize() syntax plus plain hexadecimal ("0x1e": no fraction, no suffix),
// which ParseSize() does not handle. Errors are EINVAL, or ERANGE for a well-formed number
// that does not fit in 64 bits.
Result<uint64_t> ParseQemuSizeText(const std::string& text);

}  // namespace qcow2kit::tools
