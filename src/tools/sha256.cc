#include "tools/sha256.h"

#include <gnutls/crypto.h>

#include "fmt/format.h"

namespace qcow2kit::tools {

Sha256::Sha256() {
  ok_ = gnutls_hash_init(&ctx_, GNUTLS_DIG_SHA256) == 0;
  if (!ok_) ctx_ = nullptr;
}

Sha256::~Sha256() {
  if (ctx_) gnutls_hash_deinit(ctx_, nullptr);
}

Status Sha256::Update(std::span<const std::byte> data) {
  if (!ok_ || gnutls_hash(ctx_, data.data(), data.size()) != 0) {
    ok_ = false;
    return Status::Error(EIO, "SHA-256 computation failed");
  }
  return Status::Ok();
}

Result<std::string> Sha256::HexDigest() {
  if (!ok_) return Status::Error(EIO, "SHA-256 computation failed");
  unsigned char digest[32];
  gnutls_hash_output(ctx_, digest);
  ok_ = false;
  std::string hex;
  for (unsigned char b : digest) hex += fmt::format("{:02x}", b);
  return hex;
}

}  // namespace qcow2kit::tools
