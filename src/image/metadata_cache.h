// MetadataCache: L2 tables and refcount blocks, cached in fixed-size slices with LRU eviction.
//
// A slice is `slice_bytes` (4 KiB by default, at most a cluster) of a table, keyed by its host
// offset. Lookups that hit are plain hash-map probes with no system call. Concurrent misses on
// the same slice share one read: later callers wait for the first one's result.
//
// Updated slices are dirty until WriteBack(); dirty slices are never evicted (the cache may
// exceed its capacity until the owner writes them back, in the order crash safety needs).
//
// Slice buffers are carved from page-aligned chunks mapped with mmap and reused through a free
// list: one aligned allocation per 4 KiB slice costs glibc about twice the slice in heap
// (alignment padding), so a full 32 MiB cache held some 64 MiB.
#pragma once

#include <coroutine>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>

#include "qcow2kit/buffer.h"
#include "qcow2kit/file.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit {

class MetadataCache {
 public:
  // `capacity_bytes` is rounded down to whole slices, with a minimum of 2 slices.
  MetadataCache(File* file, uint32_t slice_bytes, uint64_t capacity_bytes, const char* what);
  ~MetadataCache();

  uint32_t slice_bytes() const { return slice_bytes_; }
  size_t capacity() const { return capacity_; }
  size_t size() const { return map_.size(); }
  uint64_t hits() const { return hits_; }
  uint64_t misses() const { return misses_; }
  // Bytes of slice buffers held (cached slices plus free slots): bounded by the capacity plus
  // the dirty slices above it, rounded up to whole chunks.
  uint64_t buffer_bytes() const { return pool_.held_bytes(); }

  // The slice at host offset `offset` (a multiple of slice_bytes). The returned pointer stays
  // valid until the caller's next suspension point: use it, do not keep it.
  Task<Result<const uint8_t*>> Get(uint64_t offset);
  // A hit without suspending, or nullptr.
  const uint8_t* Peek(uint64_t offset);

  // The slice for modification: loaded if needed and marked dirty. Same validity rule as Get.
  Task<Result<uint8_t*>> GetForUpdate(uint64_t offset);
  // A new all-zero dirty slice at `offset` (for a freshly allocated table), replacing any
  // cached copy without reading.
  uint8_t* CreateZeroed(uint64_t offset);
  // Drops the slice if cached (a freed table), dirty or not.
  void Drop(uint64_t offset);
  // Drops every slice (the tables moved, as after a refcount rebuild). Nothing may be dirty
  // or loading.
  void DropAll();
  size_t dirty_count() const { return dirty_; }
  // Writes every dirty slice, in offset order, and marks them clean. Each write is first
  // offered to the guard (if set), which may refuse it (the slice stays dirty).
  Task<Status> WriteBack();
  using WriteGuard = std::function<Status(uint64_t offset, uint64_t length)>;
  void set_write_guard(WriteGuard guard) { guard_ = std::move(guard); }

 private:
  struct Entry {
    uint64_t offset;
    uint8_t* data;  // a slot of pool_
    bool dirty = false;
  };
  // Fixed-size, I/O-aligned slots from chunks that live as long as the cache.
  class SlicePool {
   public:
    SlicePool(uint32_t slot_bytes, size_t slots_per_chunk)
        : slot_bytes_(slot_bytes), slots_per_chunk_(slots_per_chunk) {}
    ~SlicePool();
    SlicePool(const SlicePool&) = delete;
    SlicePool& operator=(const SlicePool&) = delete;
    uint8_t* Take();  // aborts when out of memory, as AlignedBuffer does
    void Give(uint8_t* slot) { free_.push_back(slot); }
    uint64_t held_bytes() const {
      return uint64_t(chunks_.size()) * slots_per_chunk_ * slot_bytes_;
    }

   private:
    uint32_t slot_bytes_;
    size_t slots_per_chunk_;
    std::vector<uint8_t*> chunks_;
    std::vector<uint8_t*> free_;
  };
  struct Loading;  // a read in progress and the coroutines waiting for it
  using Lru = std::list<Entry>;

  Task<Result<const uint8_t*>> Load(uint64_t offset);
  void MakeRoom();
  uint8_t* Insert(uint64_t offset, uint8_t* data);
  void Erase(Lru::iterator it);  // forgets a slice and returns its slot to the pool

  File* file_;
  uint32_t slice_bytes_;
  size_t capacity_;
  const char* what_;
  Lru lru_;  // most recently used first
  std::unordered_map<uint64_t, Lru::iterator> map_;
  std::unordered_map<uint64_t, Loading*> loading_;
  size_t dirty_ = 0;
  SlicePool pool_;
  WriteGuard guard_;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

}  // namespace qcow2kit
