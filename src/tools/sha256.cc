#include "tools/sha256.h"

#include <openssl/evp.h>

#include "fmt/format.h"

namespace qcow2kit::tools {

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  ok_ = ctx_ && EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr) == 1;
}

Sha256::~Sha256() {
  EVP_MD_CTX_free(ctx_);
}

Status Sha256::Update(std::span<const std::byte> data) {
  if (!ok_ || EVP_DigestUpdate(ctx_, data.data(), data.size()) != 1) {
    ok_ = false;
    return Status::Error(EIO, "SHA-256 computation failed");
  }
  return Status::Ok();
}

Result<std::string> Sha256::HexDigest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!ok_ || EVP_DigestFinal_ex(ctx_, digest, &len) != 1) {
    ok_ = false;
    return Status::Error(EIO, "SHA-256 computation failed");
  }
  ok_ = false;
  std::string hex;
  for (unsigned int i = 0; i < len; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

}  // namespace qcow2kit::tools
