// check, second half: the counted references against the refcounts on disk (with the
// repairs of -r), and the audit of the COPIED flags of the active tables (qemu's
// compare_refcounts and check_oflag_copied). See qcow2_check.h.
#include <algorithm>
#include <cstring>

#include "fmt/format.h"
#include "format/endian.h"
#include "image/qcow2_check.h"
#include "image/qcow2_check_walk.h"
#include "image/qcow2_image.h"

namespace qcow2kit {

using check_detail::ErrnoText;
using check_detail::L2Tables;
using check_detail::ReadDepth;

Task<Result<uint64_t>> Qcow2Checker::DiskRefcount(uint64_t host_offset) {
  const uint64_t c = host_offset >> img_.geometry_.cluster_bits;
  if (!refs_match_disk_ || c >= refs_.clusters()) {
    co_return co_await img_.Refcount(host_offset);  // past the end of what was compared
  }
  const uint64_t per_block = img_.refcount_geometry_.block_entries();
  const uint64_t t = c / per_block;
  if (t < unreadable_blocks_.size() && unreadable_blocks_[t]) {
    co_return Status::IoError("unreadable refcount block");
  }
  auto it = differing_blocks_.find(t);
  if (it == differing_blocks_.end()) co_return refs_.Get(c);
  co_return format::GetRefcount(it->second, c % per_block, img_.refcount_geometry_.refcount_order);
}

Task<Status> Qcow2Checker::CompareRefcounts(CheckResult& res, unsigned fix, bool* rebuild,
                                            uint64_t* highest) {
  const auto& rg = img_.refcount_geometry_;
  const uint64_t cs = img_.geometry_.cluster_size();
  const uint64_t per_block = rg.block_entries();
  const uint64_t clusters = refs_.clusters();
  const uint64_t blocks = (clusters + per_block - 1) / per_block;
  // The on-disk blocks that cover the clusters, read ahead in order.
  uint64_t next_block = 0;
  ReadAhead ahead(
      img_.file_.get(),
      [&, this](ByteRange* r) {
        for (; next_block < blocks && next_block < img_.reftable_.size(); ++next_block) {
          const uint64_t b = img_.reftable_[next_block] & format::kRefcountTableOffsetMask;
          if (b != 0 && (b & (cs - 1)) == 0) {
            *r = {b, cs};
            ++next_block;
            return true;
          }
        }
        return false;
      },
      ReadDepth(cs));
  *highest = 0;
  differing_blocks_.clear();
  unreadable_blocks_.assign(blocks, false);
  refs_match_disk_ = true;
  for (uint64_t t = 0; t < blocks; ++t) {
    const uint64_t first = t * per_block;
    const uint64_t end = std::min(clusters, first + per_block);
    const uint64_t b =
        t < img_.reftable_.size() ? img_.reftable_[t] & format::kRefcountTableOffsetMask : 0;
    std::span<const uint8_t> disk;
    if (b != 0 && (b & (cs - 1)) == 0) {
      auto got = co_await ahead.Next();
      if (!got.ok()) {
        for (uint64_t c = first; c < end; ++c) {
          Log(fmt::format("Can't get refcount for cluster {}: {}", c, ErrnoText(got.status())));
          ++res.check_errors;
        }
        unreadable_blocks_[t] = true;
        continue;
      }
      disk = *got;
    } else if (b != 0) {
      // QEMU refuses to read an unaligned refcount block.
      for (uint64_t c = first; c < end; ++c) {
        Log(fmt::format("Can't get refcount for cluster {}: {}", c, std::strerror(EIO)));
        ++res.check_errors;
      }
      unreadable_blocks_[t] = true;
      continue;
    }
    std::span<const uint8_t> mine = refs_.Block(t);
    if (end == first + per_block && !disk.empty() &&
        std::memcmp(disk.data(), mine.data(), cs) == 0) {
      // Identical block: only the highest cluster in use matters.
      for (uint64_t c = end; c > first; --c) {
        if (refs_.Get(c - 1)) {
          *highest = std::max(*highest, c - 1);
          break;
        }
      }
      continue;
    }
    // This block differs: remember what is on disk (after the repairs below).
    std::vector<uint8_t>& kept = differing_blocks_[t];
    kept.assign(cs, 0);
    if (!disk.empty()) std::copy(disk.begin(), disk.end(), kept.begin());
    for (uint64_t c = first; c < end; ++c) {
      const uint64_t on_disk =
          disk.empty() ? 0 : format::GetRefcount(disk, c - first, rg.refcount_order);
      const uint64_t counted = refs_.Get(c);
      if (on_disk > 0 || counted > 0) *highest = c;
      if (on_disk == counted) continue;
      uint64_t* fixed = nullptr;
      if (on_disk == 0) {
        *rebuild = true;
      } else if (on_disk > counted && (fix & kFixLeaks)) {
        fixed = &res.leaks_fixed;
      } else if (on_disk < counted && (fix & kFixErrors)) {
        fixed = &res.corruptions_fixed;
      }
      Log(fmt::format("{} cluster {} refcount={} reference={}",
                      fixed               ? "Repairing"
                      : on_disk < counted ? "ERROR"
                                          : "Leaked",
                      c, on_disk, counted));
      if (fixed) {
        Status s =
            co_await img_.UpdateRefcounts(c * cs, cs, static_cast<int64_t>(counted - on_disk));
        if (s.ok()) {
          ++*fixed;
          format::SetRefcount(kept, c - first, rg.refcount_order, counted);
          continue;
        }
      }
      ++(on_disk < counted ? res.corruptions : res.leaks);
    }
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Checker::CheckCopied(CheckResult& res, unsigned fix) {
  // With -r leaks only, COPIED flags are repaired when the refcounts are now known good.
  const bool repair = (fix & kFixErrors) ||
                      ((fix & kFixLeaks) && !res.check_errors && !res.corruptions && !res.leaks);
  const format::Geometry& g = img_.geometry_;
  const uint64_t cs = g.cluster_size();
  ReadAhead reads(img_.file_.get(), L2Tables(img_.l1_, cs, true), ReadDepth(cs));
  for (uint64_t i = 0; i < img_.l1_.size(); ++i) {
    const uint64_t l1e = img_.l1_[i];
    const uint64_t l2_offset = format::L1EntryOffset(l1e);
    if (!l2_offset) continue;
    auto rc = co_await DiskRefcount(l2_offset);
    if (rc.ok() && (*rc == 1) != ((l1e & format::kOflagCopied) != 0)) {
      ++res.corruptions;
      Log(fmt::format("{} OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} refcount={}",
                      repair ? "Repairing" : "ERROR", i, l1e, *rc));
      if (repair) {
        img_.l1_[i] = *rc == 1 ? l1e | format::kOflagCopied : l1e & ~format::kOflagCopied;
        uint8_t b[8];
        format::StoreBE64(b, img_.l1_[i]);
        Status s = co_await img_.WriteHeaderBytes(img_.parsed_.header.l1_table_offset + i * 8, b);
        if (s.ok()) s = co_await img_.SyncFiles();
        if (!s.ok()) {
          ++res.check_errors;
          co_return s;
        }
        --res.corruptions;
        ++res.corruptions_fixed;
      }
    }
    auto table = co_await reads.Next();
    if (!table.ok()) {
      Log(fmt::format("ERROR: Could not read L2 table: {}", ErrnoText(table.status())));
      ++res.check_errors;
      co_return table.status();
    }
    uint8_t* t = table->data();
    uint64_t dirty = 0;
    for (uint64_t j = 0; j < g.l2_entries(); ++j) {
      uint8_t* p = t + j * g.l2_entry_bytes();
      const uint64_t entry = format::LoadBE64(p);
      const format::ClusterType type = format::ClassifyCluster(entry, g);
      if (type != format::ClusterType::kNormal && type != format::ClusterType::kZeroAlloc) {
        continue;
      }
      uint64_t refcount = 1;
      if (!g.has_data_file) {
        auto r = co_await DiskRefcount(format::L2EntryOffset(entry));
        if (!r.ok()) continue;  // reported by the comparison already
        refcount = *r;
      }
      if ((refcount == 1) == ((entry & format::kOflagCopied) != 0)) continue;
      ++res.corruptions;
      Log(fmt::format("{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}",
                      repair ? "Repairing" : "ERROR", entry, refcount));
      if (repair) {
        format::StoreBE64(
            p, refcount == 1 ? entry | format::kOflagCopied : entry & ~format::kOflagCopied);
        ++dirty;
      }
    }
    if (dirty) {
      Status guard = img_.CheckOverlap(l2_offset, cs, MetadataMap::Bit(MetadataMap::kActiveL2));
      if (!guard.ok()) {
        Log(fmt::format("ERROR: Could not write L2 table; metadata overlap check failed: {}",
                        ErrnoText(guard)));
        ++res.check_errors;
        co_return co_await img_.MarkCorruptIfNeeded(guard);
      }
      Status s = co_await img_.file_->WriteAt(std::as_bytes(std::span(t, cs)), l2_offset);
      for (uint64_t o = 0; o < cs; o += img_.slice_bytes_) img_.l2_cache_->Drop(l2_offset + o);
      if (!s.ok()) {
        Log(fmt::format("ERROR: Could not write L2 table: {}", ErrnoText(s)));
        ++res.check_errors;
        co_return s;
      }
      res.corruptions -= dirty;
      res.corruptions_fixed += dirty;
    }
  }
  co_return Status::Ok();
}

}  // namespace qcow2kit
