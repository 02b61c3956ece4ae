#include "tools/first_unreadable.h"

#include <algorithm>

namespace qcow2kit::tools {

Task<std::pair<uint64_t, Status>> FirstUnreadable(BlockDevice& dev, uint64_t offset,
                                                  std::span<std::byte> buf, Status error) {
  const uint64_t piece = std::max<uint64_t>(512, dev.top().cluster_size());
  for (uint64_t at = 0; at < buf.size();) {
    const uint64_t n = std::min(piece - (offset + at) % piece, buf.size() - at);
    Status one = co_await dev.Read(offset + at, buf.subspan(at, n));
    if (!one.ok()) co_return std::pair<uint64_t, Status>(offset + at, std::move(one));
    at += n;
  }
  co_return std::pair<uint64_t, Status>(offset, std::move(error));
}

}  // namespace qcow2kit::tools
