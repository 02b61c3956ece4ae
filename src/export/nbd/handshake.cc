#include "export/nbd/handshake.h"

#include <cerrno>
#include <cstring>
#include <string>
#include <string_view>

#include "export/nbd/protocol.h"

namespace qcow2kit::nbd {
namespace {

// Option data longer than this is never buffered: known options get ERR_TOO_BIG.
constexpr uint32_t kMaxBufferedOption = 64 << 10;

Status Drop(std::string why) { return Status::Error(EPROTO, std::move(why)); }

// Reads option data: a cursor that fails (instead of overrunning) when the client's lengths
// do not add up.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> data) : data_(data) {}
  bool U16(uint16_t* v) { return Take(2, [&](const std::byte* p) { *v = Load16(p); }); }
  bool U32(uint32_t* v) { return Take(4, [&](const std::byte* p) { *v = Load32(p); }); }
  bool String(uint32_t len, std::string* s) {
    return Take(len, [&](const std::byte* p) { s->assign(reinterpret_cast<const char*>(p), len); });
  }
  size_t left() const { return data_.size() - pos_; }

 private:
  template <typename F>
  bool Take(size_t n, F f) {
    if (n > left()) return false;
    f(data_.data() + pos_);
    pos_ += n;
    return true;
  }
  std::span<const std::byte> data_;
  size_t pos_ = 0;
};

class Haggler {
 public:
  Haggler(std::unique_ptr<Transport>* t, InputBuffer* in, const std::vector<Export>& exports,
          const TlsCredentials* tls)
      : t_(t), in_(in), exports_(exports), tls_(tls) {}

  Task<Result<std::optional<Negotiated>>> Run();

 private:
  Task<Status> Reply(uint32_t opt, uint32_t type, std::span<const std::byte> data = {});
  Task<Status> Error(uint32_t opt, uint32_t type, const std::string& message) {
    co_return co_await Reply(opt, type, std::as_bytes(std::span(message)));
  }
  Task<Status> SendExportInfo(uint32_t opt, uint16_t info, const Export& e);
  // Handles INFO / GO; sets *chosen when GO succeeded.
  Task<Status> InfoOrGo(uint32_t opt, std::span<const std::byte> data, const Export** chosen);
  Task<Status> MetaContext(uint32_t opt, std::span<const std::byte> data);
  Task<Status> List(uint32_t opt);
  // Answers STARTTLS and runs the TLS handshake; an error drops the client.
  Task<Status> StartTls();

  std::unique_ptr<Transport>* t_;
  InputBuffer* in_;
  const std::vector<Export>& exports_;
  const TlsCredentials* tls_;
  bool tls_done_ = false;
  bool no_zeroes_ = false;
  Negotiated n_;
  const Export* context_export_ = nullptr;  // the export the last SET_META_CONTEXT named
};

Task<Status> Haggler::Reply(uint32_t opt, uint32_t type, std::span<const std::byte> data) {
  std::byte head[20];
  Store32(Store32(Store32(Store64(head, kOptReplyMagic), opt), type),
          static_cast<uint32_t>(data.size()));
  iovec iov[2] = {{head, sizeof(head)},
                  {const_cast<std::byte*>(data.data()), data.size()}};
  co_return co_await (*t_)->SendAll(std::span(iov, data.empty() ? 1 : 2));
}

Task<Status> Haggler::SendExportInfo(uint32_t opt, uint16_t info, const Export& e) {
  std::vector<std::byte> d;
  auto put16 = [&](uint16_t v) { d.resize(d.size() + 2); Store16(d.data() + d.size() - 2, v); };
  auto put32 = [&](uint32_t v) { d.resize(d.size() + 4); Store32(d.data() + d.size() - 4, v); };
  auto put64 = [&](uint64_t v) { d.resize(d.size() + 8); Store64(d.data() + d.size() - 8, v); };
  auto puts = [&](const std::string& s) {
    auto b = std::as_bytes(std::span(s));
    d.insert(d.end(), b.begin(), b.end());
  };
  put16(info);
  switch (info) {
    case kInfoExport:
      put64(e.size());
      put16(e.TransmissionFlags(n_.structured_replies));
      break;
    case kInfoName:
      puts(e.name);
      break;
    case kInfoDescription:
      puts(e.description);
      break;
    case kInfoBlockSize:
      put32(1);
      put32(kPreferredBlock);
      put32(kMaxPayload);
      break;
  }
  co_return co_await Reply(opt, kRepInfo, d);
}

Task<Status> Haggler::InfoOrGo(uint32_t opt, std::span<const std::byte> data,
                               const Export** chosen) {
  Reader r(data);
  uint32_t name_len = 0;
  std::string name;
  uint16_t count = 0;
  if (!r.U32(&name_len) || !r.String(name_len, &name) || !r.U16(&count) ||
      r.left() != size_t{count} * 2) {
    co_return co_await Error(opt, kRepErrInvalid, "Inconsistent lengths in option");
  }
  if (name_len > kMaxStringLength) {
    co_return co_await Error(opt, kRepErrInvalid, "export name too long");
  }
  const Export* e = FindExport(exports_, name);
  if (!e) co_return co_await Error(opt, kRepErrUnknown, "export '" + name + "' not present");
  bool want_name = false, want_description = false;
  for (uint16_t i = 0; i < count; ++i) {
    uint16_t type = 0;
    r.U16(&type);
    want_name |= type == kInfoName;
    want_description |= type == kInfoDescription;
  }
  QK_CO_RETURN_IF_ERROR(co_await SendExportInfo(opt, kInfoExport, *e));
  if (want_name) QK_CO_RETURN_IF_ERROR(co_await SendExportInfo(opt, kInfoName, *e));
  if (want_description && !e->description.empty()) {
    QK_CO_RETURN_IF_ERROR(co_await SendExportInfo(opt, kInfoDescription, *e));
  }
  QK_CO_RETURN_IF_ERROR(co_await SendExportInfo(opt, kInfoBlockSize, *e));
  QK_CO_RETURN_IF_ERROR(co_await Reply(opt, kRepAck));
  if (opt == kOptGo) *chosen = e;
  co_return Status::Ok();
}

Task<Status> Haggler::MetaContext(uint32_t opt, std::span<const std::byte> data) {
  const bool set = opt == kOptSetMetaContext;
  if (set) {  // the selection is replaced even when this option fails
    n_.context_allocation = n_.context_depth = false;
    context_export_ = nullptr;
  }
  if (!n_.structured_replies) {
    co_return co_await Error(opt, kRepErrInvalid, "structured replies not negotiated");
  }
  Reader r(data);
  uint32_t name_len = 0, count = 0;
  std::string name;
  if (!r.U32(&name_len) || name_len > kMaxStringLength || !r.String(name_len, &name) ||
      !r.U32(&count)) {
    co_return co_await Error(opt, kRepErrInvalid, "Inconsistent lengths in option");
  }
  std::vector<std::string> queries;
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t len = 0;
    std::string q;
    if (!r.U32(&len) || len > kMaxStringLength || !r.String(len, &q)) {
      co_return co_await Error(opt, kRepErrInvalid, "Inconsistent lengths in option");
    }
    queries.push_back(std::move(q));
  }
  if (r.left() != 0) {
    co_return co_await Error(opt, kRepErrInvalid, "Inconsistent lengths in option");
  }
  const Export* e = FindExport(exports_, name);
  if (!e) co_return co_await Error(opt, kRepErrUnknown, "export '" + name + "' not present");
  bool allocation = false, depth = false;
  if (!set && queries.empty()) allocation = depth = true;
  for (const std::string& q : queries) {
    // In LIST a bare namespace asks for all of its contexts; in SET it selects nothing.
    allocation |= q == "base:allocation" || (!set && q == "base:");
    depth |= q == "qemu:allocation-depth" || (!set && q == "qemu:");
  }
  auto announce = [&](uint32_t id, std::string_view ctx) -> Task<Status> {
    std::vector<std::byte> d(4 + ctx.size());
    Store32(d.data(), id);
    std::memcpy(d.data() + 4, ctx.data(), ctx.size());
    co_return co_await Reply(opt, kRepMetaContext, d);
  };
  if (allocation) {
    QK_CO_RETURN_IF_ERROR(co_await announce(kContextBaseAllocation, "base:allocation"));
  }
  if (depth) {
    QK_CO_RETURN_IF_ERROR(co_await announce(kContextAllocationDepth, "qemu:allocation-depth"));
  }
  if (set) {
    n_.context_allocation = allocation;
    n_.context_depth = depth;
    context_export_ = e;
  }
  co_return co_await Reply(opt, kRepAck);
}

Task<Status> Haggler::List(uint32_t opt) {
  for (const Export& e : exports_) {
    std::vector<std::byte> d(4);
    Store32(d.data(), static_cast<uint32_t>(e.name.size()));
    auto name = std::as_bytes(std::span(e.name));
    auto desc = std::as_bytes(std::span(e.description));
    d.insert(d.end(), name.begin(), name.end());
    d.insert(d.end(), desc.begin(), desc.end());
    QK_CO_RETURN_IF_ERROR(co_await Reply(opt, kRepServer, d));
  }
  co_return co_await Reply(opt, kRepAck);
}

Task<Status> Haggler::StartTls() {
  QK_CO_RETURN_IF_ERROR(co_await Reply(kOptStartTls, kRepAck));
  std::vector<std::byte> early = in_->Switch(nullptr);
  auto tls = TlsTransport::Create(*tls_, *t_, std::move(early));
  if (!tls.ok()) co_return tls.status();
  TlsTransport* raw = tls->get();
  *t_ = std::move(*tls);
  in_->Switch(raw);
  QK_CO_RETURN_IF_ERROR(co_await raw->Handshake());
  // Nothing negotiated in plain text survives TLS.
  tls_done_ = true;
  n_ = Negotiated();
  context_export_ = nullptr;
  co_return Status::Ok();
}

Task<Result<std::optional<Negotiated>>> Haggler::Run() {
  std::byte greeting[18];
  Store16(Store64(Store64(greeting, kNbdMagic), kOptMagic), kFlagFixedNewstyle | kFlagNoZeroes);
  iovec iov{greeting, sizeof(greeting)};
  QK_CO_RETURN_IF_ERROR(co_await (*t_)->SendAll(std::span(&iov, 1)));

  Status s = co_await in_->Need(4);
  if (!s.ok()) co_return std::optional<Negotiated>();  // closed before saying anything
  uint32_t client_flags = Load32(in_->data());
  in_->Consume(4);
  if (client_flags & ~(kClientFixedNewstyle | kClientNoZeroes)) {
    co_return Drop("unknown client flags " + std::to_string(client_flags));
  }
  const bool fixed = client_flags & kClientFixedNewstyle;
  no_zeroes_ = client_flags & kClientNoZeroes;
  if (tls_ && !fixed) co_return Drop("TLS requires fixed newstyle");

  for (;;) {
    s = co_await in_->Need(16);
    if (!s.ok()) co_return std::optional<Negotiated>();
    uint64_t magic = Load64(in_->data());
    uint32_t opt = Load32(in_->data() + 8);
    uint32_t len = Load32(in_->data() + 12);
    in_->Consume(16);
    if (magic != kOptMagic) co_return Drop("bad option magic");
    if (len > kMaxOptionLength) {
      co_return Drop("option " + std::to_string(opt) + " of " + std::to_string(len) +
                     " bytes is larger than the maximum (" + std::to_string(kMaxOptionLength) +
                     ")");
    }
    if (!fixed && opt != kOptExportName) {
      co_return Drop("option " + std::to_string(opt) + " without fixed newstyle");
    }
    if (tls_ && !tls_done_ && opt != kOptStartTls && opt != kOptAbort) {
      // FORCEDTLS: nothing but STARTTLS and ABORT before TLS.
      if (opt == kOptExportName) co_return Drop("export name requested before TLS");
      QK_CO_RETURN_IF_ERROR(co_await in_->Skip(len));
      QK_CO_RETURN_IF_ERROR(co_await Error(
          opt, kRepErrTlsReqd, "TLS negotiation required before option " + std::to_string(opt)));
      continue;
    }
    const bool known = opt == kOptExportName || opt == kOptAbort || opt == kOptList ||
                       opt == kOptStartTls || opt == kOptInfo || opt == kOptGo ||
                       opt == kOptStructuredReply || opt == kOptListMetaContext ||
                       opt == kOptSetMetaContext;
    if (!known) {
      QK_CO_RETURN_IF_ERROR(co_await in_->Skip(len));
      QK_CO_RETURN_IF_ERROR(co_await Error(opt, kRepErrUnsup,
                                           "Unsupported option " + std::to_string(opt)));
      continue;
    }
    if (len > kMaxBufferedOption) {
      if (opt == kOptExportName) co_return Drop("export name too long");
      QK_CO_RETURN_IF_ERROR(co_await in_->Skip(len));
      QK_CO_RETURN_IF_ERROR(co_await Error(opt, kRepErrTooBig, "option data too long"));
      continue;
    }
    std::vector<std::byte> data(len);
    QK_CO_RETURN_IF_ERROR(co_await in_->ReadInto(data));

    switch (opt) {
      case kOptExportName: {
        std::string name(reinterpret_cast<const char*>(data.data()), data.size());
        const Export* e = FindExport(exports_, name);
        // This option has no way to report an error: the only answer is to hang up.
        if (!e) co_return Drop("export '" + name + "' not present");
        std::byte reply[10 + 124] = {};
        Store16(Store64(reply, e->size()), e->TransmissionFlags(n_.structured_replies));
        iovec v{reply, no_zeroes_ ? size_t{10} : sizeof(reply)};
        QK_CO_RETURN_IF_ERROR(co_await (*t_)->SendAll(std::span(&v, 1)));
        n_.exp = e;
        break;
      }
      case kOptAbort:
        // The client may already have closed: a failed ack is of no interest.
        (void)co_await Reply(opt, kRepAck);
        co_return std::optional<Negotiated>();
      case kOptList:
        if (len != 0) {
          QK_CO_RETURN_IF_ERROR(co_await Error(opt, kRepErrInvalid, "LIST takes no data"));
        } else {
          QK_CO_RETURN_IF_ERROR(co_await List(opt));
        }
        break;
      case kOptStartTls:
        if (!tls_) {
          QK_CO_RETURN_IF_ERROR(co_await Error(opt, kRepErrPolicy, "TLS not configured"));
        } else if (tls_done_) {
          QK_CO_RETURN_IF_ERROR(co_await Error(opt, kRepErrInvalid, "TLS already negotiated"));
        } else if (len != 0) {
          QK_CO_RETURN_IF_ERROR(co_await Error(opt, kRepErrInvalid, "STARTTLS takes no data"));
        } else {
          QK_CO_RETURN_IF_ERROR(co_await StartTls());
        }
        break;
      case kOptInfo:
      case kOptGo: {
        const Export* chosen = nullptr;
        QK_CO_RETURN_IF_ERROR(co_await InfoOrGo(opt, data, &chosen));
        n_.exp = chosen;
        break;
      }
      case kOptStructuredReply:
        if (len != 0) {
          QK_CO_RETURN_IF_ERROR(
              co_await Error(opt, kRepErrInvalid, "STRUCTURED_REPLY takes no data"));
        } else if (n_.structured_replies) {
          QK_CO_RETURN_IF_ERROR(
              co_await Error(opt, kRepErrInvalid, "structured replies already negotiated"));
        } else {
          n_.structured_replies = true;
          QK_CO_RETURN_IF_ERROR(co_await Reply(opt, kRepAck));
        }
        break;
      case kOptListMetaContext:
      case kOptSetMetaContext:
        QK_CO_RETURN_IF_ERROR(co_await MetaContext(opt, data));
        break;
    }
    if (n_.exp) {
      if (context_export_ != n_.exp) n_.context_allocation = n_.context_depth = false;
      co_return std::optional<Negotiated>(n_);
    }
  }
}

}  // namespace

Task<Result<std::optional<Negotiated>>> Handshake(std::unique_ptr<Transport>* transport,
                                                  InputBuffer* in,
                                                  const std::vector<Export>& exports,
                                                  const TlsCredentials* tls) {
  Haggler h(transport, in, exports, tls);
  co_return co_await h.Run();
}

}  // namespace qcow2kit::nbd
