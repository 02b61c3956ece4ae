#include "cli/daemon.h"

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "cli/common.h"

namespace qcow2kit::cli {

int ForkAndWait(int* ready_fd) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) < 0) return Fail(Status::FromErrno(errno, "pipe"));
  pid_t child = ::fork();
  if (child < 0) return Fail(Status::FromErrno(errno, "fork"));
  if (child == 0) {
    ::close(p[0]);
    ::setsid();
    *ready_fd = p[1];
    return -1;  // continue as the daemon
  }
  ::close(p[1]);
  char status = 1;
  ssize_t n;
  do {
    n = ::read(p[0], &status, 1);
  } while (n < 0 && errno == EINTR);
  std::_Exit(n == 1 ? status : 1);
}

void ReportReady(int* ready_fd, char status) {
  if (*ready_fd < 0) return;
  (void)!::write(*ready_fd, &status, 1);
  ::close(*ready_fd);
  *ready_fd = -1;
  int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null >= 0) {
    for (int fd = 0; fd <= 2; ++fd) ::dup2(null, fd);
    if (null > 2) ::close(null);
  }
}

sigset_t BlockStopSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  ::pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

}  // namespace qcow2kit::cli
