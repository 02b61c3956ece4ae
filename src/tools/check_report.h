// How qemu-img check reports a CheckResult: the human summary and the ImageCheck JSON object,
// with qemu-img's rules for which counts appear.
#pragma once

#include <string>

#include "image/qcow2_check.h"
#include "tools/qemu_json.h"

namespace qcow2kit::tools {

// The "No errors were found on the image." / leak / corruption paragraphs, the allocation
// line and "Image end offset:" (each line ending in a newline).
std::string CheckHuman(const CheckResult& r);
// QAPI ImageCheck: filename, format and check-errors always; the other counts when non-zero.
Json CheckJson(const CheckResult& r, const std::string& filename, const std::string& format);
// "The following inconsistencies were found and repaired: ..." up to "Double checking the
// fixed image now...".
std::string RepairedHuman(const CheckResult& r);
// qemu-img check's exit status: 1 check errors, 2 corruptions, 3 leaks only, 0 clean.
int CheckExitCode(const CheckResult& r);

}  // namespace qcow2kit::tools
