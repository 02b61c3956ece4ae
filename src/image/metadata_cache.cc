#include "image/metadata_cache.h"

#include <algorithm>
#include <cassert>
#include <cstdlib>
#include <cstring>

#include <sys/mman.h>

#include "fmt/format.h"
#include "qcow2kit/reactor.h"

namespace qcow2kit {

struct MetadataCache::Loading {
  std::vector<std::coroutine_handle<>> waiters;
  bool done = false;
};

MetadataCache::MetadataCache(File* file, uint32_t slice_bytes, uint64_t capacity_bytes,
                             const char* what)
    : file_(file),
      slice_bytes_(slice_bytes),
      capacity_(std::max<uint64_t>(2, capacity_bytes / slice_bytes)),
      what_(what),
      // Chunks of up to 256 KiB, never more than the capacity needs.
      pool_(slice_bytes, std::clamp<size_t>((256u << 10) / slice_bytes, 1, capacity_)) {}

MetadataCache::~MetadataCache() = default;

MetadataCache::SlicePool::~SlicePool() {
  for (uint8_t* c : chunks_) ::munmap(c, slots_per_chunk_ * slot_bytes_);
}

uint8_t* MetadataCache::SlicePool::Take() {
  if (free_.empty()) {
    // mmap gives zeroed, page-aligned memory whose untouched pages cost nothing.
    size_t bytes = slots_per_chunk_ * slot_bytes_;
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    auto* chunk = static_cast<uint8_t*>(p);
    chunks_.push_back(chunk);
    for (size_t i = slots_per_chunk_; i-- > 0;) free_.push_back(chunk + i * slot_bytes_);
  }
  uint8_t* slot = free_.back();
  free_.pop_back();
  return slot;
}

const uint8_t* MetadataCache::Peek(uint64_t offset) {
  auto it = map_.find(offset);
  if (it == map_.end()) return nullptr;
  ++hits_;
  if (it->second != lru_.begin()) lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->data;
}

Task<Result<const uint8_t*>> MetadataCache::Get(uint64_t offset) {
  if (const uint8_t* p = Peek(offset)) co_return p;
  co_return co_await Load(offset);
}

void MetadataCache::Erase(Lru::iterator it) {
  if (it->dirty) --dirty_;
  map_.erase(it->offset);
  pool_.Give(it->data);
  lru_.erase(it);
}

void MetadataCache::MakeRoom() {
  // Evict clean slices from the cold end until one more (besides those being read) fits;
  // dirty ones stay until written back. Done before taking a slot, so that the pool holds no
  // more slots than the capacity.
  for (auto it = lru_.end(); map_.size() + loading_.size() >= capacity_ && it != lru_.begin();) {
    --it;
    if (it->dirty) continue;
    auto cold = it++;
    Erase(cold);
  }
}

uint8_t* MetadataCache::Insert(uint64_t offset, uint8_t* data) {
  lru_.push_front(Entry{offset, data});
  map_[offset] = lru_.begin();
  return data;
}

Task<Result<const uint8_t*>> MetadataCache::Load(uint64_t offset) {
  if (auto it = loading_.find(offset); it != loading_.end()) {
    // Someone is reading this slice already: wait for them, then look again.
    Loading* l = it->second;
    struct Wait {
      Loading* l;
      bool await_ready() const noexcept { return l->done; }
      void await_suspend(std::coroutine_handle<> h) { l->waiters.push_back(h); }
      void await_resume() const noexcept {}
    };
    co_await Wait{l};
    // `l` is gone now. Normally the slice is cached; if the read failed, try it ourselves so
    // that we report the error too.
    co_return co_await Get(offset);
  }
  ++misses_;
  MakeRoom();
  Loading loading;
  loading_[offset] = &loading;
  uint8_t* buf = pool_.Take();
  auto r = co_await file_->ReadAt(std::span(reinterpret_cast<std::byte*>(buf), slice_bytes_),
                                  offset);
  Status status;
  if (!r.ok()) {
    status = r.status();
  } else if (*r < slice_bytes_) {
    status = Status::Corrupt(
        fmt::format("{} at offset {:#x} lies past the end of '{}'", what_, offset, file_->path()));
  }
  uint8_t* data = nullptr;
  if (status.ok()) {
    data = Insert(offset, buf);
  } else {
    pool_.Give(buf);
  }
  loading_.erase(offset);
  loading.done = true;
  for (auto h : loading.waiters) Reactor::Current()->Post(h);
  if (!status.ok()) co_return status;
  co_return data;
}

Task<Result<uint8_t*>> MetadataCache::GetForUpdate(uint64_t offset) {
  auto r = co_await Get(offset);
  if (!r.ok()) co_return r.status();
  Entry& e = *map_.at(offset);
  if (!e.dirty) {
    e.dirty = true;
    ++dirty_;
  }
  co_return e.data;
}

uint8_t* MetadataCache::CreateZeroed(uint64_t offset) {
  Drop(offset);
  MakeRoom();
  uint8_t* buf = pool_.Take();
  std::memset(buf, 0, slice_bytes_);
  uint8_t* p = Insert(offset, buf);
  lru_.front().dirty = true;
  ++dirty_;
  return p;
}

void MetadataCache::Drop(uint64_t offset) {
  auto it = map_.find(offset);
  if (it != map_.end()) Erase(it->second);
}

void MetadataCache::DropAll() {
  assert(dirty_ == 0 && loading_.empty());
  for (Entry& e : lru_) pool_.Give(e.data);
  map_.clear();
  lru_.clear();
}

Task<Status> MetadataCache::WriteBack() {
  if (dirty_ == 0) co_return Status::Ok();
  std::vector<Entry*> dirty;
  for (Entry& e : lru_) {
    if (e.dirty) dirty.push_back(&e);
  }
  std::sort(dirty.begin(), dirty.end(),
            [](const Entry* a, const Entry* b) { return a->offset < b->offset; });
  for (Entry* e : dirty) {
    // Dirty entries are never evicted, so `e` stays valid across the write.
    if (guard_) QK_CO_RETURN_IF_ERROR(guard_(e->offset, slice_bytes_));
    Status s = co_await file_->WriteAt(
        std::span(reinterpret_cast<const std::byte*>(e->data), slice_bytes_), e->offset);
    if (!s.ok()) {
      co_return s.WithContext(fmt::format("Could not write {} at offset {:#x}", what_, e->offset));
    }
    e->dirty = false;
    --dirty_;
  }
  co_return Status::Ok();
}

}  // namespace qcow2kit
