#include <algorithm>
#include <cstring>

#include "qcow2kit/block.h"
#include "block/read_layer.h"
#include "block/scratch_extents.h"

namespace qcow2kit {

namespace {


// Zero-fills `part` (guest range starting at `guest`), or records it in `zeros`.
void FillZeros(std::span<std::byte> part, uint64_t guest, ZeroRuns* zeros) {
  if (part.empty()) return;
  if (!zeros) {
    std::memset(part.data(), 0, part.size());
  } else if (!zeros->empty() && zeros->back().first + zeros->back().second == guest) {
    zeros->back().second += part.size();
  } else {
    zeros->emplace_back(guest, part.size());
  }
}

}  // namespace

Task<Status> ReadLayer(FormatDriver* layer, uint64_t offset, std::span<std::byte> buf,
                       ZeroRuns* zeros) {
  const uint64_t size = layer->size();
  if (offset >= size) {
    FillZeros(buf, offset, zeros);
    co_return Status::Ok();
  }
  std::span<std::byte> past_end;
  if (buf.size() > size - offset) {
    past_end = buf.subspan(size - offset);
    buf = buf.first(size - offset);
  }
  ScratchExtents scratch;
  std::vector<Extent>& extents = scratch.get();
  uint64_t pos = offset;
  const uint64_t end = offset + buf.size();
  while (pos < end) {
    extents.clear();
    QK_CO_RETURN_IF_ERROR(co_await layer->Fetch(pos, end - pos, &extents));
    for (const Extent& e : extents) {
      if (e.guest_offset >= end) break;
      uint64_t n = std::min(e.end(), end) - e.guest_offset;
      std::span<std::byte> part = buf.subspan(e.guest_offset - offset, n);
      switch (e.kind) {
        case ExtentKind::kData: {
          // The I/O epoch keeps the host cluster from being reused until this read is done.
          uint64_t epoch = layer->BeginIo();
          Status s = co_await layer->file(e.file_index)->ReadZeroPadded(part, e.host_offset);
          layer->EndIo(epoch);
          if (!s.ok()) co_return s;
          break;
        }
        case ExtentKind::kZero:
          FillZeros(part, e.guest_offset, zeros);
          break;
        case ExtentKind::kUnallocated:
          if (layer->backing()) {
            QK_CO_RETURN_IF_ERROR(
                co_await ReadLayer(layer->backing(), e.guest_offset, part, zeros));
          } else {
            FillZeros(part, e.guest_offset, zeros);
          }
          break;
        case ExtentKind::kCompressed:
          QK_CO_RETURN_IF_ERROR(co_await layer->ReadCompressed(e, e.guest_offset, part));
          break;
      }
      pos = e.guest_offset + n;
    }
  }
  FillZeros(past_end, offset + buf.size(), zeros);
  co_return Status::Ok();
}

namespace {

void Emit(std::vector<BlockStatusExtent>* out, const BlockStatusExtent& x) {
  if (!out->empty()) {
    BlockStatusExtent& c = out->back();
    bool same = c.depth == x.depth && c.present == x.present && c.zero == x.zero &&
                c.data == x.data && c.compressed == x.compressed &&
                (c.offset == Extent::kNoHost) == (x.offset == Extent::kNoHost) &&
                c.start + c.length == x.start;
    if (same && (c.offset == Extent::kNoHost || c.offset + c.length == x.offset)) {
      c.length += x.length;
      return;
    }
  }
  out->push_back(x);
}

Task<Status> StatusLayer(FormatDriver* layer, uint32_t depth, uint64_t offset, uint64_t length,
                         std::vector<BlockStatusExtent>* out, bool probe_holes) {
  ScratchExtents scratch;
  std::vector<Extent>& extents = scratch.get();
  const uint64_t end = offset + length;
  auto holes = FormatDriver::HostHoles::kIgnore;
  if (probe_holes) {
    auto probed = co_await layer->ProbeHostHoles();
    holes = probed;
  }
  uint64_t pos = offset;
  while (pos < end) {
    extents.clear();
    QK_CO_RETURN_IF_ERROR(co_await layer->Fetch(pos, end - pos, &extents));
    for (const Extent& e : extents) {
      if (e.guest_offset >= end) break;
      uint64_t n = std::min(e.end(), end) - e.guest_offset;
      BlockStatusExtent x;
      x.start = e.guest_offset;
      x.length = n;
      x.depth = depth;
      x.offset = e.host_offset;
      x.file = e.has_host() ? layer->file(e.file_index) : nullptr;
      switch (e.kind) {
        case ExtentKind::kData:
          x.present = x.data = true;
          if (holes != FormatDriver::HostHoles::kIgnore) {
            // Split the run where the host file has holes: those read as zeros.
            for (uint64_t done = 0; done < n;) {
              auto probe = x.file->ProbeHole(e.host_offset + done, n - done);
              if (!probe.ok()) co_return probe.status();
              BlockStatusExtent part = x;
              part.start = x.start + done;
              part.length = probe->second;
              part.offset = e.host_offset + done;
              part.zero = probe->first;
              part.data = !probe->first || holes == FormatDriver::HostHoles::kZeroData;
              Emit(out, part);
              done += probe->second;
            }
            pos = e.guest_offset + n;
            continue;
          }
          break;
        case ExtentKind::kZero:
          x.present = x.zero = true;
          break;
        case ExtentKind::kCompressed:
          x.present = x.data = x.compressed = true;
          x.offset = Extent::kNoHost;
          x.file = nullptr;
          break;
        case ExtentKind::kUnallocated: {
          FormatDriver* backing = layer->backing();
          uint64_t below = backing ? std::min(n, backing->size() > x.start
                                                     ? backing->size() - x.start
                                                     : uint64_t{0})
                                   : 0;
          if (below > 0) {
            QK_CO_RETURN_IF_ERROR(
                co_await StatusLayer(backing, depth + 1, x.start, below, out, probe_holes));
          }
          if (below < n) {
            // No backing data here: zeros, not allocated anywhere in the chain.
            x.start += below;
            x.length = n - below;
            if (x.offset != Extent::kNoHost) x.offset += below;
            x.zero = true;
            Emit(out, x);
          }
          pos = e.guest_offset + n;
          continue;
        }
      }
      Emit(out, x);
      pos = e.guest_offset + n;
    }
  }
  co_return Status::Ok();
}

}  // namespace

BlockDevice::BlockDevice(std::unique_ptr<FormatDriver> top) : top_(std::move(top)) {}
BlockDevice::~BlockDevice() = default;

Task<Status> BlockDevice::Read(uint64_t offset, std::span<std::byte> buf) {
  if (offset > size() || buf.size() > size() - offset) {
    co_return Status::Invalid("read past the end of the image");
  }
  co_return co_await ReadLayer(top_.get(), offset, buf);
}

Task<Status> BlockDevice::ReadSparse(uint64_t offset, std::span<std::byte> buf, ZeroRuns* zeros) {
  if (offset > size() || buf.size() > size() - offset) {
    co_return Status::Invalid("read past the end of the image");
  }
  co_return co_await ReadLayer(top_.get(), offset, buf, zeros);
}

Task<Status> BlockDevice::BlockStatus(uint64_t offset, uint64_t length,
                                      std::vector<BlockStatusExtent>* out,
                                      bool probe_host_holes) {
  if (offset >= size()) co_return Status::Ok();
  length = std::min(length, size() - offset);
  co_return co_await StatusLayer(top_.get(), 0, offset, length, out, probe_host_holes);
}

}  // namespace qcow2kit
