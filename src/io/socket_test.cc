// Socket operations on both engines: one thread serving many sockets, with or without io_uring.
#include "io/socket.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace qcow2kit {
namespace {

class SocketTest : public ::testing::TestWithParam<EngineKind> {
 protected:
  void SetUp() override {
    auto r = Reactor::Create(GetParam());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    reactor_ = std::move(*r);
  }
  std::unique_ptr<Reactor> reactor_;
};

// Echoes messages of `size` bytes until the peer closes.
Task<void> Echo(int fd, size_t size, int* echoed) {
  std::vector<std::byte> buf(size);
  for (;;) {
    Status s = co_await RecvExact(fd, buf);
    if (!s.ok()) break;
    iovec iov{buf.data(), buf.size()};
    s = co_await SendAll(fd, std::span(&iov, 1));
    if (!s.ok()) break;
    ++*echoed;
  }
  ::close(fd);
}

// Sends `count` messages and checks each echo.
Task<void> Talk(int fd, size_t size, int count, int seed, int* bad) {
  std::vector<std::byte> out(size), in(size);
  for (int i = 0; i < count; ++i) {
    for (size_t k = 0; k < size; ++k) out[k] = std::byte((k * 31 + i + seed) & 0xff);
    iovec iov[2] = {{out.data(), size / 3}, {out.data() + size / 3, size - size / 3}};
    Status s = co_await SendAll(fd, iov);
    if (s.ok()) s = co_await RecvExact(fd, in);
    if (!s.ok() || in != out) ++*bad;
  }
  ::shutdown(fd, SHUT_WR);
}

TEST_P(SocketTest, ManyConnectionsEchoConcurrently) {
  constexpr int kPairs = 16;
  int echoed = 0, bad = 0;
  std::vector<int> clients;
  for (int i = 0; i < kPairs; ++i) {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    // Large messages (1 MiB) exceed the socket buffers: sends complete in parts.
    size_t size = i % 2 ? (1 << 20) : 100;
    reactor_->Spawn(Echo(sv[0], size, &echoed));
    reactor_->Spawn(Talk(sv[1], size, 60, i, &bad));
    clients.push_back(sv[1]);
  }
  reactor_->RunUntilIdle();
  for (int fd : clients) ::close(fd);
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(echoed, kPairs * 60);
}

TEST_P(SocketTest, RecvSomeReportsEndOfStream) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  ASSERT_EQ(::write(sv[1], "abc", 3), 3);
  ::close(sv[1]);
  std::vector<std::byte> buf(16);
  auto r = reactor_->BlockOn(RecvSome(sv[0], buf));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 3u);
  r = reactor_->BlockOn(RecvSome(sv[0], buf));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 0u);
  // RecvExact names an early end as an error.
  EXPECT_FALSE(reactor_->BlockOn(RecvExact(sv[0], buf)).ok());
  ::close(sv[0]);
}

Task<void> AcceptOne(int listen_fd, CancelToken* token, Status* out) {
  auto fd = co_await Accept(listen_fd, token);
  *out = fd.ok() ? Status::Ok() : fd.status();
  if (fd.ok()) ::close(*fd);
}

Task<void> CancelLater(CancelToken* token) {
  // Let the accept start waiting first: a turn of the loop.
  int sv[2];
  ::socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  ::write(sv[1], "x", 1);
  co_await WaitReadable(sv[0]);
  ::close(sv[0]);
  ::close(sv[1]);
  token->Cancel();
}

TEST_P(SocketTest, WaitingAcceptCanBeCancelled) {
  std::string path = "/tmp/qk_sock_" + std::to_string(::getpid());
  auto l = ListenUnix(path);
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  CancelToken token;
  Status accepted = Status::Ok();
  reactor_->Spawn(AcceptOne(*l, &token, &accepted));
  EXPECT_TRUE(token.waiting());
  reactor_->Spawn(CancelLater(&token));
  reactor_->RunUntilIdle();
  EXPECT_EQ(accepted.code(), ECANCELED) << accepted.ToString();
  EXPECT_FALSE(token.waiting());
  ::close(*l);
  ::unlink(path.c_str());
}

TEST_P(SocketTest, AcceptsUnixConnections) {
  std::string path = "/tmp/qk_sock_a_" + std::to_string(::getpid());
  auto l = ListenUnix(path);
  ASSERT_TRUE(l.ok());
  // A stale socket file is replaced.
  auto again = ListenUnix(path);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  ::close(*l);
  Status accepted = Status::Invalid("not run");
  reactor_->Spawn(AcceptOne(*again, nullptr, &accepted));
  int c = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  ASSERT_EQ(::connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  reactor_->RunUntilIdle();
  EXPECT_TRUE(accepted.ok()) << accepted.ToString();
  ::close(c);
  ::close(*again);
  ::unlink(path.c_str());
}

TEST(SocketPaths, TooLongUnixPathIsRefused) {
  auto l = ListenUnix(std::string(200, 'a'));
  ASSERT_FALSE(l.ok());
  EXPECT_NE(l.status().message().find("too long"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Engines, SocketTest,
                         ::testing::Values(EngineKind::kUring, EngineKind::kSync),
                         [](const auto& info) {
                           return info.param == EngineKind::kSync ? "Sync" : "Uring";
                         });

}  // namespace
}  // namespace qcow2kit
