// Sizes as QEMU prints them for people ("64 MiB", "196 KiB", "1.5 GiB", "0 B").
#pragma once

#include <cstdint>
#include <string>

namespace qcow2kit::tools {

// QEMU's size_to_str(): three significant digits ("%0.3g") in the largest binary unit that
// keeps the number below 1000.
std::string QemuSizeToStr(uint64_t bytes);

}  // namespace qcow2kit::tools
