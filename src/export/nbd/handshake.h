// The NBD handshake (fixed newstyle option haggling): the server greeting, then options until
// the client picks an export with NBD_OPT_GO or NBD_OPT_EXPORT_NAME.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "export/nbd/export.h"
#include "export/nbd/tls.h"
#include "export/nbd/transport.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit::nbd {

// What the handshake agreed on.
struct Negotiated {
  const Export* exp = nullptr;
  bool structured_replies = false;
  bool context_allocation = false;  // base:allocation selected
  bool context_depth = false;       // qemu:allocation-depth selected
};

// Runs the handshake. Returns nullopt if the client ended it politely (NBD_OPT_ABORT, or a
// close); an error if the client broke the protocol and must be dropped. With `tls`, TLS is
// required (the spec's FORCEDTLS): *transport is replaced by the TLS transport once the
// client has asked for it with NBD_OPT_STARTTLS.
Task<Result<std::optional<Negotiated>>> Handshake(std::unique_ptr<Transport>* transport,
                                                  InputBuffer* in,
                                                  const std::vector<Export>& exports,
                                                  const TlsCredentials* tls);

}  // namespace qcow2kit::nbd
