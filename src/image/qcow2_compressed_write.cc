// Compressed cluster writes of the qcow2 driver (reference §1.6).
//
// Streams are packed byte by byte into host clusters, as QEMU packs them: a stream starts
// where the previous one ended and may run on into the next host cluster when that one is
// the next free cluster. Every host cluster a stream's sectors touch holds one reference for
// that stream. The cluster being filled is kept in memory (pack_) and written when it is full
// and at every flush; its streams' L2 entries reach the disk only after that (WriteTables
// writes the pack before it syncs and writes L2 slices), so DESIGN.md's rule 1 holds.
#include "fmt/format.h"
#include "format/compression.h"
#include "image/qcow2_image.h"

namespace qcow2kit {

Result<size_t> Qcow2Image::CompressCluster(std::span<const std::byte> cluster,
                                           std::span<std::byte> out) const {
  const uint64_t cs = geometry_.cluster_size();
  if (geometry_.has_data_file) {
    return Status::Unsupported("compressed clusters are not possible with an external data file");
  }
  if (cluster.size() != cs) {
    return Status::Invalid(
        fmt::format("a compressed cluster takes {} bytes, not {}", cs, cluster.size()));
  }
  // QEMU stores a stream only if it is shorter than the cluster.
  const size_t room = std::min<size_t>(out.size(), cs - 1);
  return format::CompressCluster(parsed_.header.compression_type,
                                 {reinterpret_cast<const uint8_t*>(cluster.data()), cluster.size()},
                                 {reinterpret_cast<uint8_t*>(out.data()), room});
}

Task<Status> Qcow2Image::WritePack() {
  if (pack_host_ == Extent::kNoHost || pack_written_ == pack_used_) co_return Status::Ok();
  // Whole sectors: a later stream in the same sector rewrites it with the same leading bytes.
  const uint64_t from = pack_written_ & ~511ull;
  const uint64_t to = std::min<uint64_t>((pack_used_ + 511) & ~511ull, pack_.size());
  QK_CO_RETURN_IF_ERROR(CheckOverlap(pack_host_ + from, to - from, 0));
  QK_CO_RETURN_IF_ERROR(
      co_await file_->WriteAt(pack_.span().subspan(from, to - from), pack_host_ + from));
  pack_written_ = pack_used_;
  co_return Status::Ok();
}

std::pair<uint64_t, std::vector<std::byte>> Qcow2Image::PackedBytes(uint64_t host,
                                                                    uint64_t length) const {
  if (pack_host_ == Extent::kNoHost) return {};
  const uint64_t lo = std::max(host, pack_host_);
  const uint64_t hi = std::min(host + length, pack_host_ + pack_used_);
  if (lo >= hi) return {};
  const std::byte* p = pack_.data() + (lo - pack_host_);
  return {lo - host, std::vector<std::byte>(p, p + (hi - lo))};
}

Task<Status> Qcow2Image::WriteCompressed(uint64_t guest_offset, std::span<const std::byte> stream) {
  const uint64_t cs = geometry_.cluster_size();
  if (geometry_.has_data_file) {
    co_return Status::Unsupported(
        "compressed clusters are not possible with an external data file");
  }
  if (guest_offset % cs != 0 || guest_offset >= size()) {
    co_return Status::Invalid(
        fmt::format("compressed write at {:#x}: not the start of a cluster", guest_offset));
  }
  if (stream.empty() || stream.size() >= cs) {
    co_return Status::Invalid(
        fmt::format("a compressed stream of {} bytes for {}-byte clusters", stream.size(), cs));
  }
  auto guard = co_await meta_lock_.Lock();
  QK_CO_RETURN_IF_ERROR(RefuseIfCorrupt());
  if (pack_.size() != cs) pack_.Resize(cs);
  decompressed_host_ = Extent::kNoHost;  // host offsets of freed streams may come back

  // The L2 table first (allocated now if missing), as QEMU does: then the packed clusters
  // are the last thing in the file and it ends at the last stream's sector.
  auto l2 = co_await L2SliceForUpdate(guest_offset);
  if (!l2.ok()) co_return l2.status();

  // Place the stream: after the last one in the pack cluster, else at the start of a fresh one.
  // A fresh cluster's refcount of 1 from AllocateClusters is this stream's reference.
  bool fresh = false;
  if (pack_host_ != Extent::kNoHost && pack_used_ < cs) {
    // A cluster whose refcount is at its maximum takes no more streams (refcount_bits=1:
    // one stream per cluster), as in QEMU.
    QK_CO_ASSIGN_OR_RETURN(uint64_t refs, co_await Refcount(pack_host_));
    if (refs >= refcount_geometry_.max_refcount()) {
      QK_CO_RETURN_IF_ERROR(co_await WritePack());
      pack_host_ = Extent::kNoHost;
    }
  }
  if (pack_host_ == Extent::kNoHost || pack_used_ == cs) {
    QK_CO_ASSIGN_OR_RETURN(pack_host_, co_await AllocateClusters(1));
    pack_used_ = pack_written_ = 0;
    std::memset(pack_.data(), 0, cs);  // the tail of the last sector is written too
    fresh = true;
  }
  uint64_t host = pack_host_ + pack_used_;
  const uint64_t first_part = std::min<uint64_t>(stream.size(), cs - pack_used_);
  if (first_part == stream.size()) {
    if (!fresh) QK_CO_RETURN_IF_ERROR(co_await UpdateRefcounts(pack_host_, cs, +1));
    std::memcpy(pack_.data() + pack_used_, stream.data(), stream.size());
    pack_used_ += stream.size();
  } else {
    // It runs past this cluster: on into the next one if that is the next free cluster, else
    // from the start of whatever free cluster comes next.
    QK_CO_ASSIGN_OR_RETURN(uint64_t next, co_await AllocateClusters(1));
    if (next == pack_host_ + cs) {
      QK_CO_RETURN_IF_ERROR(co_await UpdateRefcounts(pack_host_, cs, +1));
      std::memcpy(pack_.data() + pack_used_, stream.data(), first_part);
      pack_used_ = cs;
      QK_CO_RETURN_IF_ERROR(co_await WritePack());
      std::memset(pack_.data(), 0, cs);
      std::memcpy(pack_.data(), stream.data() + first_part, stream.size() - first_part);
    } else {
      QK_CO_RETURN_IF_ERROR(co_await WritePack());
      host = next;
      std::memset(pack_.data(), 0, cs);
      std::memcpy(pack_.data(), stream.data(), stream.size());
    }
    pack_host_ = next;
    pack_used_ = host == next ? stream.size() : stream.size() - first_part;
    pack_written_ = 0;
  }
  if (pack_used_ == cs) QK_CO_RETURN_IF_ERROR(co_await WritePack());

  MappingUpdate u;
  u.guest_offset = guest_offset;
  u.length = std::min(cs, size() - guest_offset);
  u.kind = MappingUpdate::Kind::kCompressed;
  u.host_offset = host;
  u.compressed_length = stream.size();
  QK_CO_RETURN_IF_ERROR(co_await CommitCluster(u, guest_offset));
  co_return co_await WriteBackIfCachesFull();
}

}  // namespace qcow2kit
