// Header extensions: walking the list in cluster 0 and interpreting the known types.

#include <cstring>
#include <set>
#include <string>

#include "format/endian.h"
#include "format/header.h"
#include "format/header_internal.h"
#include "format/hex.h"

namespace qcow2kit::format::internal {
namespace {

const char* ExtensionName(uint32_t type) {
  switch (type) {
    case kExtBackingFormat:
      return "backing format";
    case kExtFeatureTable:
      return "feature name table";
    case kExtBitmaps:
      return "bitmaps";
    case kExtCrypto:
      return "crypto";
    case kExtDataFile:
      return "data file name";
    default:
      return nullptr;
  }
}

std::string Describe(const RawExtension& e) {
  return std::string(ExtensionName(e.type)) + " header extension at offset " + Hex(e.offset);
}

std::string AsString(const std::vector<uint8_t>& data) {
  return std::string(data.begin(), data.end());
}

Status ParseBackingFormat(const RawExtension& e, ParsedHeader* p) {
  if (e.data.size() > kMaxBackingFormatLength) {
    return Status::Invalid(Describe(e) + ": backing format name of " +
                           std::to_string(e.data.size()) + " bytes is too long (at most " +
                           std::to_string(kMaxBackingFormatLength) + ")");
  }
  p->backing_format = AsString(e.data);
  return Status::Ok();
}

Status ParseFeatureTable(const RawExtension& e, ParsedHeader* p) {
  if (e.data.size() % kFeatureEntrySize != 0) {
    return Status::Invalid(Describe(e) + ": length " + std::to_string(e.data.size()) +
                           " is not a multiple of " + std::to_string(kFeatureEntrySize));
  }
  p->feature_names = DecodeFeatureTable(e.data);
  return Status::Ok();
}

Status CheckBitmapsExtension(const RawExtension& e, const BitmapsExtension& b, const Header& h,
                             uint64_t file_size) {
  const std::string where = Describe(e) + ": ";
  if (LoadBE32(&e.data[4]) != 0) return Status::Invalid(where + "reserved field is not zero");
  if (b.nb_bitmaps == 0) return Status::Invalid(where + "nb_bitmaps is 0");
  if (b.nb_bitmaps > kMaxBitmapsInExt) {
    return Status::Invalid(where + "nb_bitmaps " + std::to_string(b.nb_bitmaps) + " exceeds " +
                           std::to_string(kMaxBitmapsInExt));
  }
  if (b.directory_size > kMaxBitmapDirectorySize) {
    return Status::Invalid(where + "bitmap directory size " + std::to_string(b.directory_size) +
                           " exceeds " + std::to_string(kMaxBitmapDirectorySize));
  }
  if (b.directory_offset % h.cluster_size() != 0) {
    return Status::Invalid(where + "bitmap directory offset " + Hex(b.directory_offset) +
                           " is not cluster aligned");
  }
  // Both values are bounded above, so the sum cannot wrap.
  if (b.directory_offset > file_size || b.directory_size > file_size - b.directory_offset) {
    return Status::Invalid(where + "bitmap directory (offset " + Hex(b.directory_offset) + ", " +
                           std::to_string(b.directory_size) + " bytes) extends past end of file (" +
                           Hex(file_size) + " bytes)");
  }
  return Status::Ok();
}

Status ParseBitmaps(const RawExtension& e, uint64_t file_size, ParsedHeader* p) {
  if (e.data.size() != kBitmapsExtSize) {
    return Status::Invalid(Describe(e) + ": length " + std::to_string(e.data.size()) +
                           " (expected " + std::to_string(kBitmapsExtSize) + ")");
  }
  // Without the autoclear bit a program that does not know bitmaps has modified the image:
  // the bitmaps are stale. QEMU warns and drops the extension on its next header update.
  if (!(p->header.autoclear_features & kAutoclearBitmaps)) {
    p->bitmaps_inconsistent = true;
    return Status::Ok();
  }
  BitmapsExtension b;
  b.nb_bitmaps = LoadBE32(&e.data[0]);
  b.directory_size = LoadBE64(&e.data[8]);
  b.directory_offset = LoadBE64(&e.data[16]);
  QK_RETURN_IF_ERROR(CheckBitmapsExtension(e, b, p->header, file_size));
  p->bitmaps = b;
  return Status::Ok();
}

Status ParseCrypto(const RawExtension& e, ParsedHeader* p) {
  if (p->header.crypt_method != kCryptLuks) {
    return Status::Invalid(Describe(e) + ": only expected with LUKS encryption (crypt_method " +
                           std::to_string(p->header.crypt_method) + ")");
  }
  if (e.data.size() != kCryptoExtSize) {
    return Status::Invalid(Describe(e) + ": length " + std::to_string(e.data.size()) +
                           " (expected " + std::to_string(kCryptoExtSize) + ")");
  }
  CryptoExtension c{LoadBE64(&e.data[0]), LoadBE64(&e.data[8])};
  if (c.offset % p->header.cluster_size() != 0) {
    return Status::Invalid(Describe(e) + ": encryption header offset " + Hex(c.offset) +
                           " is not cluster aligned");
  }
  p->crypto = c;
  return Status::Ok();
}

Status ParseKnown(const RawExtension& e, uint64_t file_size, ParsedHeader* p) {
  switch (e.type) {
    case kExtBackingFormat:
      return ParseBackingFormat(e, p);
    case kExtFeatureTable:
      return ParseFeatureTable(e, p);
    case kExtBitmaps:
      return ParseBitmaps(e, file_size, p);
    case kExtCrypto:
      return ParseCrypto(e, p);
    case kExtDataFile:
      p->data_file = AsString(e.data);
      return Status::Ok();
    default:
      p->unknown_extensions.push_back(e);
      return Status::Ok();
  }
}

}  // namespace

Status WalkExtensions(std::span<const uint8_t> cluster0, uint64_t start, uint64_t end,
                      std::vector<RawExtension>* out) {
  uint64_t offset = start;
  while (offset < end) {
    // QEMU's rule: neither the 8-byte type/length header nor the data may cross `end`.
    if (end - offset < 8) {
      return Status::Invalid("Header extension too large: extension header at offset " +
                             Hex(offset) + " runs past the end of the extension area (" + Hex(end) +
                             ")");
    }
    const uint32_t type = LoadBE32(&cluster0[offset]);
    const uint32_t length = LoadBE32(&cluster0[offset + 4]);
    if (length > end - offset - 8) {
      return Status::Invalid("Header extension too large: extension " + Hex(type) + " at offset " +
                             Hex(offset) + " has length " + std::to_string(length) +
                             ", past the end of the extension area (" + Hex(end) + ")");
    }
    if (type == kExtEnd) break;
    const uint8_t* data = &cluster0[offset + 8];
    out->push_back(RawExtension{type, offset, std::vector<uint8_t>(data, data + length)});
    offset += 8 + AlignUp8(length);
  }
  return Status::Ok();
}

std::vector<FeatureName> DecodeFeatureTable(std::span<const uint8_t> data) {
  std::vector<FeatureName> names;
  for (size_t pos = 0; pos + kFeatureEntrySize <= data.size(); pos += kFeatureEntrySize) {
    const char* name = reinterpret_cast<const char*>(&data[pos + 2]);
    // The name is zero padded but need not be terminated when it uses all 46 bytes.
    names.push_back(
        FeatureName{data[pos], data[pos + 1], std::string(name, strnlen(name, kFeatureNameSize))});
  }
  return names;
}

Status InterpretExtensions(uint64_t file_size, ParsedHeader* p) {
  std::set<uint32_t> seen;
  for (const RawExtension& e : p->extensions) {
    if (ExtensionName(e.type) != nullptr && !seen.insert(e.type).second) {
      return Status::Invalid("Duplicate " + Describe(e));
    }
    QK_RETURN_IF_ERROR(ParseKnown(e, file_size, p));
  }
  return Status::Ok();
}

}  // namespace qcow2kit::format::internal
