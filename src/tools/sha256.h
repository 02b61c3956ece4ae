// Incremental SHA-256 (OpenSSL EVP) for `read --sha256`.
#pragma once

#include <cstddef>
#include <span>
#include <string>

#include "qcow2kit/status.h"

typedef struct evp_md_ctx_st EVP_MD_CTX;

namespace qcow2kit::tools {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  Status Update(std::span<const std::byte> data);
  // The digest as 64 lowercase hex digits. The object cannot be updated afterwards.
  Result<std::string> HexDigest();

 private:
  EVP_MD_CTX* ctx_;
  bool ok_ = false;
};

}  // namespace qcow2kit::tools
