#include "testing/crash_model.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>

namespace qcow2kit::testing {

uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

const char* KindName(GuestOp::Kind k) {
  switch (k) {
    case GuestOp::Kind::kWrite:
      return "write";
    case GuestOp::Kind::kZeroes:
      return "write-zeroes";
    case GuestOp::Kind::kDiscard:
      return "discard";
    case GuestOp::Kind::kFlush:
      return "flush";
    case GuestOp::Kind::kClose:
      return "close";
    case GuestOp::Kind::kGrow:
      return "grow";
  }
  return "?";
}

std::string Describe(const GuestOp& op) {
  char b[160];
  std::snprintf(b, sizeof b, "%s [%#llx, +%#llx)%s%s events %zu..%zu", KindName(op.kind),
                static_cast<unsigned long long>(op.offset),
                static_cast<unsigned long long>(op.length), op.may_unmap ? " unmap" : "",
                op.fua ? " fua" : "", op.start_event, op.end_event);
  return b;
}

void FillPattern(uint64_t tag, uint64_t pos, uint64_t len, uint8_t* out) {
  const uint64_t end = pos + len;
  while (pos < end) {
    const uint64_t base = pos & ~uint64_t{7};
    // Compressible tags repeat each word over 512 bytes.
    const uint64_t unit = (tag & kCompressibleTag) ? pos >> 9 : pos >> 3;
    const uint64_t word = Mix(tag ^ (unit * 0x9e3779b97f4a7c15ull));
    uint8_t bytes[8];
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(word >> (i * 8));
    const uint64_t stop = std::min(end, base + 8);
    std::memcpy(out, bytes + (pos - base), stop - pos);
    out += stop - pos;
    pos = stop;
  }
}

// The guest range whose content `op` sets: [*lo, *hi), empty if none.
static void RangeOf(const GuestOp& op, uint64_t* lo, uint64_t* hi) {
  *lo = *hi = 0;
  if (op.kind == GuestOp::Kind::kWrite || op.kind == GuestOp::Kind::kZeroes) {
    *lo = op.offset;
    *hi = op.offset + op.length;
  } else if (op.kind == GuestOp::Kind::kDiscard) {
    *lo = op.effect_offset;
    *hi = op.effect_offset + op.effect.size();
  }
}

// The values `op` gives guest [pos, pos + len), which must lie inside RangeOf(op).
static void ValuesOf(const GuestOp& op, uint64_t pos, uint64_t len, uint8_t* out) {
  switch (op.kind) {
    case GuestOp::Kind::kWrite:
      FillPattern(op.tag, pos, len, out);
      break;
    case GuestOp::Kind::kZeroes:
      std::memset(out, 0, len);
      break;
    case GuestOp::Kind::kDiscard:
      std::memcpy(out, op.effect.data() + (pos - op.effect_offset), len);
      break;
    default:
      break;
  }
}

void ApplyOp(const GuestOp& op, std::vector<uint8_t>* model) {
  if (op.kind == GuestOp::Kind::kGrow) model->resize(op.length, 0);
  uint64_t lo, hi;
  RangeOf(op, &lo, &hi);
  if (lo < hi) ValuesOf(op, lo, hi - lo, model->data() + lo);
}

bool Overlap(const GuestOp& a, const GuestOp& b) {
  auto data = [](const GuestOp& op) {
    return op.kind == GuestOp::Kind::kWrite || op.kind == GuestOp::Kind::kZeroes ||
           op.kind == GuestOp::Kind::kDiscard;
  };
  if (!data(a) || !data(b)) return false;
  return a.offset < b.offset + b.length && b.offset < a.offset + a.length;
}

std::string CheckGuestBytes(const std::vector<uint8_t>& got, std::span<const uint8_t> expect,
                            std::span<const int32_t> owner,
                            const std::vector<const GuestOp*>& candidates, uint64_t* unflushed) {
  if (got.size() != expect.size()) {
    // Only an unflushed grow to exactly this size may have changed it; the grown range reads
    // zeros until written.
    bool grown = false;
    for (const GuestOp* op : candidates) {
      grown |= op->kind == GuestOp::Kind::kGrow && op->length == got.size();
    }
    if (!grown) return "guest size changed to " + std::to_string(got.size());
  }
  auto expected = [&](size_t p) -> uint8_t { return p < expect.size() ? expect[p] : 0; };
  auto owner_of = [&](size_t p) -> int64_t { return p < owner.size() ? owner[p] : -1; };
  // What each candidate overlapping a chunk gives the chunk's bytes.
  struct Candidate {
    const GuestOp* op;
    uint64_t lo, hi;
    std::vector<uint8_t> values;
  };
  std::vector<Candidate> in_chunk;
  constexpr size_t kChunk = 4096;
  for (size_t c = 0; c < got.size(); c += kChunk) {
    const size_t n = std::min(kChunk, got.size() - c);
    if (c + n <= expect.size() && std::memcmp(got.data() + c, expect.data() + c, n) == 0) continue;
    in_chunk.clear();
    for (const GuestOp* op : candidates) {
      uint64_t lo, hi;
      RangeOf(*op, &lo, &hi);
      lo = std::max<uint64_t>(lo, c);
      hi = std::min<uint64_t>(hi, c + n);
      if (lo >= hi) continue;
      Candidate& cand = in_chunk.emplace_back(Candidate{op, lo, hi, {}});
      cand.values.resize(hi - lo);
      ValuesOf(*op, lo, hi - lo, cand.values.data());
    }
    for (size_t p = c; p < c + n; ++p) {
      if (got[p] == expected(p)) continue;
      auto explains = [&](const Candidate& cand) {
        return p >= cand.lo && p < cand.hi && int64_t(cand.op->index) > owner_of(p);
      };
      bool explained = false;
      for (const Candidate& cand : in_chunk) {
        explained |= explains(cand) && cand.values[p - cand.lo] == got[p];
      }
      if (!explained) {
        char b[200];
        std::snprintf(b, sizeof b, "guest byte %#zx reads %u; durable value %u", p, got[p],
                      expected(p));
        std::string covering;
        for (const Candidate& cand : in_chunk) {
          if (!explains(cand)) continue;
          covering += "\n    may be " + std::to_string(cand.values[p - cand.lo]) + " from " +
                      Describe(*cand.op);
        }
        if (covering.empty()) covering = ", not written since";
        if (owner_of(p) >= 0)
          covering = " (operation " + std::to_string(owner_of(p)) + ")" + covering;
        return b + covering;
      }
      ++*unflushed;
    }
  }
  return "";
}

DurabilityModel::DurabilityModel(const std::vector<uint8_t>& initial,
                                 const std::vector<GuestOp>& ops)
    : ops_(ops), expect_(initial), size_(initial.size()), durable_(ops.size(), false) {
  uint64_t largest = initial.size();
  for (const GuestOp& op : ops) {
    if (op.kind == GuestOp::Kind::kGrow) largest = std::max(largest, op.length);
  }
  expect_.resize(largest, 0);
  owner_.assign(largest, -1);
}

void DurabilityModel::MakeDurable(const GuestOp& op) {
  if (op.kind == GuestOp::Kind::kGrow) size_ = std::max(size_, op.length);
  uint64_t lo, hi;
  RangeOf(op, &lo, &hi);
  if (lo >= hi) return;
  std::vector<uint8_t> values(hi - lo);
  ValuesOf(op, lo, hi - lo, values.data());
  // A later operation made durable earlier (a FUA write) keeps its bytes.
  const int32_t index = static_cast<int32_t>(op.index);
  for (uint64_t p = lo; p < hi; ++p) {
    if (owner_[p] > index) continue;
    expect_[p] = values[p - lo];
    owner_[p] = index;
  }
}

void DurabilityModel::AdvanceTo(size_t cut) {
  cut_ = cut;
  // What returned before this sequence number is durable: the issue of the flush issued
  // last of those that returned by the cut.
  uint64_t barrier = 0;
  last_flush_ = nullptr;
  for (const GuestOp& op : ops_) {
    if (op.is_flush() && op.end_event <= cut && op.issue_seq >= barrier) {
      barrier = op.issue_seq;
      last_flush_ = &op;
    }
  }
  candidates_.clear();
  for (const GuestOp& op : ops_) {
    if (!op.changes_data() || durable_[op.index]) continue;
    if (op.done_seq < barrier || (op.fua && op.end_event <= cut)) {
      durable_[op.index] = true;
      MakeDurable(op);
    } else if (op.start_event <= cut) {
      candidates_.push_back(&op);
    }
  }
}

std::string DurabilityModel::Check(const std::vector<uint8_t>& got, uint64_t* unflushed) const {
  return CheckGuestBytes(got, std::span(expect_).first(size_), std::span(owner_).first(size_),
                         candidates_, unflushed);
}

std::vector<GuestOp> MakeOps(uint64_t size, uint64_t cs, int count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto below = [&](uint64_t n) { return n == 0 ? 0 : rng() % n; };
  const uint64_t max_len = std::min<uint64_t>(256 << 10, 32 * cs);
  std::vector<std::pair<uint64_t, uint64_t>> written;
  std::vector<GuestOp> ops;
  for (int i = 0; i < count; ++i) {
    GuestOp op;
    op.tag = rng();
    uint64_t r = below(100);
    if (r < 20) {  // allocating: whole clusters
      op.kind = GuestOp::Kind::kWrite;
      op.offset = below(size / cs) * cs;
      op.length = cs * (1 + below(std::max<uint64_t>(1, max_len / cs)));
    } else if (r < 45) {  // partial clusters: copy-on-write of head and tail
      op.kind = GuestOp::Kind::kWrite;
      op.offset = below(size);
      if (below(2)) op.offset = AlignDown(op.offset, 512);
      op.length = 1 + below(std::min(max_len, 3 * cs));
    } else if (r < 60 && !written.empty()) {  // inside an earlier write: in place
      auto [o, l] = written[below(written.size())];
      op.kind = GuestOp::Kind::kWrite;
      op.offset = o + below(l);
      op.length = 1 + below(o + l - op.offset);
    } else if (r < 70) {
      op.kind = GuestOp::Kind::kZeroes;
      op.offset = below(2) ? below(size) : below(size / cs) * cs;
      op.length = 1 + below(4 * cs);
      op.may_unmap = below(2);
    } else if (r < 80) {
      op.kind = GuestOp::Kind::kDiscard;
      op.offset = below(2) ? below(size) : below(size / cs) * cs;
      op.length = 1 + below(max_len);
    } else {
      op.kind = GuestOp::Kind::kFlush;
    }
    if (op.kind != GuestOp::Kind::kFlush) {
      op.length = std::min(op.length, size - op.offset);
      if (op.length == 0) {
        op.offset = size - 1;
        op.length = 1;
      }
    }
    if (op.kind == GuestOp::Kind::kWrite) written.emplace_back(op.offset, op.length);
    ops.push_back(op);
  }
  ops.emplace_back().kind = GuestOp::Kind::kClose;
  // FUA from a generator of its own, so that the operations are those of earlier versions.
  std::mt19937_64 fua_rng(seed ^ 0xf0a);
  for (size_t i = 0; i < ops.size(); ++i) {
    GuestOp& op = ops[i];
    op.index = i;
    const bool writes = op.kind == GuestOp::Kind::kWrite || op.kind == GuestOp::Kind::kZeroes;
    op.fua = writes && fua_rng() % 100 < 15;
  }
  // Compressed writes, also from a generator of their own: a third of the writes that cover
  // whole clusters.
  std::mt19937_64 compress_rng(seed ^ 0xc0de);
  for (GuestOp& op : ops) {
    op.tag &= ~kCompressibleTag;
    const bool whole =
        op.offset % cs == 0 && (op.length % cs == 0 || op.offset + op.length == size);
    if (op.kind == GuestOp::Kind::kWrite && whole && compress_rng() % 3 == 0) {
      op.compressed = true;
      op.tag |= kCompressibleTag;
    }
  }
  return ops;
}

}  // namespace qcow2kit::testing
