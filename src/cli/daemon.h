// Becoming a daemon that reports when it is ready (qcow2kit serve --fork, ublk add): the
// parent waits on a pipe until the child is serving or has failed, and exits with its status.
#pragma once

#include <signal.h>

namespace qcow2kit::cli {

// Forks. In the parent, waits and exits (never returns). In the child (a new session),
// returns -1 with *ready_fd set for ReportReady; returns >= 0 (an exit status) if the fork
// itself failed. Call before any io_uring ring or thread exists: neither survives fork.
int ForkAndWait(int* ready_fd);

// Tells the waiting parent the status (0: ready) and detaches from the terminal (standard
// descriptors to /dev/null) as a daemon does. Does nothing when not forked (*ready_fd < 0).
void ReportReady(int* ready_fd, char status);

// Blocks SIGINT, SIGTERM and SIGHUP (the signals that stop a server) in the calling thread
// and the threads it starts, and returns that set for signalfd() or sigwait().
sigset_t BlockStopSignals();

}  // namespace qcow2kit::cli
