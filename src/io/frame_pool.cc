// The per-thread pool of coroutine frames behind Task (see detail::AllocateFrame in task.h).
#include <array>
#include <cstdint>
#include <new>

#include "qcow2kit/task.h"

namespace qcow2kit::detail {
namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kPooled = false;
#else
constexpr bool kPooled = true;
#endif

constexpr std::size_t kGranule = 64;
constexpr std::size_t kLargest = 4096;  // larger frames are rare: not pooled
constexpr std::size_t kClasses = kLargest / kGranule;

struct FreeFrameNode {
  FreeFrameNode* next;
};

struct Pool {
  std::array<FreeFrameNode*, kClasses> heads{};
  ~Pool();
};

thread_local Pool pool;
// Trivially destructible, so still readable while (and after) `pool` is destroyed: frames
// freed during thread exit go straight back to the global allocator.
thread_local bool pool_gone = false;

Pool::~Pool() {
  pool_gone = true;
  for (FreeFrameNode*& head : heads) {
    while (head) ::operator delete(std::exchange(head, head->next));
  }
}

std::size_t ClassOf(std::size_t size) { return (size + kGranule - 1) / kGranule - 1; }

}  // namespace

void* AllocateFrame(std::size_t size) {
  if (!kPooled || size > kLargest || pool_gone) return ::operator new(size);
  std::size_t c = ClassOf(size);
  if (FreeFrameNode* node = pool.heads[c]) {
    pool.heads[c] = node->next;
    return node;
  }
  return ::operator new((c + 1) * kGranule);
}

void FreeFrame(void* frame, std::size_t size) noexcept {
  if (!kPooled || size > kLargest || pool_gone) {
    ::operator delete(frame);
    return;
  }
  auto* node = static_cast<FreeFrameNode*>(frame);
  std::size_t c = ClassOf(size);
  node->next = pool.heads[c];
  pool.heads[c] = node;
}

}  // namespace qcow2kit::detail
