#include "export/nbd/tls.h"

#include <gnutls/x509.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace qcow2kit::nbd {
namespace {

constexpr size_t kRecvChunk = 64 << 10;
constexpr size_t kFlushAt = 256 << 10;  // ciphertext buffered before it is sent

Status TlsError(int code, const std::string& what) {
  return Status::Error(EPROTO, what + ": " + gnutls_strerror(code));
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

}  // namespace

Result<std::unique_ptr<TlsCredentials>> TlsCredentials::Load(const std::string& dir,
                                                             bool verify_peer) {
  auto c = std::unique_ptr<TlsCredentials>(new TlsCredentials());
  c->verify_peer_ = verify_peer;
  int r = gnutls_certificate_allocate_credentials(&c->cred_);
  if (r < 0) return TlsError(r, "Cannot allocate TLS credentials");
  const std::string ca = dir + "/ca-cert.pem";
  const std::string cert = dir + "/server-cert.pem";
  const std::string key = dir + "/server-key.pem";
  const std::string crl = dir + "/ca-crl.pem";
  for (const std::string& f : {ca, cert, key}) {
    if (!Exists(f)) return Status::Invalid("Unable to access credentials " + f);
  }
  r = gnutls_certificate_set_x509_trust_file(c->cred_, ca.c_str(), GNUTLS_X509_FMT_PEM);
  if (r < 0) return TlsError(r, "Cannot load CA certificate " + ca);
  if (r == 0) return Status::Invalid("No CA certificate found in " + ca);
  r = gnutls_certificate_set_x509_key_file(c->cred_, cert.c_str(), key.c_str(),
                                           GNUTLS_X509_FMT_PEM);
  if (r < 0) return TlsError(r, "Cannot load certificate " + cert + " & key " + key);
  if (Exists(crl)) {
    r = gnutls_certificate_set_x509_crl_file(c->cred_, crl.c_str(), GNUTLS_X509_FMT_PEM);
    if (r < 0) return TlsError(r, "Cannot load CRL " + crl);
  }
  return c;
}

TlsCredentials::~TlsCredentials() {
  if (cred_) gnutls_certificate_free_credentials(cred_);
}

Result<std::unique_ptr<TlsTransport>> TlsTransport::Create(const TlsCredentials& creds,
                                                           std::unique_ptr<Transport>& inner,
                                                           std::vector<std::byte> early) {
  auto t = std::unique_ptr<TlsTransport>(new TlsTransport());
  t->in_ = std::move(early);
  int r = gnutls_init(&t->session_, GNUTLS_SERVER | GNUTLS_NONBLOCK);
  if (r < 0) return TlsError(r, "Cannot start a TLS session");
  r = gnutls_set_default_priority(t->session_);
  if (r < 0) return TlsError(r, "Cannot set TLS priorities");
  r = gnutls_credentials_set(t->session_, GNUTLS_CRD_CERTIFICATE, creds.get());
  if (r < 0) return TlsError(r, "Cannot set TLS credentials");
  if (creds.verify_peer()) {
    gnutls_certificate_server_set_request(t->session_, GNUTLS_CERT_REQUIRE);
    gnutls_session_set_verify_cert(t->session_, nullptr, 0);
  }
  gnutls_transport_set_ptr(t->session_, t.get());
  gnutls_transport_set_push_function(t->session_, &TlsTransport::Push);
  gnutls_transport_set_pull_function(t->session_, &TlsTransport::Pull);
  gnutls_transport_set_pull_timeout_function(t->session_, &TlsTransport::PullTimeout);
  t->inner_ = std::move(inner);
  return t;
}

TlsTransport::~TlsTransport() {
  if (session_) gnutls_deinit(session_);
}

ssize_t TlsTransport::Push(gnutls_transport_ptr_t self, const void* data, size_t len) {
  auto* t = static_cast<TlsTransport*>(self);
  const auto* p = static_cast<const std::byte*>(data);
  t->out_.insert(t->out_.end(), p, p + len);
  return static_cast<ssize_t>(len);
}

ssize_t TlsTransport::Pull(gnutls_transport_ptr_t self, void* data, size_t len) {
  auto* t = static_cast<TlsTransport*>(self);
  size_t n = std::min(len, t->in_.size() - t->in_pos_);
  if (n == 0) {
    gnutls_transport_set_errno(t->session_, EAGAIN);
    return -1;
  }
  std::memcpy(data, t->in_.data() + t->in_pos_, n);
  t->in_pos_ += n;
  return static_cast<ssize_t>(n);
}

int TlsTransport::PullTimeout(gnutls_transport_ptr_t self, unsigned) {
  auto* t = static_cast<TlsTransport*>(self);
  return t->in_pos_ < t->in_.size() ? 1 : 0;
}

Task<Status> TlsTransport::Flush() {
  auto guard = co_await send_mutex_.Lock();
  while (!out_.empty()) {
    sending_.clear();
    sending_.swap(out_);
    iovec iov{sending_.data(), sending_.size()};
    Status s = co_await inner_->SendAll(std::span(&iov, 1));
    if (!s.ok()) co_return s;
  }
  co_return Status::Ok();
}

Task<Result<bool>> TlsTransport::Fill() {
  if (in_pos_ == in_.size()) {
    in_.clear();
    in_pos_ = 0;
  }
  size_t at = in_.size();
  in_.resize(at + kRecvChunk);
  Result<size_t> got = co_await inner_->RecvSome(std::span(in_).subspan(at));
  in_.resize(at + (got.ok() ? *got : 0));
  if (!got.ok()) co_return got.status();
  co_return *got > 0;
}

Task<Status> TlsTransport::Handshake() {
  for (;;) {
    int r = gnutls_handshake(session_);
    Status s = co_await Flush();  // alerts too: the client learns why it failed
    if (r == GNUTLS_E_SUCCESS) co_return s;
    if (!s.ok()) co_return s;
    if (r != GNUTLS_E_AGAIN && r != GNUTLS_E_INTERRUPTED) co_return TlsError(r, "TLS handshake failed");
    if (gnutls_record_get_direction(session_) == 0) {
      Result<bool> more = co_await Fill();
      if (!more.ok()) co_return more.status();
      if (!*more) co_return Status::Error(EPIPE, "client closed the connection during the TLS handshake");
    }
  }
}

Task<void> TlsTransport::Close() {
  gnutls_bye(session_, GNUTLS_SHUT_WR);
  (void)co_await Flush();
}

Task<Result<size_t>> TlsTransport::RecvSome(std::span<std::byte> buf) {
  for (;;) {
    ssize_t r = gnutls_record_recv(session_, buf.data(), buf.size());
    if (!out_.empty()) {  // a post-handshake message may need an answer
      Status s = co_await Flush();
      if (!s.ok()) co_return s;
    }
    if (r >= 0) co_return static_cast<size_t>(r);
    if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
      Result<bool> more = co_await Fill();
      if (!more.ok()) co_return more.status();
      if (!*more) co_return size_t{0};
      continue;
    }
    if (r == GNUTLS_E_PREMATURE_TERMINATION) co_return size_t{0};
    co_return TlsError(static_cast<int>(r), "TLS receive failed");
  }
}

Task<Status> TlsTransport::RecvExact(std::span<std::byte> buf) {
  while (!buf.empty()) {
    Result<size_t> got = co_await RecvSome(buf);
    if (!got.ok()) co_return got.status();
    if (*got == 0) co_return Status::IoError("connection closed in the middle of a message");
    buf = buf.subspan(*got);
  }
  co_return Status::Ok();
}

Task<Status> TlsTransport::SendAll(std::span<iovec> iov) {
  // Corked: small reply headers and their data share TLS records.
  gnutls_record_cork(session_);
  size_t corked = 0;
  for (const iovec& v : iov) {
    const auto* p = static_cast<const std::byte*>(v.iov_base);
    size_t left = v.iov_len;
    while (left > 0) {
      size_t n = std::min<size_t>(left, kFlushAt - corked);
      ssize_t r = gnutls_record_send(session_, p, n);
      if (r < 0) co_return TlsError(static_cast<int>(r), "TLS send failed");
      p += r;
      left -= static_cast<size_t>(r);
      corked += static_cast<size_t>(r);
      if (corked >= kFlushAt) {  // bounded buffering: encrypt and send what we have
        corked = 0;
        int u = gnutls_record_uncork(session_, 0);
        if (u < 0) co_return TlsError(u, "TLS send failed");
        Status s = co_await Flush();
        if (!s.ok()) co_return s;
        gnutls_record_cork(session_);
      }
    }
  }
  int u = gnutls_record_uncork(session_, 0);
  if (u < 0) co_return TlsError(u, "TLS send failed");
  co_return co_await Flush();
}

}  // namespace qcow2kit::nbd
