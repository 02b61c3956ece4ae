// TLS for the NBD server with GnuTLS: X.509 credentials loaded from a directory laid out as
// QEMU's tls-creds-x509 (ca-cert.pem, server-cert.pem, server-key.pem, optional ca-crl.pem),
// and TlsTransport, which runs GnuTLS over memory buffers so that the socket I/O stays on the
// reactor (GnuTLS never blocks and never touches the socket itself).
#pragma once

#include <gnutls/gnutls.h>

#include <memory>
#include <string>
#include <vector>

#include "export/nbd/transport.h"
#include "qcow2kit/async_mutex.h"
#include "qcow2kit/status.h"

namespace qcow2kit::nbd {

class TlsCredentials {
 public:
  // Loads the credentials in `dir`. With `verify_peer` (QEMU's default), clients must present
  // a certificate signed by the CA.
  static Result<std::unique_ptr<TlsCredentials>> Load(const std::string& dir, bool verify_peer);
  ~TlsCredentials();

  gnutls_certificate_credentials_t get() const { return cred_; }
  bool verify_peer() const { return verify_peer_; }

 private:
  TlsCredentials() = default;
  gnutls_certificate_credentials_t cred_ = nullptr;
  bool verify_peer_ = true;
};

class TlsTransport final : public Transport {
 public:
  // Takes over `inner` (the plain connection), which is left alone on failure. `early` holds
  // bytes already received from the client after the STARTTLS request (the start of its
  // handshake).
  static Result<std::unique_ptr<TlsTransport>> Create(const TlsCredentials& creds,
                                                      std::unique_ptr<Transport>& inner,
                                                      std::vector<std::byte> early);
  ~TlsTransport() override;

  // Runs the TLS handshake; the connection is unusable if it fails.
  Task<Status> Handshake();

  Task<Result<size_t>> RecvSome(std::span<std::byte> buf) override;
  Task<Status> RecvExact(std::span<std::byte> buf) override;
  Task<Status> SendAll(std::span<iovec> iov) override;
  void CancelRecv() override { inner_->CancelRecv(); }
  // Sends the TLS close notification (best effort).
  Task<void> Close() override;
  void Abort() override { inner_->Abort(); }

 private:
  TlsTransport() = default;
  static ssize_t Push(gnutls_transport_ptr_t self, const void* data, size_t len);
  static ssize_t Pull(gnutls_transport_ptr_t self, void* data, size_t len);
  static int PullTimeout(gnutls_transport_ptr_t self, unsigned ms);
  // Sends the ciphertext GnuTLS has produced so far, in order.
  Task<Status> Flush();
  // Receives more ciphertext from the socket; false at end of stream.
  Task<Result<bool>> Fill();

  gnutls_session_t session_ = nullptr;
  std::unique_ptr<Transport> inner_;
  std::vector<std::byte> in_;  // ciphertext received, not yet given to GnuTLS
  size_t in_pos_ = 0;
  std::vector<std::byte> out_;  // ciphertext produced, not yet sent
  std::vector<std::byte> sending_;
  AsyncMutex send_mutex_;  // keeps flushes (from the reader and the sender) in order
};

}  // namespace qcow2kit::nbd
