// Server: accepts NBD connections on a listening socket and serves the exports, all on the
// calling thread's reactor. Runs until shut down (a signal, Shutdown()) or, unless
// persistent, until the last client has left.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "export/nbd/export.h"
#include "export/nbd/tls.h"
#include "io/socket.h"
#include "io/wakeup.h"
#include "qcow2kit/status.h"
#include "qcow2kit/task.h"

namespace qcow2kit::nbd {

struct ServerOptions {
  bool persistent = false;  // -t: keep serving after the last client leaves
  unsigned max_connections = 1;  // -e; 0 = no limit
  int signal_fd = -1;       // a signalfd whose readiness means "shut down" (-1: none)
  const TlsCredentials* tls = nullptr;  // set: clients must use TLS
};

class Server {
 public:
  Server(std::vector<Export> exports, int listen_fd, ServerOptions options);
  ~Server();

  // Accepts and serves clients until shutdown; returns when every connection has ended (their
  // requests finished and replies sent). The exports' devices are left open.
  Task<Status> Serve();
  // Stops accepting, ends handshakes, and lets connections finish the requests they have.
  void Shutdown();

  unsigned connections() const { return connections_; }

 private:
  struct Connection;
  Task<void> ServeConnection(int fd);
  Task<void> WatchSignals();
  // After Shutdown(): connections still open after the grace period are aborted.
  Task<void> AbortStragglers();
  // Drops a connection that has not finished its handshake in time.
  Task<void> HandshakeDeadline(Connection* conn);

  std::vector<Export> exports_;
  int listen_fd_;
  ServerOptions options_;
  bool stopping_ = false;
  bool signal_watch_done_ = true;
  unsigned connections_ = 0;
  std::unordered_set<Connection*> live_;
  CancelToken accept_token_;
  CancelToken signal_token_;
  CancelToken grace_token_;
  bool grace_done_ = true;
  Wakeup serve_wakeup_;  // Serve(), waiting for room, a connection's end or shutdown
};

}  // namespace qcow2kit::nbd
