// Export: one image offered by the NBD server under a name, with the options that decide
// what clients may do with it and which transmission flags they are told.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qcow2kit/block.h"

namespace qcow2kit::nbd {

enum class DiscardMode { kIgnore, kUnmap };          // --discard
enum class DetectZeroes { kOff, kOn, kUnmap };       // --detect-zeroes

struct Export {
  std::string name;
  std::string description;
  BlockDevice* device = nullptr;
  bool read_only = false;
  bool multi_conn = false;  // several connections may share it (-e > 1)
  DiscardMode discard = DiscardMode::kIgnore;
  DetectZeroes detect_zeroes = DetectZeroes::kOff;

  uint64_t size() const { return device->size(); }
  // The transmission flags sent at NBD_OPT_GO / EXPORT_NAME.
  uint16_t TransmissionFlags(bool structured_replies) const;
};

// Finds the export called `name`, or nullptr.
const Export* FindExport(const std::vector<Export>& exports, const std::string& name);

}  // namespace qcow2kit::nbd
