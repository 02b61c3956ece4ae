// An image given as bytes: open it (nothing else it names), read the start and the end of the
// guest, get block status, check it. Every failure must be an error, never a crash, a hang,
// an unbounded allocation or a sanitizer report.
#include <algorithm>
#include <vector>

#include "fuzz/fuzz_util.h"
#include "image/qcow2_image.h"
#include "qcow2kit/block.h"

using namespace qcow2kit;

namespace {

constexpr uint64_t kReadBytes = 256 << 10;
constexpr uint64_t kStatusBytes = 64 << 20;

Task<void> Exercise(const std::string& path, bool check) {
  auto img = co_await OpenImage(path, fuzz::SelfContained(false, check));
  if (!img.ok()) co_return;
  if (check) {
    auto* q = dynamic_cast<Qcow2Image*>(img->get());
    if (q) {
      auto r = co_await q->Check(kFixNothing, nullptr);
      (void)r;
    }
    co_return;
  }
  BlockDevice dev(std::move(*img));
  const uint64_t size = dev.size();
  std::vector<std::byte> buf(std::min(size, kReadBytes));
  if (!buf.empty()) {
    Status s = co_await dev.Read(0, buf);
    s = co_await dev.Read(size - buf.size(), buf);
    (void)s;
  }
  std::vector<BlockStatusExtent> extents;
  Status s = co_await dev.BlockStatus(0, std::min(size, kStatusBytes), &extents);
  if (size > kStatusBytes) {
    s = co_await dev.BlockStatus(size - kStatusBytes, kStatusBytes, &extents);
  }
  (void)s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = fuzz::ScratchPath("image");
  if (!fuzz::WriteScratch(path, data, size)) return 0;
  fuzz::TheReactor().BlockOn(Exercise(path, false));
  fuzz::TheReactor().BlockOn(Exercise(path, true));
  return 0;
}
