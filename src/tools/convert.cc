// The copy engine of `convert` (see convert.h). Its decisions follow qemu-img 7.2's
// convert_iteration_sectors / convert_co_write so that targets map the same way:
//  - the sources are walked in status runs (data, zero, or left to the target's backing
//    file), each run's end pulled back to the source's cluster grid;
//  - data runs are read in chunks of at most buffer_bytes; zero runs are skipped when the
//    target reads zeros, else written as zeros (unmapping where possible);
//  - inside data, zero runs of at least min_sparse bytes are not written;
//  - with compression every chunk is whole clusters; an all-zero cluster is not written.
// Chunks are handed out in order by one planner; `requests` tasks read, compress and write
// them concurrently, and a sequencer makes writes go out in order unless in_order is false.
#include "tools/convert.h"

#include <algorithm>
#include <coroutine>
#include <map>
#include <vector>

#include "fmt/format.h"
#include "qcow2kit/async_mutex.h"
#include "qcow2kit/buffer.h"
#include "qcow2kit/reactor.h"
#include "tools/first_unreadable.h"

namespace qcow2kit::tools {
namespace {

constexpr uint64_t kSector = 512;
constexpr uint64_t kStatusWindow = 64 << 20;

enum class RunKind { kData, kZero, kBacking };

// A sector-aligned piece of the concatenated sources and what to do with it.
struct Chunk {
  uint64_t pos = 0;
  uint64_t length = 0;
  RunKind kind = RunKind::kData;
};

// Zero detection as qemu-img does it, in 512-byte sectors. Returns whether the run starting at
// `buf` is data and stores its length in *run. A run that ends off the `alignment` grid
// (counted from target sector `sector`) is moved onto it: data runs grow to the next grid
// line, zero runs shrink to the previous one, and a zero run shorter than that is data.
bool SectorRun(const std::byte* buf, uint64_t sectors, uint64_t sector, uint64_t alignment,
               uint64_t* run) {
  const bool zero = IsAllZero({buf, kSector});
  uint64_t i = 1;
  while (i < sectors && IsAllZero({buf + i * kSector, kSector}) == zero) ++i;
  if (i == sectors) {
    *run = i;
    return !zero;
  }
  bool data = !zero;
  const uint64_t tail = (sector + i) & (alignment - 1);
  if (tail != 0) {
    if (!data && i <= tail) data = true;
    if (data) {
      i = std::min(i + alignment - tail, sectors);
    } else {
      i -= tail;
    }
  }
  *run = i;
  return data;
}

// Like SectorRun, but a data run swallows the zero runs inside it shorter than `min` sectors,
// so that small holes do not split writes. Returns false only for a leading zero run.
bool DataRunMin(const std::byte* buf, uint64_t sectors, uint64_t sector, uint64_t alignment,
                uint64_t min, uint64_t* run) {
  min = std::min(min, sectors);
  uint64_t n = 0;
  if (!SectorRun(buf, sectors, sector, alignment, &n)) {
    *run = n;
    return false;
  }
  uint64_t used = n;
  uint64_t checked = n;
  while (checked < sectors) {
    const bool data =
        SectorRun(buf + checked * kSector, sectors - checked, sector + checked, alignment, &n);
    checked += n;
    if (data) {
      used = checked;
    } else if (n >= min) {
      break;
    }
  }
  *run = used;
  return true;
}

class Converter {
 public:
  Converter(std::span<BlockDevice* const> sources, BlockDevice& target, const ConvertOptions& o)
      : sources_(sources.begin(), sources.end()), target_(target), o_(o) {
    uint64_t at = 0;
    for (BlockDevice* s : sources_) {
      starts_.push_back(at);
      at += (s->size() + kSector - 1) / kSector * kSector;
      // Status runs end on the source's clusters (a raw source: sectors).
      const bool qcow2 = std::string(s->top().format_name()) == "qcow2";
      grid_.push_back(qcow2 ? std::max<uint64_t>(kSector, s->top().cluster_size()) : kSector);
    }
    total_ = at;
    cluster_ = target_.top().cluster_size();
    buffer_ = o_.buffer_bytes;
    if (o_.compressed) buffer_ = std::max(buffer_, cluster_) / cluster_ * cluster_;
  }

  Task<Status> Run() {
    if (o_.min_sparse % kSector != 0) {
      co_return Status::Invalid("the zero detection granularity must be a multiple of 512");
    }
    if (o_.progress) {
      // A first walk counts the bytes to copy, as qemu-img does for its percentages.
      while (pos_ < total_) {
        auto c = co_await Plan();
        if (!c.ok()) co_return c.status();
        if (Counts(*c)) to_copy_ += c->length;
      }
      pos_ = 0;
      status_end_ = 0;
    }
    const unsigned tasks = std::max(1u, o_.requests);
    for (unsigned i = 0; i < tasks; ++i) Reactor::Current()->Spawn(Work());
    struct Wait {
      Converter* c;
      bool await_ready() const noexcept { return c->running_ == 0; }
      void await_suspend(std::coroutine_handle<> h) { c->finished_ = h; }
      void await_resume() const noexcept {}
    };
    co_await Wait{this};
    co_return error_;
  }

 private:
  bool Counts(const Chunk& c) const {
    return c.kind == RunKind::kData || (o_.min_sparse == 0 && c.kind == RunKind::kZero);
  }

  size_t PartAt(uint64_t pos) const {
    return std::upper_bound(starts_.begin(), starts_.end(), pos) - starts_.begin() - 1;
  }

  // The next chunk at pos_, and pos_ moved past it. Callers hold plan_mu_.
  Task<Result<Chunk>> Plan() {
    const uint64_t pos = pos_;
    const size_t part = PartAt(pos);
    BlockDevice& src = *sources_[part];
    const uint64_t local = pos - starts_[part];
    const uint64_t part_end = part + 1 < starts_.size() ? starts_[part + 1] : total_;
    uint64_t n = total_ - pos;
    bool past_backing = false;
    if (o_.target_backing_size) {
      const uint64_t b = (*o_.target_backing_size + kSector - 1) / kSector * kSector;
      if (pos >= b) {
        past_backing = true;
      } else {
        n = std::min(n, b - pos);  // zeros are handled differently from there on
      }
    }
    if (status_end_ <= pos) {
      uint64_t count = kSector;
      RunKind kind = RunKind::kData;
      std::vector<BlockStatusExtent> runs;
      // Only the first run is used: a bounded window keeps each query cheap (the next one
      // starts where this run ends).
      const uint64_t want = std::min({n, part_end - pos, kStatusWindow});
      Status s = co_await src.BlockStatus(local, std::min(want, src.size() - local), &runs);
      if (s.ok() && runs.empty()) s = Status::IoError("no block status returned");
      if (!s.ok()) {
        if (!o_.salvage) {
          co_return Status::Error(s.code(), fmt::format("error while reading block status at "
                                                        "offset {}: {}",
                                                        local, s.message()));
        }
        Warn(fmt::format("error while reading block status at offset {}: {}", local, s.message()));
      } else {
        const BlockStatusExtent& e = runs.front();
        count = e.length;
        // An odd-sized source's last sector is read zero-padded, part of the last run.
        if (local + count >= src.size()) count = part_end - pos;
        count = (count + kSector - 1) / kSector * kSector;
        const bool top_only = o_.target_has_backing && src.top().backing() != nullptr;
        if (top_only && !(e.present && e.depth == 0)) {
          kind = RunKind::kBacking;
        } else {
          kind = e.zero ? RunKind::kZero : RunKind::kData;
        }
      }
      // The next status query starts on the source's cluster grid.
      const uint64_t tail = (local + count) % grid_[part];
      if (count > tail) count -= tail;
      if (kind == RunKind::kZero && past_backing) kind = RunKind::kBacking;
      status_ = kind;
      status_end_ = pos + count;
    }
    n = std::min(n, status_end_ - pos);
    if (status_ == RunKind::kData) n = std::min(n, buffer_);
    if (o_.compressed) {
      // Compressed clusters are written whole: a run shorter than a cluster makes the whole
      // cluster data.
      if (n < cluster_) {
        n = std::min(cluster_, total_ - pos);
        status_ = RunKind::kData;
      } else {
        n = n / cluster_ * cluster_;
      }
    }
    Chunk c{pos, n, status_};
    if (o_.min_sparse == 0 && c.kind == RunKind::kZero) c.length = std::min(c.length, buffer_);
    pos_ += c.length;
    co_return c;
  }

  Task<void> Work() {
    ++running_;
    AlignedBuffer buf(buffer_);
    AlignedBuffer packed(o_.compressed ? buffer_ : 0);
    std::vector<size_t> streams;
    while (error_.ok()) {
      Chunk c;
      {
        auto guard = co_await plan_mu_.Lock();
        if (pos_ >= total_ || !error_.ok()) break;
        auto planned = co_await Plan();
        if (!planned.ok()) {
          SetError(planned.status());
          break;
        }
        c = *planned;
      }
      const bool counts = Counts(c);
      if (c.kind == RunKind::kData) {
        Status s = co_await ReadChunk(c, buf);
        if (!s.ok()) SetError(s);
      } else if (o_.min_sparse == 0 && c.kind == RunKind::kZero) {
        std::memset(buf.data(), 0, c.length);
        c.kind = RunKind::kData;
      }
      if (error_.ok() && o_.compressed && c.kind == RunKind::kData) {
        if (o_.compress_pool) {
          co_await o_.compress_pool->Run([&] { Compress(c, buf, packed, &streams); });
        } else {
          Compress(c, buf, packed, &streams);
        }
      }
      if (o_.in_order) co_await WaitTurn(c.pos);
      if (error_.ok()) {
        Status s = co_await WriteChunk(c, buf, packed, streams);
        if (!s.ok()) {
          SetError(Status::Error(
              s.code(), fmt::format("error while writing at byte {}: {}", c.pos, s.message())));
        }
      }
      if (o_.in_order) Advance(c.pos + c.length);
      if (counts && o_.progress && error_.ok()) {
        done_ += c.length;
        o_.progress(to_copy_ ? 100.0 * double(done_) / double(to_copy_) : 100.0);
      }
    }
    if (--running_ == 0 && finished_) Reactor::Current()->Post(finished_);
  }

  // Reads [c.pos, c.pos + c.length) of the concatenated sources into `buf`.
  Task<Status> ReadChunk(const Chunk& c, AlignedBuffer& buf) {
    uint64_t done = 0;
    while (done < c.length) {
      const uint64_t pos = c.pos + done;
      const size_t part = PartAt(pos);
      BlockDevice& src = *sources_[part];
      const uint64_t local = pos - starts_[part];
      const uint64_t part_end = part + 1 < starts_.size() ? starts_[part + 1] : total_;
      const uint64_t n = std::min(c.length - done, part_end - pos);
      const uint64_t real = local < src.size() ? std::min(n, src.size() - local) : 0;
      auto out = buf.span().subspan(done, n);
      std::memset(out.data() + real, 0, n - real);  // an odd-sized source's padding
      if (real > 0) QK_CO_RETURN_IF_ERROR(co_await ReadSource(src, local, out.first(real)));
      done += n;
    }
    co_return Status::Ok();
  }

  Task<Status> ReadSource(BlockDevice& src, uint64_t offset, std::span<std::byte> out) {
    Status s = co_await src.Read(offset, out);
    if (s.ok()) co_return s;
    if (!o_.salvage) {
      auto [at, why] = co_await FirstUnreadable(src, offset, out, std::move(s));
      co_return Status::Error(why.code(),
                              fmt::format("error while reading at byte {}: {}", at, why.message()));
    }
    // Sector by sector: what still fails reads as zeros.
    for (uint64_t at = 0; at < out.size(); at += kSector) {
      auto sector = out.subspan(at, std::min<uint64_t>(kSector, out.size() - at));
      Status one = co_await src.Read(offset + at, sector);
      if (!one.ok()) {
        Warn(fmt::format("error while reading offset {}: {}", offset + at, one.message()));
        std::memset(sector.data(), 0, sector.size());
      }
    }
    co_return Status::Ok();
  }

  // Compresses each cluster of a data chunk into `packed` (a cluster's room per cluster).
  // streams[i]: the stream's length, 0 to store the cluster plain, kZeroCluster to skip it.
  static constexpr size_t kZeroCluster = SIZE_MAX;
  void Compress(const Chunk& c, AlignedBuffer& buf, AlignedBuffer& packed,
                std::vector<size_t>* streams) {
    const uint64_t clusters = (c.length + cluster_ - 1) / cluster_;
    // The image's short last cluster is compressed zero-padded.
    std::memset(buf.data() + c.length, 0, clusters * cluster_ - c.length);
    streams->assign(clusters, 0);
    for (uint64_t i = 0; i < clusters; ++i) {
      auto in = buf.span().subspan(i * cluster_, cluster_);
      if (o_.min_sparse != 0 && IsAllZero(in)) {
        (*streams)[i] = kZeroCluster;
        continue;
      }
      auto n = target_.top().CompressCluster(in, packed.span().subspan(i * cluster_, cluster_));
      // A failure to compress (only out of memory) stores the cluster plain.
      (*streams)[i] = n.ok() ? *n : 0;
    }
  }

  Task<Status> WriteChunk(const Chunk& c, AlignedBuffer& buf, AlignedBuffer& packed,
                          const std::vector<size_t>& streams) {
    switch (c.kind) {
      case RunKind::kBacking:
        co_return Status::Ok();
      case RunKind::kZero:
        co_return co_await WriteZeros(c.pos, c.length);
      case RunKind::kData:
        break;
    }
    if (o_.compressed) {
      for (uint64_t i = 0; i < streams.size(); ++i) {
        const uint64_t at = c.pos + i * cluster_;
        const uint64_t len = std::min(cluster_, c.pos + c.length - at);
        if (streams[i] == kZeroCluster) {
          QK_CO_RETURN_IF_ERROR(co_await WriteZeros(at, len));
          continue;
        }
        QK_CO_RETURN_IF_ERROR(co_await target_.WriteCompressedCluster(
            at, buf.span().subspan(i * cluster_, len),
            packed.span().subspan(i * cluster_, streams[i])));
      }
      co_return Status::Ok();
    }
    const uint64_t sectors = c.length / kSector;
    for (uint64_t done = 0; done < sectors;) {
      uint64_t n = sectors - done;
      const std::byte* p = buf.data() + done * kSector;
      const uint64_t at = c.pos + done * kSector;
      if (o_.min_sparse == 0 ||
          DataRunMin(p, n, at / kSector, o_.alignment / kSector, o_.min_sparse / kSector, &n)) {
        QK_CO_RETURN_IF_ERROR(co_await target_.Write(at, {p, n * kSector}));
      } else {
        QK_CO_RETURN_IF_ERROR(co_await WriteZeros(at, n * kSector));
      }
      done += n;
    }
    co_return Status::Ok();
  }

  Task<Status> WriteZeros(uint64_t at, uint64_t length) {
    if (o_.target_reads_zeros) co_return Status::Ok();
    co_return co_await target_.WriteZeroes(at, length, /*may_unmap=*/true);
  }

  // -- in-order writes --
  struct TurnAwaiter {
    Converter* c;
    uint64_t pos;
    bool await_ready() const noexcept { return c->written_to_ == pos || !c->error_.ok(); }
    void await_suspend(std::coroutine_handle<> h) { c->waiting_[pos] = h; }
    void await_resume() const noexcept {}
  };
  TurnAwaiter WaitTurn(uint64_t pos) { return TurnAwaiter{this, pos}; }
  void Advance(uint64_t to) {
    written_to_ = to;
    if (auto it = waiting_.find(to); it != waiting_.end()) {
      Reactor::Current()->Post(it->second);
      waiting_.erase(it);
    }
  }

  void SetError(Status s) {
    if (!error_.ok()) return;
    error_ = std::move(s);
    for (auto& [pos, h] : waiting_) Reactor::Current()->Post(h);
    waiting_.clear();
  }

  void Warn(const std::string& message) {
    if (o_.warn) o_.warn(message);
  }

  std::vector<BlockDevice*> sources_;
  std::vector<uint64_t> starts_;  // of each source in the concatenation
  std::vector<uint64_t> grid_;    // each source's cluster size (status runs end on it)
  BlockDevice& target_;
  const ConvertOptions& o_;
  uint64_t total_ = 0;
  uint64_t cluster_ = 0;  // the target's
  uint64_t buffer_ = 0;

  AsyncMutex plan_mu_;
  uint64_t pos_ = 0;  // next byte to plan
  RunKind status_ = RunKind::kData;
  uint64_t status_end_ = 0;  // the current status run covers [.., status_end_)

  uint64_t written_to_ = 0;  // in order: everything before this is written
  std::map<uint64_t, std::coroutine_handle<>> waiting_;  // chunk start -> its writer

  Status error_;
  unsigned running_ = 0;
  std::coroutine_handle<> finished_;
  uint64_t to_copy_ = 0;
  uint64_t done_ = 0;
};

}  // namespace

uint64_t ConcatenatedSize(std::span<BlockDevice* const> sources) {
  uint64_t total = 0;
  for (BlockDevice* s : sources) total += (s->size() + kSector - 1) / kSector * kSector;
  return total;
}

Task<Status> Convert(std::span<BlockDevice* const> sources, BlockDevice& target,
                     const ConvertOptions& options) {
  if (sources.empty()) co_return Status::Invalid("no source to convert");
  const uint64_t total = ConcatenatedSize(sources);
  if (target.size() < total) co_return Status::Invalid("output file is smaller than input file");
  if (total == 0) co_return Status::Ok();
  if ((options.alignment & (options.alignment - 1)) != 0 || options.alignment < kSector) {
    co_return Status::Invalid("the zero detection alignment must be a power of two >= 512");
  }
  Converter c(sources, target, options);
  co_return co_await c.Run();
}

}  // namespace qcow2kit::tools
