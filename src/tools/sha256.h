// Incremental SHA-256 (GnuTLS, already linked for NBD over TLS) for `read --sha256`.
#pragma once

#include <cstddef>
#include <span>
#include <string>

#include "qcow2kit/status.h"

struct hash_hd_st;  // GnuTLS's gnutls_hash_hd_t points at one

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
  hash_hd_st* ctx_ = nullptr;
  bool ok_ = false;
};

}  // namespace qcow2kit::tools
