// Crash-image side of PowerFailRecorder: replays the log of one file up to a cut, keeping
// what a flush acknowledged and a random subset of the rest.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "io/powerfail_engine.h"

namespace qcow2kit {
namespace {

constexpr uint64_t kSector = 512;

bool Chance(std::mt19937_64& rng, double p) {
  // Uses the raw generator output so images do not depend on the library's distributions.
  return static_cast<double>(rng() >> 11) * 0x1.0p-53 < p;
}

void Apply(std::vector<std::byte>* content, uint64_t offset, const std::byte* data, size_t len) {
  if (offset + len > content->size()) content->resize(offset + len);
  std::memcpy(content->data() + offset, data, len);
}

// Applies the sectors of `e` that the rng keeps (each with probability 1/2).
void ApplyTorn(std::vector<std::byte>* content, const PowerFailEvent& e, std::mt19937_64& rng) {
  uint64_t pos = e.offset;
  while (pos < e.end()) {
    uint64_t next = std::min(e.end(), (pos / kSector + 1) * kSector);
    if (Chance(rng, 0.5)) Apply(content, pos, e.data.data() + (pos - e.offset), next - pos);
    pos = next;
  }
}

}  // namespace

CrashImage PowerFailRecorder::MakeCrashImage(int fd, size_t cut, std::mt19937_64& rng,
                                             const CrashOptions& options) const {
  CrashImage out;
  out.content = files_.at(fd).initial;
  cut = std::min(cut, events_.size());
  out.durable_before = DurableBefore(fd, cut);
  for (size_t i = 0; i < events_.size(); ++i) {
    const PowerFailEvent& e = events_[i];
    if (e.fd != fd || e.kind == PowerFailEvent::Kind::kFlush) continue;
    bool in_flight = i >= cut && options.include_in_flight &&
                     e.kind == PowerFailEvent::Kind::kWrite && e.submitted_at <= cut;
    if (i >= cut && !in_flight) continue;
    if (i >= out.durable_before && !Chance(rng, options.keep_probability)) continue;
    out.applied.push_back(i);
    if (e.kind == PowerFailEvent::Kind::kResize) {
      out.content.resize(e.length);
    } else if (i >= out.durable_before && options.torn_writes &&
               Chance(rng, options.torn_probability)) {
      out.torn.push_back(i);
      ApplyTorn(&out.content, e, rng);
    } else {
      Apply(&out.content, e.offset, e.data.data(), e.data.size());
    }
  }
  return out;
}

Status PowerFailRecorder::WriteCrashImage(int fd, size_t cut, std::mt19937_64& rng,
                                          const std::string& out_path,
                                          const CrashOptions& options) const {
  CrashImage image = MakeCrashImage(fd, cut, rng, options);
  int out = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out < 0) return Status::FromErrno(errno, "create '" + out_path + "'");
  size_t done = 0;
  while (done < image.content.size()) {
    ssize_t n = ::write(out, image.content.data() + done, image.content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = n < 0 ? errno : EIO;
      ::close(out);
      return Status::FromErrno(err, "write '" + out_path + "'");
    }
    done += static_cast<size_t>(n);
  }
  if (::close(out) != 0) return Status::FromErrno(errno, "close '" + out_path + "'");
  return Status::Ok();
}

}  // namespace qcow2kit
