// qcow2kit serve: exports an image over NBD, with qemu-nbd's option names. Defaults favour
// speed with durability: direct I/O (the page cache where the file system has no O_DIRECT)
// on io_uring.
#include <fcntl.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/daemon.h"
#include "export/nbd/protocol.h"
#include "export/nbd/server.h"
#include "fmt/format.h"
#include "io/socket.h"
#include "qcow2kit/block.h"
#include "tools/open_layer.h"

namespace qcow2kit::cli {
namespace {

struct ServeArgs {
  std::string image;
  std::string format;
  std::string socket_path;  // -k
  std::string bind = "0.0.0.0";
  int port = 10809;
  std::string name;
  std::string description;
  bool read_only = false;
  bool persistent = false;
  int shared = 1;
  std::string cache = "none";  // File falls back to the page cache where O_DIRECT fails
  std::string aio = "io_uring";
  std::string discard = "ignore";
  std::string detect_zeroes = "off";
  std::string pid_file;
  bool fork = false;
  std::string tls_creds;             // an --object id, or a credentials directory
  std::vector<std::string> objects;  // --object tls-creds-x509,id=ID,dir=DIR,...
  CLI::Option* bind_opt = nullptr;
  CLI::Option* port_opt = nullptr;
};

// Where the server listens: -k, -b/-p, or a socket handed over by systemd-style activation
// (LISTEN_PID / LISTEN_FDS, as nbdinfo and nbdcopy use to start a server themselves).
Result<int> OpenListener(const ServeArgs& a, bool* unlink_socket) {
  *unlink_socket = false;
  const char* pid = std::getenv("LISTEN_PID");
  const char* fds = std::getenv("LISTEN_FDS");
  if (pid && fds && std::atol(pid) == ::getpid()) {
    if (!a.socket_path.empty() || a.bind_opt->count() || a.port_opt->count()) {
      return Status::Invalid("-k, -b and -p cannot be used with socket activation");
    }
    if (std::string(fds) != "1") {
      return Status::Invalid(fmt::format("socket activation with LISTEN_FDS={} (expected 1)", fds));
    }
    ::unsetenv("LISTEN_PID");
    ::unsetenv("LISTEN_FDS");
    ::fcntl(3, F_SETFD, FD_CLOEXEC);
    return 3;
  }
  if (!a.socket_path.empty()) {
    if (a.bind_opt->count() || a.port_opt->count()) {
      return Status::Invalid("-k cannot be used with -b or -p");
    }
    auto fd = ListenUnix(a.socket_path);
    if (fd.ok()) *unlink_socket = true;
    return fd;
  }
  if (a.port < 0 || a.port > 65535)
    return Status::Invalid(fmt::format("Invalid port '{}'", a.port));
  return ListenTcp(a.bind, static_cast<uint16_t>(a.port));
}

// Loads the credentials --tls-creds names: the id of an --object tls-creds-x509 (qemu-nbd's
// way) or, as a shorthand, the credentials directory itself.
Result<std::unique_ptr<nbd::TlsCredentials>> LoadTlsCredentials(const ServeArgs& a) {
  for (const std::string& object : a.objects) {
    std::string type, id, dir, endpoint = "server";
    bool verify_peer = true;
    size_t pos = 0;
    for (bool first = true; pos <= object.size(); first = false) {
      size_t comma = object.find(',', pos);
      if (comma == std::string::npos) comma = object.size();
      std::string item = object.substr(pos, comma - pos);
      pos = comma + 1;
      size_t eq = item.find('=');
      std::string key = eq == std::string::npos ? item : item.substr(0, eq);
      std::string value = eq == std::string::npos ? "" : item.substr(eq + 1);
      if (first && eq == std::string::npos) {
        type = item;
      } else if (key == "qom-type") {
        type = value;
      } else if (key == "id") {
        id = value;
      } else if (key == "dir") {
        dir = value;
      } else if (key == "endpoint") {
        endpoint = value;
      } else if (key == "verify-peer") {
        if (value != "on" && value != "off" && value != "yes" && value != "no") {
          return Status::Invalid("Invalid verify-peer value '" + value + "' (on or off)");
        }
        verify_peer = value == "on" || value == "yes";
      } else if (key != "priority" && key != "sanity-check") {
        return Status::Invalid("Property '" + key + "' not found in object '" + object + "'");
      }
    }
    if (type != "tls-creds-x509") {
      return Status::Invalid("Unsupported object type '" + type + "' (tls-creds-x509)");
    }
    if (id != a.tls_creds) continue;
    if (endpoint != "server") {
      return Status::Invalid("Expecting TLS credentials with a server endpoint");
    }
    if (dir.empty()) return Status::Invalid("tls-creds-x509 object '" + id + "' has no dir");
    return nbd::TlsCredentials::Load(dir, verify_peer);
  }
  struct stat st;
  if (::stat(a.tls_creds.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    return nbd::TlsCredentials::Load(a.tls_creds, /*verify_peer=*/true);
  }
  return Status::Invalid("--tls-creds '" + a.tls_creds +
                         "' is neither the id of an --object tls-creds-x509 nor a directory");
}

int RunServe(const ServeArgs& a) {
  // ---- options ----
  nbd::Export exp;
  exp.name = a.name;
  exp.description = a.description;
  exp.read_only = a.read_only;
  if (a.shared < 0)
    return UsageError(fmt::format("Invalid shared device number '{}'", a.shared), "serve");
  exp.multi_conn = a.shared != 1;
  if (a.discard == "ignore" || a.discard == "off") {
    exp.discard = nbd::DiscardMode::kIgnore;
  } else if (a.discard == "unmap" || a.discard == "on") {
    exp.discard = nbd::DiscardMode::kUnmap;
  } else {
    return UsageError("Invalid discard mode '" + a.discard + "' (ignore or unmap)", "serve");
  }
  if (a.detect_zeroes == "off") {
    exp.detect_zeroes = nbd::DetectZeroes::kOff;
  } else if (a.detect_zeroes == "on") {
    exp.detect_zeroes = nbd::DetectZeroes::kOn;
  } else if (a.detect_zeroes == "unmap") {
    if (exp.discard != nbd::DiscardMode::kUnmap) {
      return UsageError("--detect-zeroes=unmap needs --discard=unmap", "serve");
    }
    exp.detect_zeroes = nbd::DetectZeroes::kUnmap;
  } else {
    return UsageError("Invalid detect-zeroes mode '" + a.detect_zeroes + "' (off, on or unmap)",
                      "serve");
  }
  if (exp.name.size() > nbd::kMaxStringLength || exp.description.size() > nbd::kMaxStringLength) {
    return UsageError("export name and description are limited to 4096 bytes", "serve");
  }
  std::unique_ptr<nbd::TlsCredentials> tls;
  if (!a.tls_creds.empty()) {
    auto creds = LoadTlsCredentials(a);
    if (!creds.ok()) return Fail(creds.status());
    tls = std::move(*creds);
  }
  auto engine = ParseEngineKind(a.aio);
  if (!engine.ok()) return UsageError(engine.status().message(), "serve");
  ImageOptions io;
  io.filename = a.image;
  io.format = a.format;
  io.cache = a.cache;
  auto open = ReadOnlyOpenOptions(io);
  if (!open.ok()) return Fail(open.status());
  open->writable = !a.read_only;

  // ---- process set-up ----
  int ready_fd = -1;
  if (a.fork) {
    int r = ForkAndWait(&ready_fd);
    if (r >= 0) return r;
  }
  const sigset_t signals = BlockStopSignals();
  ::signal(SIGPIPE, SIG_IGN);
  int sig_fd = ::signalfd(-1, &signals, SFD_CLOEXEC);
  if (sig_fd < 0) return Fail(Status::FromErrno(errno, "signalfd"));

  // ---- the image ----
  auto reactor = MakeReactor(*engine);
  if (!reactor.ok()) return Fail(reactor.status());
  Reactor& r = **reactor;
  auto img = r.BlockOn(tools::OpenImageChain(a.image, *open));
  if (!img.ok()) return Fail(img.status());
  auto dev = std::make_unique<BlockDevice>(std::move(*img));
  exp.device = dev.get();

  bool unlink_socket = false;
  auto listener = OpenListener(a, &unlink_socket);
  if (!listener.ok()) {
    (void)r.BlockOn(dev->Close());
    return Fail(listener.status());
  }
  if (!a.pid_file.empty()) {
    std::FILE* f = std::fopen(a.pid_file.c_str(), "w");
    if (!f || std::fprintf(f, "%d\n", static_cast<int>(::getpid())) < 0 || std::fclose(f) != 0) {
      (void)r.BlockOn(dev->Close());
      return Fail(Status::FromErrno(errno, "Failed to write pid file '" + a.pid_file + "'"));
    }
  }
  ReportReady(&ready_fd, 0);

  // ---- serve ----
  std::vector<nbd::Export> exports{exp};
  nbd::Server server(std::move(exports), *listener,
                     {.persistent = a.persistent,
                      .max_connections = static_cast<unsigned>(a.shared),
                      .signal_fd = sig_fd,
                      .tls = tls.get()});
  Status served = r.BlockOn(server.Serve());
  Status closed = r.BlockOn(dev->Close());
  dev.reset();
  ::close(*listener);
  ::close(sig_fd);
  if (unlink_socket) ::unlink(a.socket_path.c_str());
  if (!a.pid_file.empty()) ::unlink(a.pid_file.c_str());
  if (!served.ok()) return Fail(served);
  if (!closed.ok()) return Fail(closed.WithContext("Could not close '" + a.image + "'"));
  return 0;
}

}  // namespace

void AddServeCommand(Cli& cli) {
  auto a = std::make_shared<ServeArgs>();
  CLI::App* cmd = AddCommand(cli, "serve", "Export an image over NBD (options as qemu-nbd)",
                             [a] { return RunServe(*a); });
  cmd->add_option("image", a->image, "Image file")->required();
  cmd->add_option("-f,--format", a->format, "Image format: qcow2 or raw (default: probe)");
  cmd->add_option("-k,--socket", a->socket_path, "Listen on this unix socket");
  a->bind_opt = cmd->add_option("-b,--bind", a->bind, "Listen on this address (default 0.0.0.0)");
  a->port_opt = cmd->add_option("-p,--port", a->port, "Listen on this TCP port (default 10809)");
  cmd->add_option("-x,--export-name", a->name, "Export name (default \"\")");
  cmd->add_option("-D,--description", a->description, "Export description");
  cmd->add_flag("-r,--read-only", a->read_only, "Export read-only");
  cmd->add_flag("-t,--persistent", a->persistent, "Keep serving after the last client leaves");
  cmd->add_option("-e,--shared", a->shared,
                  "Clients served at once (default 1, 0 = no limit); more than 1 allows "
                  "multi-connection clients");
  cmd->add_option("--cache", a->cache,
                  "none (O_DIRECT, the default) or writeback; also directsync, writethrough");
  cmd->add_option("--aio", a->aio, "io_uring (default) or threads (blocking I/O)");
  cmd->add_option("--discard", a->discard, "ignore (default) or unmap client discards");
  cmd->add_option("--detect-zeroes", a->detect_zeroes,
                  "off (default), on or unmap: turn all-zero writes into zero writes");
  cmd->add_option("--pid-file", a->pid_file, "Write the server's pid to this file");
  cmd->add_flag("--fork", a->fork, "Return once the server is ready, leaving it running");
  cmd->add_option("--tls-creds", a->tls_creds,
                  "Require TLS with these credentials: the id of an --object "
                  "tls-creds-x509, or its directory (ca-cert.pem, server-cert.pem, "
                  "server-key.pem)");
  cmd->add_option("--object", a->objects,
                  "tls-creds-x509,id=ID,dir=DIR[,endpoint=server][,verify-peer=on|off]");
}

}  // namespace qcow2kit::cli
