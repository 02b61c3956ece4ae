// Progress: qemu-img's progress line ("    (42.00/100%)\r" on stdout, redrawn when the value
// moved by more than a step, a newline at the end), shared by the long-running commands.
// It is shown only on a terminal (a log or a pipe gets no carriage-return noise) unless
// QCOW2KIT_PROGRESS=force, and callers never enable it together with --output=json.
#pragma once

#include <cstdio>

namespace qcow2kit::tools {

class Progress {
 public:
  // `requested`: -p was given (and not -q). `step`: percent between redraws (qemu-img: 1).
  Progress(bool requested, double step, std::FILE* out = stdout);
  ~Progress() { End(); }

  bool enabled() const { return enabled_; }
  // The value now, 0 to 100. 0 and 100 are always drawn.
  void Set(double percent);
  // The final newline (once, if anything was drawn).
  void End();

 private:
  bool enabled_ = false;
  double step_;
  std::FILE* out_;
  double current_ = 0;
  double last_drawn_ = -1;
  bool drawn_ = false;
};

}  // namespace qcow2kit::tools
