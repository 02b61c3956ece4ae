#include "tools/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace qcow2kit::tools {

Progress::Progress(bool requested, double step, std::FILE* out) : step_(step), out_(out) {
  const char* force = std::getenv("QCOW2KIT_PROGRESS");
  enabled_ = requested && ((force && std::strcmp(force, "force") == 0) || isatty(fileno(out)));
  if (enabled_) Set(0);
}

void Progress::Set(double percent) {
  if (!enabled_) return;
  current_ = std::clamp(percent, 0.0, 100.0);
  if (current_ > last_drawn_ + step_ || current_ < last_drawn_ - step_ || current_ == 0 ||
      current_ == 100) {
    if (current_ == last_drawn_) return;
    last_drawn_ = current_;
    std::fprintf(out_, "    (%3.2f/100%%)\r", current_);
    std::fflush(out_);
    drawn_ = true;
  }
}

void Progress::End() {
  if (!drawn_) return;
  drawn_ = false;
  std::fprintf(out_, "\n");
  std::fflush(out_);
}

}  // namespace qcow2kit::tools
