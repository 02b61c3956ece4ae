// The NBD server's handshake and transmission phase with the fuzzer as the client: the input
// is the byte stream a client sends (over a socketpair), served against a small qcow2 image.
// Whatever it sends, the server must answer or drop the connection, never crash or hang.
#include <sys/socket.h>
#include <unistd.h>

#include <thread>

#include "export/nbd/export.h"
#include "export/nbd/handshake.h"
#include "export/nbd/session.h"
#include "export/nbd/transport.h"
#include "fuzz/fuzz_util.h"
#include "image/create.h"
#include "qcow2kit/block.h"

using namespace qcow2kit;

namespace {

struct Served {
  std::unique_ptr<BlockDevice> device;
  std::vector<nbd::Export> exports;
};

Served& TheExport() {
  static Served* served = [] {
    auto* s = new Served;
    const std::string path = fuzz::ScratchPath("nbd") + ".qcow2";
    CreateOptions o;
    o.filename = path;
    o.size = 4 << 20;
    o.cluster_size = 4096;
    if (!fuzz::TheReactor().BlockOn(CreateImage(o)).ok()) std::abort();
    OpenOptions open = fuzz::SelfContained(true, false);
    auto img = fuzz::TheReactor().BlockOn(OpenImage(path, open));
    if (!img.ok()) std::abort();
    s->device = std::make_unique<BlockDevice>(std::move(*img));
    nbd::Export e;
    e.name = "";
    e.device = s->device.get();
    e.discard = nbd::DiscardMode::kUnmap;
    s->exports.push_back(e);
    ::unlink(path.c_str());
    return s;
  }();
  return *served;
}

Task<void> Serve(int fd, const std::vector<nbd::Export>& exports) {
  std::unique_ptr<nbd::Transport> t = std::make_unique<nbd::PlainTransport>(fd);
  nbd::InputBuffer in(t.get());
  auto n = co_await nbd::Handshake(&t, &in, exports, nullptr);
  if (!n.ok() || !n->has_value()) co_return;
  nbd::Session session(t.get(), &in, **n);
  co_await session.Run();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Served& served = TheExport();
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 0;
  // The client: sends the input, then reads (and drops) replies until the server closes.
  std::thread client([&] {
    size_t done = 0;
    while (done < size) {
      const ssize_t n = ::send(sv[1], data + done, size - done, MSG_NOSIGNAL);
      if (n <= 0) break;
      done += static_cast<size_t>(n);
    }
    ::shutdown(sv[1], SHUT_WR);
    char buf[65536];
    while (::read(sv[1], buf, sizeof buf) > 0) {
    }
  });
  fuzz::TheReactor().BlockOn(Serve(sv[0], served.exports));
  ::close(sv[0]);
  client.join();
  ::close(sv[1]);
  return 0;
}
