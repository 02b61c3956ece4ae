#include "image/metadata_cache.h"

#include <algorithm>
#include <cassert>
#include <cstring>

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
      what_(what) {}

MetadataCache::~MetadataCache() = default;

const uint8_t* MetadataCache::Peek(uint64_t offset) {
  auto it = map_.find(offset);
  if (it == map_.end()) return nullptr;
  ++hits_;
  if (it->second != lru_.begin()) lru_.splice(lru_.begin(), lru_, it->second);
  return reinterpret_cast<const uint8_t*>(it->second->data.data());
}

Task<Result<const uint8_t*>> MetadataCache::Get(uint64_t offset) {
  if (const uint8_t* p = Peek(offset)) co_return p;
  co_return co_await Load(offset);
}

uint8_t* MetadataCache::Insert(uint64_t offset, AlignedBuffer data) {
  // Evict clean slices from the cold end; dirty ones stay until written back.
  for (auto it = lru_.end(); map_.size() >= capacity_ && it != lru_.begin();) {
    --it;
    if (it->dirty) continue;
    map_.erase(it->offset);
    // Its buffer serves the next miss: a walk over many tables then allocates nothing once
    // the cache is full (freeing and allocating aligned buffers fragments the heap badly).
    if (spare_.size() < kMaxSpare) spare_.push_back(std::move(it->data));
    it = lru_.erase(it);
  }
  lru_.push_front(Entry{offset, std::move(data)});
  map_[offset] = lru_.begin();
  return reinterpret_cast<uint8_t*>(lru_.front().data.data());
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
  Loading loading;
  loading_[offset] = &loading;
  AlignedBuffer buf = TakeBuffer();
  auto r = co_await file_->ReadAt(buf.span(), offset);
  Status status;
  if (!r.ok()) {
    status = r.status();
  } else if (*r < slice_bytes_) {
    status = Status::Corrupt(
        fmt::format("{} at offset {:#x} lies past the end of '{}'", what_, offset, file_->path()));
  }
  uint8_t* data = status.ok() ? Insert(offset, std::move(buf)) : nullptr;
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
  co_return reinterpret_cast<uint8_t*>(e.data.data());
}

AlignedBuffer MetadataCache::TakeBuffer() {
  if (spare_.empty()) return AlignedBuffer(slice_bytes_);
  AlignedBuffer b = std::move(spare_.back());
  spare_.pop_back();
  return b;
}

uint8_t* MetadataCache::CreateZeroed(uint64_t offset) {
  Drop(offset);
  AlignedBuffer buf = TakeBuffer();
  std::memset(buf.data(), 0, buf.size());
  uint8_t* p = Insert(offset, std::move(buf));
  lru_.front().dirty = true;
  ++dirty_;
  return p;
}

void MetadataCache::Drop(uint64_t offset) {
  auto it = map_.find(offset);
  if (it == map_.end()) return;
  if (it->second->dirty) --dirty_;
  lru_.erase(it->second);
  map_.erase(it);
}

void MetadataCache::DropAll() {
  assert(dirty_ == 0 && loading_.empty());
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
    Status s = co_await file_->WriteAt(e->data.span(), e->offset);
    if (!s.ok()) {
      co_return s.WithContext(fmt::format("Could not write {} at offset {:#x}", what_, e->offset));
    }
    e->dirty = false;
    --dirty_;
  }
  co_return Status::Ok();
}

}  // namespace qcow2kit
