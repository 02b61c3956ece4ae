// Compressed writes of the block layer: whole clusters, compressed here (or by the caller on
// another thread) and handed to the driver, which packs the streams into host clusters.
#include "fmt/format.h"
#include "qcow2kit/block.h"
#include "qcow2kit/buffer.h"

namespace qcow2kit {

Task<Status> BlockDevice::WriteCompressed(uint64_t offset, std::span<const std::byte> buf) {
  const uint64_t cs = top_->cluster_size();
  if (offset > size() || buf.size() > size() - offset) {
    co_return Status::Invalid("compressed write past the end of the image");
  }
  if (offset % cs != 0 || (buf.size() % cs != 0 && offset + buf.size() != size())) {
    co_return Status::Invalid(
        fmt::format("compressed writes cover whole {}-byte clusters: {:#x}+{:#x} does not", cs,
                    offset, buf.size()));
  }
  AlignedBuffer padded(cs);
  AlignedBuffer stream(cs);
  for (uint64_t done = 0; done < buf.size(); done += cs) {
    auto cluster = buf.subspan(done, std::min<uint64_t>(cs, buf.size() - done));
    std::span<const std::byte> whole = cluster;
    if (cluster.size() < cs) {
      // The image's short last cluster is compressed zero-padded, as QEMU does.
      std::memcpy(padded.data(), cluster.data(), cluster.size());
      std::memset(padded.data() + cluster.size(), 0, cs - cluster.size());
      whole = padded.span();
    }
    QK_CO_ASSIGN_OR_RETURN(size_t n, top_->CompressCluster(whole, stream.span()));
    QK_CO_RETURN_IF_ERROR(
        co_await WriteCompressedCluster(offset + done, cluster, stream.span().first(n)));
  }
  co_return Status::Ok();
}

Task<Status> BlockDevice::WriteCompressedCluster(uint64_t offset,
                                                 std::span<const std::byte> cluster,
                                                 std::span<const std::byte> stream) {
  // A short cluster is compressed zero-padded, which only the image's last cluster may be:
  // elsewhere (convert -n onto a larger image) the rest of the cluster keeps its data, so the
  // bytes are written plain.
  const bool short_inside =
      cluster.size() < top_->cluster_size() && offset + cluster.size() != size();
  if (stream.empty() || short_inside) co_return co_await Write(offset, cluster);
  auto held = co_await top_->LockRange(offset, cluster.size());
  co_return co_await top_->WriteCompressed(offset, stream);
}

}  // namespace qcow2kit
