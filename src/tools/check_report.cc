#include "tools/check_report.h"

#include "fmt/format.h"

namespace qcow2kit::tools {

std::string CheckHuman(const CheckResult& r) {
  std::string out;
  if (!r.corruptions && !r.leaks && !r.check_errors) {
    out += "No errors were found on the image.\n";
  } else {
    if (r.corruptions) {
      out += fmt::format(
          "\n{} errors were found on the image.\nData may be corrupted, or "
          "further writes to the image may corrupt it.\n",
          r.corruptions);
    }
    if (r.leaks) {
      out += fmt::format(
          "\n{} leaked clusters were found on the image.\nThis means waste of "
          "disk space, but no harm to data.\n",
          r.leaks);
    }
    if (r.check_errors) {
      out += fmt::format("\n{} internal errors have occurred during the check.\n", r.check_errors);
    }
  }
  if (r.total_clusters && r.allocated_clusters) {
    out += fmt::format(
        "{}/{} = {:.2f}% allocated, {:.2f}% fragmented, {:.2f}% compressed "
        "clusters\n",
        r.allocated_clusters, r.total_clusters, r.allocated_clusters * 100.0 / r.total_clusters,
        r.fragmented_clusters * 100.0 / r.allocated_clusters,
        r.compressed_clusters * 100.0 / r.allocated_clusters);
  }
  if (r.image_end_offset) out += fmt::format("Image end offset: {}\n", r.image_end_offset);
  return out;
}

Json CheckJson(const CheckResult& r, const std::string& filename, const std::string& format) {
  Json j = Json::object();
  j["filename"] = filename;
  j["format"] = format;
  j["check-errors"] = r.check_errors;
  auto optional = [&j](const char* key, uint64_t v) {
    if (v) j[key] = v;
  };
  optional("image-end-offset", r.image_end_offset);
  optional("corruptions", r.corruptions);
  optional("leaks", r.leaks);
  optional("corruptions-fixed", r.corruptions_fixed);
  optional("leaks-fixed", r.leaks_fixed);
  optional("total-clusters", r.total_clusters);
  optional("allocated-clusters", r.allocated_clusters);
  optional("fragmented-clusters", r.fragmented_clusters);
  optional("compressed-clusters", r.compressed_clusters);
  return j;
}

std::string RepairedHuman(const CheckResult& r) {
  return fmt::format(
      "The following inconsistencies were found and repaired:\n\n    {} leaked "
      "clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
      r.leaks_fixed, r.corruptions_fixed);
}

int CheckExitCode(const CheckResult& r) {
  if (r.check_errors) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}

}  // namespace qcow2kit::tools
