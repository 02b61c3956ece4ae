// check -r all on an image given as bytes, then the same again: neither may crash, and when
// both complete and the first left no corruption, the first must have left no leak for the
// second to find. The second may fail as a check does on damage that no repair
// removes (QEMU's overlap check refusing a table write, say).
#include <cstdio>
#include <cstdlib>

#include "fuzz/fuzz_util.h"
#include "image/qcow2_image.h"

using namespace qcow2kit;

namespace {

Task<Result<CheckResult>> Repair(const std::string& path) {
  auto img = co_await OpenImage(path, fuzz::SelfContained(true, true));
  if (!img.ok()) co_return img.status();
  auto* q = dynamic_cast<Qcow2Image*>(img->get());
  if (!q) co_return Status::Invalid("not qcow2");
  auto r = co_await q->Check(kFixAll, nullptr);
  Status closed = co_await q->Close();
  (void)closed;
  co_return r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = fuzz::ScratchPath("repair");
  if (!fuzz::WriteScratch(path, data, size)) return 0;
  auto first = fuzz::TheReactor().BlockOn(Repair(path));
  // Damage that repair cannot remove (an L1 entry with reserved bits, say) can keep leaks
  // from being freed in the same run: qemu-img check -r all leaves them for a second run too.
  if (!first.ok() || first->check_errors || first->corruptions) return 0;
  auto second = fuzz::TheReactor().BlockOn(Repair(path));
  if (!second.ok() || second->check_errors) return 0;
  if (second->leaks_fixed || second->leaks) {
    std::fprintf(stderr, "check -r all left %lu leaks for a second run to repair\n",
                 static_cast<unsigned long>(second->leaks_fixed + second->leaks));
    std::abort();
  }
  return 0;
}
