#include "image/qcow2_image.h"

#include <algorithm>
#include <cstring>

#include "fmt/format.h"
#include "format/compression.h"
#include "format/endian.h"

namespace qcow2kit {

using format::ClusterType;
using format::SubclusterType;

namespace {
constexpr uint64_t kDefaultMaxL2Cache = 32ull << 20;  // QEMU's default cap on Linux
constexpr uint32_t kDefaultSliceBytes = 4096;
}  // namespace

Qcow2Image::Qcow2Image(std::unique_ptr<File> file, format::ParsedHeader parsed)
    : file_(std::move(file)), parsed_(std::move(parsed)) {
  const format::Header& h = parsed_.header;
  geometry_ = {h.cluster_bits, h.extended_l2(), h.has_data_file()};
  refcount_geometry_ = {h.cluster_bits, h.refcount_order};
  metadata_map_ = MetadataMap(h.cluster_bits);
}

Qcow2Image::~Qcow2Image() = default;

Task<Result<std::unique_ptr<Qcow2Image>>> Qcow2Image::Open(std::unique_ptr<File> file,
                                                           const OpenOptions& options) {
  QK_CO_ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  // First the fixed header, to learn the cluster size; then all of cluster 0.
  std::vector<uint8_t> head(std::min<uint64_t>(file_size, 4096));
  auto got = co_await file->ReadAt(std::as_writable_bytes(std::span(head)), 0);
  if (!got.ok()) co_return got.status();
  head.resize(*got);
  QK_CO_ASSIGN_OR_RETURN(uint64_t need, format::HeaderReadSize(head));
  need = std::min(need, file_size);
  if (need > head.size()) {
    head.resize(need);
    QK_CO_RETURN_IF_ERROR(co_await file->ReadExact(std::as_writable_bytes(std::span(head)), 0));
  }
  QK_CO_ASSIGN_OR_RETURN(format::ParsedHeader parsed,
                         format::ParseHeader(head, file_size, options.check));
  if (options.writable && parsed.header.corrupt() && !options.check) {
    co_return Status::Error(EACCES,
                            "Image is corrupt; cannot be opened read/write (repair it with "
                            "'qcow2kit check -r all')");
  }
  std::unique_ptr<Qcow2Image> img(new Qcow2Image(std::move(file), std::move(parsed)));
  img->file_size_ = file_size;
  const uint64_t cs = img->geometry_.cluster_size();
  img->unwritten_from_ = (file_size + cs - 1) / cs * cs;
  QK_CO_RETURN_IF_ERROR(co_await img->LoadTables(options));
  // A check reads the snapshot table itself, reporting and repairing what is wrong with it.
  if (!options.check) QK_CO_RETURN_IF_ERROR(co_await img->LoadSnapshots());
  QK_CO_RETURN_IF_ERROR(co_await img->LoadBitmaps());
  if (options.writable) {
    QK_CO_RETURN_IF_ERROR(co_await img->PrepareForWriting(options.check));
    img->RebuildMetadataMap();
    // Table writebacks may not land on other metadata either.
    Qcow2Image* self = img.get();
    img->l2_cache_->set_write_guard([self](uint64_t offset, uint64_t length) {
      return self->CheckOverlap(offset, length, MetadataMap::Bit(MetadataMap::kActiveL2));
    });
    img->refcount_cache_->set_write_guard([self](uint64_t offset, uint64_t length) {
      return self->CheckOverlap(offset, length, MetadataMap::Bit(MetadataMap::kRefcountBlock));
    });
  }
  co_return std::move(img);
}

// Reads `count` big-endian u64 entries at `offset`.
static Task<Result<std::vector<uint64_t>>> ReadTable(File* f, uint64_t offset, uint64_t count) {
  std::vector<uint64_t> table(count);
  QK_CO_RETURN_IF_ERROR(co_await f->ReadExact(std::as_writable_bytes(std::span(table)), offset));
  for (auto& e : table) e = format::LoadBE64(&e);
  co_return table;
}

Task<Status> Qcow2Image::LoadTables(const OpenOptions& options) {
  const format::Header& h = parsed_.header;
  uint64_t cluster = geometry_.cluster_size();
  {
    auto l1 = co_await ReadTable(file_.get(), h.l1_table_offset, h.l1_size);
    if (!l1.ok()) co_return l1.status().WithContext("Could not read L1 table");
    l1_ = std::move(*l1);
  }
  {
    auto rt = co_await ReadTable(file_.get(), h.refcount_table_offset,
                                 uint64_t(h.refcount_table_clusters) * cluster / 8);
    if (!rt.ok()) co_return rt.status().WithContext("Could not read refcount table");
    reftable_ = std::move(*rt);
  }

  slice_bytes_ = options.l2_slice_bytes ? options.l2_slice_bytes : kDefaultSliceBytes;
  if (slice_bytes_ < 512 || (slice_bytes_ & (slice_bytes_ - 1)) != 0) {
    co_return Status::Invalid(fmt::format(
        "L2 cache entry size must be a power of two between 512 and the cluster size ({})",
        cluster));
  }
  slice_bytes_ = static_cast<uint32_t>(std::min<uint64_t>(slice_bytes_, cluster));
  uint64_t l2_cache = options.l2_cache_bytes;
  const uint64_t clusters = (h.size + cluster - 1) / cluster;
  if (l2_cache == 0) {
    // Twice what maps the whole disk, capped (QEMU: once). Commit writes dirty metadata back
    // (with syncs) once half the cache is dirty: with room for all of it, random allocating
    // writes never force that before the client flushes.
    uint64_t full = (clusters * geometry_.l2_entry_bytes() + cluster - 1) / cluster * cluster;
    l2_cache = std::min(2 * full, kDefaultMaxL2Cache);
  }
  l2_cache_ = std::make_unique<MetadataCache>(file_.get(), slice_bytes_, l2_cache, "L2 table");
  uint64_t rc_cache = options.refcount_cache_bytes;
  if (rc_cache == 0) {
    // Likewise: twice the refcounts of a fully allocated disk, at least 4 clusters, capped.
    uint64_t full = (clusters << h.refcount_order) / 8;
    rc_cache = std::clamp<uint64_t>(2 * full, 4 * cluster, kDefaultMaxL2Cache / 4);
  }
  refcount_cache_ =
      std::make_unique<MetadataCache>(file_.get(), slice_bytes_, rc_cache, "refcount block");
  decompressed_.Resize(cluster);
  co_return Status::Ok();
}

Task<Status> Qcow2Image::LoadBitmaps() {
  if (!parsed_.bitmaps) co_return Status::Ok();
  const format::BitmapsExtension& b = *parsed_.bitmaps;
  if (b.directory_offset + b.directory_size > file_size_ ||
      b.directory_offset + b.directory_size < b.directory_offset) {
    co_return Status::Corrupt(
        fmt::format("Bitmap directory (offset {:#x}, {} bytes) extends past end of file",
                    b.directory_offset, b.directory_size));
  }
  std::vector<uint8_t> dir(b.directory_size);
  QK_CO_RETURN_IF_ERROR(
      co_await file_->ReadExact(std::as_writable_bytes(std::span(dir)), b.directory_offset));
  QK_CO_ASSIGN_OR_RETURN(bitmaps_, format::ParseBitmapDirectory(dir, b.nb_bitmaps));
  co_return Status::Ok();
}

void Qcow2Image::Append(std::vector<Extent>* out, const Extent& e) const {
  if (!out->empty()) {
    Extent& last = out->back();
    bool same = last.kind == e.kind && last.kind != ExtentKind::kCompressed &&
                last.file_index == e.file_index && last.writable == e.writable &&
                last.end() == e.guest_offset;
    bool host_ok =
        (!last.has_host() && !e.has_host()) ||
        (last.has_host() && e.has_host() && last.host_offset + last.length == e.host_offset);
    if (same && host_ok) {
      last.length += e.length;
      return;
    }
  }
  out->push_back(e);
}

Status Qcow2Image::DecodeSlice(const uint8_t* slice, uint64_t first_guest, uint64_t offset,
                               uint64_t end, std::vector<Extent>* out) const {
  const uint32_t cb = geometry_.cluster_bits;
  const uint64_t cluster = geometry_.cluster_size();
  const uint32_t eb = geometry_.l2_entry_bytes();
  const uint64_t slice_entries = slice_bytes_ / eb;
  const uint64_t stop = std::min({end, first_guest + (slice_entries << cb), size()});
  const uint8_t data_file = geometry_.has_data_file ? 1 : 0;
  uint64_t cur = offset;
  while (cur < stop) {
    uint64_t i = (cur - first_guest) >> cb;
    uint64_t entry = format::LoadBE64(slice + i * eb);
    uint64_t bitmap = geometry_.extended_l2 ? format::LoadBE64(slice + i * eb + 8) : 0;
    uint64_t cluster_guest = first_guest + (i << cb);
    uint64_t cluster_end = std::min(cluster_guest + cluster, size());
    QK_RETURN_IF_ERROR(
        format::ValidateL2Entry(entry, bitmap, cluster_guest, parsed_.header.version, geometry_));
    uint64_t host = format::L2EntryOffset(entry);
    bool copied = entry & format::kOflagCopied;
    if (data_file && host != 0 && host != cluster_guest) {
      return Status::Corrupt(fmt::format(
          "External data file host cluster offset {:#x} does not match guest cluster offset: "
          "{:#x}, which is not allowed",
          host, cluster_guest));
    }
    if (format::ClassifyCluster(entry, geometry_) == ClusterType::kCompressed) {
      auto d = format::DecodeCompressed(entry, cb);
      Extent e;
      e.guest_offset = cur;
      e.length = cluster_end - cur;
      e.kind = ExtentKind::kCompressed;
      e.host_offset = d.host_offset;
      e.compressed_length = d.read_bound();
      out->push_back(e);
      cur = cluster_end;
      continue;
    }
    // Walk the cluster in subclusters (one "subcluster" = the cluster for standard L2).
    const uint64_t sc_size = geometry_.subcluster_size();
    while (cur < cluster_end) {
      uint32_t sc = static_cast<uint32_t>((cur - cluster_guest) / sc_size);
      uint64_t sc_end = std::min(cluster_guest + (uint64_t(sc) + 1) * sc_size, cluster_end);
      Extent e;
      e.guest_offset = cur;
      e.length = sc_end - cur;
      e.file_index = data_file;
      uint64_t host_here = host + (cur - cluster_guest);
      switch (format::ClassifySubcluster(entry, bitmap, sc, geometry_)) {
        case SubclusterType::kNormal:
          e.kind = ExtentKind::kData;
          e.host_offset = host_here;
          e.writable = copied;
          break;
        case SubclusterType::kZeroPlain:
          e.kind = ExtentKind::kZero;
          break;
        case SubclusterType::kZeroAlloc:
          e.kind = ExtentKind::kZero;
          e.host_offset = host_here;
          e.writable = copied;
          break;
        case SubclusterType::kUnallocatedPlain:
          e.kind = ExtentKind::kUnallocated;
          break;
        case SubclusterType::kUnallocatedAlloc:
          e.kind = ExtentKind::kUnallocated;
          e.host_offset = host_here;
          e.writable = copied;
          break;
        case SubclusterType::kCompressed:
        case SubclusterType::kInvalid:
          return Status::Corrupt(
              fmt::format("Invalid L2 entry {:#018x} (bitmap {:#018x}) for guest offset {:#x}",
                          entry, bitmap, cluster_guest));
      }
      Append(out, e);
      cur = sc_end;
    }
  }
  return Status::Ok();
}

Task<Status> Qcow2Image::Fetch(uint64_t offset, uint64_t length, std::vector<Extent>* out) {
  const uint32_t cb = geometry_.cluster_bits;
  const uint64_t l2_entries = geometry_.l2_entries();
  const uint64_t slice_entries = slice_bytes_ / geometry_.l2_entry_bytes();
  const uint64_t end = std::min(size(), offset + std::min(length, size() - offset));
  while (offset < end) {
    uint64_t cluster_index = offset >> cb;
    uint64_t l1_index = cluster_index / l2_entries;
    uint64_t table_end = std::min(size(), ((l1_index + 1) * l2_entries) << cb);
    uint64_t l2_offset = 0;
    if (l1_index < l1_.size()) {
      // Checked at use, not at open: one bad entry must not make the rest unreadable.
      QK_CO_RETURN_IF_ERROR(format::ValidateL1Entry(l1_[l1_index], l1_index, geometry_));
      l2_offset = format::L1EntryOffset(l1_[l1_index]);
    }
    if (l2_offset == 0) {
      Extent e;
      e.guest_offset = offset;
      e.length = table_end - offset;
      e.kind = ExtentKind::kUnallocated;
      Append(out, e);
      offset = table_end;
      continue;
    }
    uint64_t slice_no = (cluster_index % l2_entries) / slice_entries;
    uint64_t slice_offset = l2_offset + slice_no * slice_bytes_;
    const uint8_t* slice = l2_cache_->Peek(slice_offset);
    if (!slice) {
      auto r = co_await l2_cache_->Get(slice_offset);
      if (!r.ok()) co_return r.status();
      slice = *r;
    }
    uint64_t first_guest = (l1_index * l2_entries + slice_no * slice_entries) << cb;
    QK_CO_RETURN_IF_ERROR(DecodeSlice(slice, first_guest, offset, end, out));
    offset = out->back().end();
  }
  co_return Status::Ok();
}

Task<Status> Qcow2Image::ReadCompressed(const Extent& e, uint64_t offset,
                                        std::span<std::byte> out) {
  const uint64_t cluster = geometry_.cluster_size();
  const uint64_t cluster_guest = offset & ~(cluster - 1);
  if (decompressed_host_ != e.host_offset) {
    // The last sector of the stream may lie past the end of the file (the file end is only
    // sector aligned): those bytes read as zeros.
    std::vector<uint8_t> in(e.compressed_length);
    // Bytes still being packed may not be on disk yet: taken from the pack as it is now (it
    // may move on to another cluster while the read is in flight).
    const auto [packed_at, packed] = PackedBytes(e.host_offset, in.size());
    // The I/O epoch keeps the host space from being reused until this read is done.
    const uint64_t epoch = BeginIo();
    Status s = co_await file_->ReadZeroPadded(std::as_writable_bytes(std::span(in)), e.host_offset);
    EndIo(epoch);
    if (!s.ok()) co_return s;
    if (!packed.empty()) std::memcpy(in.data() + packed_at, packed.data(), packed.size());
    decompressed_host_ = Extent::kNoHost;
    auto dst = std::span(reinterpret_cast<uint8_t*>(decompressed_.data()), cluster);
    s = format::DecompressCluster(parsed_.header.compression_type, in, dst);
    if (!s.ok()) {
      co_return s.WithContext(fmt::format("compressed cluster for guest offset {:#x} (host {:#x})",
                                          cluster_guest, e.host_offset));
    }
    decompressed_host_ = e.host_offset;
  }
  std::memcpy(out.data(), decompressed_.data() + (offset - cluster_guest), out.size());
  co_return Status::Ok();
}

Task<Result<std::vector<uint64_t>>> Qcow2Image::ReadL2Table(uint64_t table_offset) {
  const uint64_t cluster = geometry_.cluster_size();
  std::vector<uint64_t> entries(cluster / 8);
  for (uint64_t s = 0; s < cluster; s += slice_bytes_) {
    auto r = co_await l2_cache_->Get(table_offset + s);
    if (!r.ok()) co_return r.status();
    for (uint64_t j = 0; j < slice_bytes_ / 8; ++j) {
      entries[s / 8 + j] = format::LoadBE64(*r + j * 8);
    }
  }
  co_return entries;
}

Task<Result<uint64_t>> Qcow2Image::Refcount(uint64_t host_offset) {
  const auto& g = refcount_geometry_;
  uint64_t ti = g.table_index(host_offset);
  if (ti >= reftable_.size()) co_return uint64_t{0};
  uint64_t block = reftable_[ti] & format::kRefcountTableOffsetMask;
  if (block == 0) co_return uint64_t{0};
  if (block & (geometry_.cluster_size() - 1)) {
    co_return Status::Corrupt(
        fmt::format("Refblock offset {:#x} unaligned (reftable index: {:#x})", block, ti));
  }
  uint64_t index = g.block_index(host_offset);
  uint64_t entries_per_slice = (uint64_t(slice_bytes_) * 8) >> g.refcount_order;
  uint64_t slice_offset = block + (index / entries_per_slice) * slice_bytes_;
  auto r = co_await refcount_cache_->Get(slice_offset);
  if (!r.ok()) co_return r.status();
  co_return format::GetRefcount(std::span(*r, slice_bytes_), index % entries_per_slice,
                                g.refcount_order);
}

Task<Result<uint64_t>> Qcow2Image::CountUsedClusters(uint64_t file_length, uint64_t limit) {
  const auto& g = refcount_geometry_;
  const uint64_t cs = geometry_.cluster_size();
  const uint64_t end = (file_length + cs - 1) / cs;
  uint64_t count = 0;
  for (uint64_t i = 0; i < end && count < limit;) {
    uint64_t ti = g.table_index(i * cs);
    if (ti >= reftable_.size()) break;
    if ((reftable_[ti] & format::kRefcountTableOffsetMask) == 0) {
      i = (ti + 1) * g.block_entries();  // no block: the whole range is free
      continue;
    }
    auto r = co_await Refcount(i * cs);
    if (!r.ok()) co_return r.status();
    count += *r > 0;
    ++i;
  }
  co_return count;
}

Task<FormatDriver::HostHoles> Qcow2Image::ProbeHostHoles() {
  if (metadata_preallocated_ < 0) {
    // QEMU's qcow2_detect_metadata_preallocation: clearly more clusters are in use than the
    // host file has allocated, so many data clusters must be holes.
    metadata_preallocated_ = 0;
    auto length = file_->Size();
    auto allocated = file_->AllocatedBytes();
    if (length.ok() && allocated.ok()) {
      uint64_t real_clusters = *allocated / geometry_.cluster_size();
      uint64_t threshold = std::max(real_clusters * 10 / 9, real_clusters + 2);
      auto used = co_await CountUsedClusters(*length, threshold);
      if (used.ok() && *used >= threshold) metadata_preallocated_ = 1;
    }
  }
  co_return metadata_preallocated_ == 1 ? HostHoles::kZeroData : HostHoles::kIgnore;
}

Task<Status> Qcow2Image::PrepareForWriting(bool for_check) {
  format::Header& h = parsed_.header;
  // An image opened to be checked is repaired by that check, and keeps its bitmaps: a repair
  // writes no guest data, so they stay consistent.
  if (for_check) co_return Status::Ok();
  if (h.dirty()) {
    // Left dirty by a crash with lazy refcounts: repaired before anything else is written,
    // as QEMU does, by a check that repairs everything (DESIGN.md rule 6).
    auto r = co_await Check(kFixAll, nullptr);
    if (!r.ok() || r->check_errors) {
      Status s = r.ok() ? Status::Error(EIO, "") : r.status();
      co_return Status::Error(
          s.code(), fmt::format("Could not repair dirty image: {}", std::strerror(s.code())));
    }
    repaired_refcounts_ = r->leaks_fixed + r->corruptions_fixed;
  }
  // Autoclear bits we do not maintain are cleared before the first write, as the spec asks.
  // That includes "bitmaps": we do not update persistent bitmaps, so after our writes QEMU
  // must treat them as inconsistent rather than trust them.
  uint64_t autoclear = h.autoclear_features & format::kAutoclearDataFileRaw;
  if (autoclear != h.autoclear_features) {
    uint8_t b[8];
    format::StoreBE64(b, autoclear);
    QK_CO_RETURN_IF_ERROR(co_await WriteHeaderBytes(88, b));
    QK_CO_RETURN_IF_ERROR(co_await SyncFiles());
    h.autoclear_features = autoclear;
    parsed_.bitmaps.reset();
    bitmaps_.clear();
  }
  co_return Status::Ok();
}

}  // namespace qcow2kit
