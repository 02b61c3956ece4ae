#!/usr/bin/env python3
"""Lifecycle and options of `qcow2kit serve` (docs/nbd-design.md §2.4, §2.5, §4 item 7).

  fork        --fork --pid-file F: the command exits 0 only once the socket listens; the pid
              file holds the pid of the live server; SIGTERM to it ends it and removes the
              socket and the pid file; the server no longer holds the caller's stdin, stdout
              and stderr (else `$(...)` or a captured run waits for the daemon); --fork with an
              image that cannot be opened exits 1 with the message.
  activation  socket activation as libnbd does it (LISTEN_PID/LISTEN_FDS=1, fd 3):
              `nbdinfo --json -- [ SERVER -r IMG ]` and `nbdcopy SRC -- [ SERVER IMG ]`; the
              server exits when the tool leaves and the image is clean. Also by hand with -t:
              two clients in turn, then SIGTERM.
  clients     without -t the server exits 0 when its last client leaves (not its first);
              -e 1 keeps a second client waiting (no greeting) until the first leaves.
  signals     SIGINT and SIGHUP shut down cleanly like SIGTERM (exit 0, qemu-img check clean,
              dirty flag clear, acknowledged data kept), also with a client idle in
              transmission; SIGTERM with clients idle in the handshake (connected and silent,
              client flags only, half an option header) exits within 5 s.
  time limit  a client that does not finish the handshake is dropped after 10 s (§2.4).
  zeroes      --detect-zeroes=off keeps an all-zero WRITE as data, =on makes it a zero
              cluster, =unmap (with --discard=unmap) a zero cluster without a host cluster;
              --discard=ignore keeps the data of a TRIM, --discard=unmap frees it (qemu-img map
              of the image after the stop).
  tcp         -b 127.0.0.1 -p PORT serves nbd://127.0.0.1:PORT (nbdinfo, qemu-io, nbdcopy).
  bad options exit 1 with a message: --cache/--aio/--discard/--detect-zeroes values,
              --detect-zeroes=unmap without --discard=unmap, -e -1, a nonexistent image, a
              socket in a missing directory, a TCP port in use, an image in use by another
              server (read-write and -r: a message about the lock; qemu-io is refused too);
              ours only: -k with -p or -b (qemu-nbd ignores -p/-b next to -k).

Where qemu-nbd 7.2 departs from the design the expectation depends on the flavour: qemu-nbd
leaves its --pid-file behind, and the socket when it cannot open the image. --peer skips the
cases marked "ours only".

Run: python3 tests/test_nbd_lifecycle.py --qcow2kit build/qcow2kit [--peer] [--only SUBSTR]
"""

import contextlib
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_server as NS  # noqa: E402
import qk_testlib as T  # noqa: E402
import test_nbd_hostile as H  # noqa: E402  (the raw-socket client)
from qk_testlib import MiB  # noqa: E402

TIMEOUT = 120
LAZY = {"lazy_refcounts": "on"}
HANDSHAKE_LIMIT = 10  # design §2.4


def tool(*argv, timeout=TIMEOUT, what=None):
    return T.expect_ok(T.run(list(argv), timeout=timeout), what)


def new_image(tmp, size, cmds=(), name="img"):
    d = tempfile.mkdtemp(prefix=f"{name}-", dir=tmp)
    img = T.QemuTools().create(os.path.join(d, "img.qcow2"), size, **LAZY)
    if cmds:
        T.QemuTools().io(img, cmds)
    return img


def qemu_io_uri(uri, cmds):
    return T.QemuTools().io(uri, cmds, fmt="raw")


def server_cmd(S, *args):
    """The server program with its options, no socket (for socket activation)."""
    if S.peer:
        return ["qemu-nbd", "-f", "qcow2", *args]
    return [S.qcow2kit, "serve", *args]


# ---- processes that are not our children (--fork) -------------------------------------

def pid_alive(pid):
    """Alive and not a zombie (pid 1 of a container may never reap the daemon)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_if_alive(pid):
    if pid and pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)


def read_pid_file(path):
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        T.fail(f"no pid file {path}")
    T.check(text.strip().isdigit(), f"pid file {path} holds {text!r}")
    return int(text)


def servers_of(image):
    """Live processes with `image` on their command line."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if image.encode() in f.read().split(b"\0") and pid_alive(int(p)):
                    pids.append(int(p))
    return pids


def run_to_files(argv, workdir, timeout=60):
    """Run a command whose stdio are files (a daemon that kept pipes would hang a captured
    run); returns (exit status, what it printed)."""
    out = os.path.join(workdir, "cmd.out")
    with open(out, "wb") as f:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                             start_new_session=True)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
    with open(out, errors="replace") as f:
        return rc, f.read()


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------

def case_fork(S, tmp):
    img = new_image(tmp, 16 * MiB, name="fork")
    work = os.path.dirname(img)
    sock, pidf = os.path.join(work, "s"), os.path.join(work, "pid")
    argv = NS.server_argv(S.kind, S.qcow2kit, sock, img, ["--fork", "--pid-file", pidf])
    cmd = " ".join(argv)
    pid = None
    try:
        rc, out = run_to_files(argv, work)
        T.check(rc is not None, f"--fork did not return within 60 s:\n$ {cmd}\n{out}")
        # The parent is gone: from here on, the socket must listen and the pid file exist.
        listening = NS._listening(sock)
        pid_exists = os.path.exists(pidf)
        T.check_eq(rc, 0, f"exit status of {cmd}\n{out}")
        T.check(listening, f"--fork returned before the socket listens:\n$ {cmd}")
        T.check(pid_exists, f"--fork returned before the pid file was written:\n$ {cmd}")
        pid = read_pid_file(pidf)
        T.check(pid_alive(pid), f"pid file names {pid}, which is not running")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            T.check(img.encode() in f.read().split(b"\0"),
                    f"pid {pid} of the pid file is not the server of {img}")
        uri = NS.nbd_uri(sock)
        qemu_io_uri(uri, ["write -P 0x3c 1M 64k", "flush"])
        tool("nbdinfo", "--json", uri)
        T.check(pid_alive(pid), "the server ended after its clients left, despite -t")
        os.kill(pid, signal.SIGTERM)
        T.check(wait_gone(pid, NS.STOP_TIMEOUT),
                f"the server {pid} did not end within {NS.STOP_TIMEOUT}s of SIGTERM")
        T.check(not os.path.exists(sock), f"socket {sock} left behind")
        if S.peer:  # qemu-nbd 7.2 leaves its pid file
            T.check(os.path.exists(pidf), "qemu-nbd removed its pid file (it did not before)")
        else:
            T.check(not os.path.exists(pidf), f"pid file {pidf} left behind")
    finally:
        kill_if_alive(pid)
    NS.check_image_clean(img)
    T.QemuTools().io(img, ["read -P 0x3c 1M 64k"])


def case_fork_detaches_stdio(S, tmp):
    """The daemon must not keep the caller's stdout/stderr: $(server --fork ...) and any
    captured run (ctest, subprocess.run(capture_output=True)) wait for EOF on them."""
    img = new_image(tmp, 16 * MiB, name="fork-stdio")
    work = os.path.dirname(img)
    sock, pidf = os.path.join(work, "s"), os.path.join(work, "pid")
    argv = NS.server_argv(S.kind, S.qcow2kit, sock, img, ["--fork", "--pid-file", pidf])
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    pid = None
    try:
        try:
            rc = p.wait(60)
        except subprocess.TimeoutExpired:
            T.fail(f"--fork did not return within 60 s: $ {' '.join(argv)}")
        T.check_eq(rc, 0, f"exit status of {' '.join(argv)}")
        pid = read_pid_file(pidf)
        held = []
        for name, pipe in (("stdout", p.stdout), ("stderr", p.stderr)):
            ready, _, _ = select.select([pipe], [], [], 5)
            if not ready or os.read(pipe.fileno(), 4096) != b"":
                held.append(name)
        if held:
            fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in ("0", "1", "2")
                   if os.path.exists(f"/proc/{pid}/fd/{fd}")}
            T.fail(f"5 s after `{' '.join(argv)}` returned, the server (pid {pid}) still holds "
                   f"the caller's {' and '.join(held)} (its fds 0-2: {fds}); a captured run "
                   "or $(...) waits until the server exits")
        os.kill(pid, signal.SIGTERM)
        T.check(wait_gone(pid, NS.STOP_TIMEOUT), "the server did not end after SIGTERM")
    finally:
        kill_if_alive(pid)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()
    NS.check_image_clean(img)


def case_fork_error(S, tmp):
    work = tempfile.mkdtemp(prefix="fork-error-", dir=tmp)
    sock, pidf = os.path.join(work, "s"), os.path.join(work, "pid")
    missing = os.path.join(work, "no-such-image.qcow2")
    argv = NS.server_argv(S.kind, S.qcow2kit, sock, missing, ["--fork", "--pid-file", pidf])
    rc, out = run_to_files(argv, work)
    T.check_eq(rc, 1, f"exit status of {' '.join(argv)} (an image that does not exist)\n{out}")
    T.check(missing in out or "No such file" in out,
            f"--fork did not pass on the error message: {out!r}")
    if not S.peer:  # qemu-nbd 7.2 listens before it opens the image, and leaves the socket
        T.check(not os.path.exists(sock), "socket left behind")
    T.check(not servers_of(missing), "a server still runs")


def case_activation_nbdinfo(S, tmp):
    img = new_image(tmp, 32 * MiB, ["write -P 0x11 0 1M"], name="act")
    res = tool("nbdinfo", "--json", "--", "[", *server_cmd(S, "-r", img), "]",
               timeout=60, what="nbdinfo with a socket-activated server")
    try:
        info = json.loads(res.out)
    except ValueError as e:
        T.fail(f"nbdinfo printed no JSON ({e}):\n{res.describe()}")
    exp = info["exports"][0]
    T.check_eq((exp["export-size"], exp["is_read_only"]), (32 * MiB, True),
               "export-size, is_read_only")
    T.check(not servers_of(img), f"the server still runs after nbdinfo left: {servers_of(img)}")
    NS.check_image_clean(img)


def case_activation_nbdcopy(S, tmp):
    img = new_image(tmp, 16 * MiB, name="act-copy")
    src = img + ".src.raw"
    with open(src, "wb") as f:
        f.write(random.Random(9).randbytes(4 * MiB))
        f.truncate(16 * MiB)
    tool("nbdcopy", src, "--", "[", *server_cmd(S, img), "]", timeout=60,
         what="nbdcopy into a socket-activated server")
    T.check(not servers_of(img), "the server still runs after nbdcopy left")
    NS.check_image_clean(img)
    tool("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, img,
         what="the source and the image written through socket activation differ")


# Put the listener on fd 3 and exec the server with LISTEN_PID (its own pid) and LISTEN_FDS=1.
ACTIVATE = """import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def case_activation_by_hand(S, tmp):
    """LISTEN_PID/LISTEN_FDS=1 with our own listener as fd 3, -t: two clients one after the
    other, then SIGTERM (exit 0, clean image)."""
    img = new_image(tmp, 16 * MiB, name="act-hand")
    work = os.path.dirname(img)
    path = os.path.join(work, "s")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(8)
    fd = lsock.fileno()
    argv = [sys.executable, "-c", ACTIVATE, str(fd), *server_cmd(S, "-t", img)]
    srv = NS.Served(S.kind, argv, img, path, NS.nbd_uri(path), work)
    with open(srv.stderr_path, "wb") as err:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        srv.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, pass_fds=(fd,), env=env,
                                    start_new_session=True)
    lsock.close()
    try:
        qemu_io_uri(srv.uri, ["write -P 0x21 0 64k"])
        qemu_io_uri(srv.uri, ["read -P 0x21 0 64k"])
        T.check(srv.alive(), f"{S.name} with -t ended after two clients:\n{srv.stderr()}")
    except BaseException:
        srv.kill()
        raise
    srv.stop()


def case_exit_after_last_client(S, tmp):
    with S.under_test(new_image(tmp, 16 * MiB), persistent=False) as srv:
        with H.Client(srv.sock) as first:
            first.handshake()
            tool("nbdinfo", "--json", srv.uri)  # a second client comes and goes
            time.sleep(0.5)
            T.check(srv.alive(), f"{S.name} without -t exited while a client was still "
                                 "connected")
            first.write(0, b"\x7e" * 4096)
            T.check_eq(first.read(0, 4096), b"\x7e" * 4096, "READ of the first client")
            first.disconnect()
        rc = srv.wait_exit(20, "exit after its last client left (no -t)")
        T.check_eq(rc, 0, f"exit status of {S.name} without -t")
    T.QemuTools().io(srv.image, ["read -P 0x7e 0 4k"])


def case_shared_1(S, tmp):
    with S.under_test(new_image(tmp, 16 * MiB), shared=1) as srv:
        with H.Client(srv.sock) as first:
            first.handshake()
            with H.Client(srv.sock) as second:  # connect() succeeds: it waits in the backlog
                ready, _, _ = select.select([second.s], [], [], 1.5)
                T.check(not ready, "-e 1: a second client got bytes while the first is served")
                first.write(4096, b"\x12" * 4096)
                first.disconnect()
                second.s.settimeout(15)
                second.handshake()
                T.check_eq(second.read(4096, 4096), b"\x12" * 4096,
                           "the second client, served once the first left")
                second.disconnect()


def case_signal(S, tmp, sig, idle_client):
    img = new_image(tmp, 16 * MiB, name=f"sig{sig}")
    with S.under_test(img) as srv:
        qemu_io_uri(srv.uri, ["write -P 0x44 2M 1M", "flush"])
        c = None
        if idle_client:
            c = H.Client(srv.sock)
            c.handshake()
            c.write(4 * MiB, b"\x45" * 65536, H.CF_FUA)
        try:
            # The idle client never leaves by itself: a server that waited for it would not
            # exit within stop()'s limit.
            srv.stop(sig)  # exit 0, no sanitizer report, qemu-img check clean, dirty flag clear
            if c is not None:
                c.drain_until_closed(5)
        finally:
            if c is not None:
                c.close()
    cmds = ["read -P 0x44 2M 1M"] + (["read -P 0x45 4M 64k"] if idle_client else [])
    T.QemuTools().io(img, cmds)


def case_sigterm_idle_handshake(S, tmp):
    with S.under_test(new_image(tmp, 16 * MiB)) as srv:
        clients = []
        try:
            silent = H.Client(srv.sock)          # connected, sent nothing
            clients.append(silent)
            flags = H.Client(srv.sock)           # client flags only
            flags.start()
            clients.append(flags)
            half = H.Client(srv.sock)            # half an option header
            half.start()
            half.send(struct.pack(">Q", H.IHAVEOPT))
            clients.append(half)
            time.sleep(0.3)
            srv.proc.send_signal(signal.SIGTERM)
            # A server that let the handshake limit drop these clients first would exit
            # HANDSHAKE_LIMIT s after they connected; one that stops at once has all but a
            # second of that even on a loaded machine.
            limit = HANDSHAKE_LIMIT - 1
            try:
                srv.proc.wait(limit)
            except subprocess.TimeoutExpired:
                T.fail(f"{S.name} did not exit within {limit} s of SIGTERM with clients idle "
                       f"in the handshake:\n{srv.stderr()}")
            for c in clients:
                c.drain_until_closed(5)
        finally:
            for c in clients:
                c.close()
        srv.stop()  # exit status 0, clean image


def case_handshake_time_limit(S, tmp):
    with S.under_test(new_image(tmp, 16 * MiB)) as srv:
        stalls = {"nothing after the greeting": None, "client flags only": b"",
                  "half an option header": struct.pack(">Q", H.IHAVEOPT)}
        clients = {}
        try:
            for what, data in stalls.items():
                c = clients[what] = H.Client(srv.sock, timeout=HANDSHAKE_LIMIT + 10)
                if data is not None:
                    c.start()
                    c.send(data)
            t0 = time.monotonic()
            tool("nbdinfo", "--json", srv.uri, what="nbdinfo while other clients stall")
            for what, c in clients.items():
                try:
                    c.drain_until_closed(max(HANDSHAKE_LIMIT + 10 - (time.monotonic() - t0), 1))
                except T.Failure:
                    T.fail(f"a client that sent {what} is still connected after "
                           f"{time.monotonic() - t0:.0f} s (design §2.4: the handshake has "
                           f"{HANDSHAKE_LIMIT} s)")
        finally:
            for c in clients.values():
                c.close()


def extent_at(entries, off):
    for e in entries:
        if e["start"] <= off < e["start"] + e["length"]:
            return e
    T.fail(f"no map entry at {off}: {entries}")


def case_zeroes(S, tmp, opts, cmd, expect):
    """An image full of data; `cmd` over NBD at [0, 1M); then the map of the image at 0.
    expect: {"data": bool, "zero": bool, "host": bool (an offset is reported)}."""
    img = new_image(tmp, 8 * MiB, ["write -P 0x11 0 4M"], name="zeroes")
    with S.under_test(img, *opts) as srv:
        qemu_io_uri(srv.uri, [cmd, "write -P 0 1M 4k", "flush"])
        qemu_io_uri(srv.uri, ["read -P 0x11 1052672 3141632"])
    e = extent_at(T.QemuTools().map(img), 0)
    got = {"data": e["data"], "zero": e["zero"], "host": "offset" in e}
    T.check_eq(got, expect, f"qemu-img map at 0 after `{cmd}` with {' '.join(opts)} ({e})")
    T.check_eq(extent_at(T.QemuTools().map(img), 2 * MiB)["data"], True,
               "data after the zeroed range")
    reads = ["read -P 0 1M 4k", "read -P 0x11 1052672 3141632"]
    if cmd.startswith("write"):
        reads.append("read -P 0 0 1M")
    T.QemuTools().io(img, reads)


def case_tcp(S, tmp):
    img = new_image(tmp, 16 * MiB, ["write -P 0x51 0 1M"], name="tcp")
    port = NS.free_tcp_port()
    with S.under_test(img, tcp=("127.0.0.1", port)) as srv:
        T.check_eq(srv.uri, f"nbd://127.0.0.1:{port}/", "uri")
        res = tool("nbdinfo", "--json", srv.uri)
        T.check_eq(json.loads(res.out)["exports"][0]["export-size"], 16 * MiB, "export-size")
        qemu_io_uri(srv.uri, ["read -P 0x51 0 1M", "write -P 0x52 2M 64k",
                              "read -P 0x52 2M 64k"])
        out = img + ".out.raw"
        tool("nbdcopy", srv.uri, out)
        tool("qemu-img", "compare", "-f", "raw", "-F", "raw", out, srv.uri,
             what="nbdcopy's copy over TCP and the export differ")
        T.check(not NS._accepts(("127.0.0.2", port)),
                f"-b 127.0.0.1: the server also accepts on 127.0.0.2:{port}")
    T.QemuTools().io(img, ["read -P 0x52 2M 64k"])


def bad_start(S, tmp, opts, keywords, image=None, tcp=None, sock_dir=None):
    """The server must refuse to start: exit 1 within 15 s, a message with a keyword."""
    work = tempfile.mkdtemp(prefix="bad-", dir=tmp)
    img = image or new_image(work, 16 * MiB)
    sock = os.path.join(sock_dir or work, "s")
    argv = NS.server_argv(S.kind, S.qcow2kit, sock, img, opts, tcp=tcp)
    res = T.run(argv, timeout=15)
    if res.timed_out:
        T.fail(f"{S.name} started instead of failing:\n{res.describe()}")
    T.expect_clean_error(res, keywords, f"{S.name} {' '.join(str(o) for o in opts)}")
    if not S.peer:  # qemu-nbd 7.2 listens before it opens the image, and leaves the socket
        T.check(not os.path.exists(sock), f"socket {sock} left behind")
    return res


def case_bad_option(S, tmp, opts, keywords):
    bad_start(S, tmp, opts, keywords)


def case_bad_paths(S, tmp):
    missing = os.path.join(tmp, "no-such-image.qcow2")
    bad_start(S, tmp, [], [missing, "No such file"], image=missing)
    nodir = os.path.join(tmp, "no-such-dir")
    bad_start(S, tmp, [], [nodir, "No such file"], sock_dir=nodir)


def case_port_in_use(S, tmp):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        bad_start(S, tmp, [], ["in use"], tcp=("127.0.0.1", port))


def case_image_locked(S, tmp):
    img = new_image(tmp, 16 * MiB, name="locked")
    with S.under_test(img):
        for extra in ([], ["-r"]):
            res = bad_start(S, tmp, extra, ["lock"], image=img)
            T.check(img in res.err, f"the lock message does not name the image:\n"
                                    f"{res.describe()}")
        res = T.run(["qemu-io", "-f", "qcow2", "-c", "read 0 4k", img], timeout=TIMEOUT)
        T.expect_no_crash(res, "qemu-io on a served image", allowed_rc=(1,))
        T.check("lock" in res.err, f"qemu-io was not refused by the lock:\n{res.describe()}")


BAD_OPTIONS = [  # name, ours only, options, stderr keywords
    ("cache", False, ["--cache=bogus"], ["cache"]),
    ("aio", False, ["--aio=bogus"], ["aio"]),
    ("discard", False, ["--discard=bogus"], ["discard"]),
    ("detect-zeroes", False, ["--detect-zeroes=bogus"], ["detect"]),
    ("detect-zeroes-unmap-without-discard", False, ["--detect-zeroes=unmap"], ["discard"]),
    ("shared-negative", False, ["-e", "-1"], ["shared"]),
    ("k-with-p", True, ["-p", "10809"], ["-p", "port"]),
    ("k-with-b", True, ["-b", "127.0.0.1"], ["-b", "bind"]),
]


def main():
    args = NS.parse_args(__doc__)
    R = T.Runner(args, "test_nbd_lifecycle")
    S = NS.Servers(args, R.tmp)
    if not S.check_binary(R):
        R.finish()
    tmp = R.tmp

    R.defer("lifecycle/handshake-time-limit", case_handshake_time_limit, S, tmp)  # slow
    R.defer("lifecycle/fork-pid-file", case_fork, S, tmp)
    R.defer("lifecycle/fork-detaches-stdio", case_fork_detaches_stdio, S, tmp)
    R.defer("lifecycle/fork-error", case_fork_error, S, tmp)
    R.defer("lifecycle/activation-nbdinfo", case_activation_nbdinfo, S, tmp)
    R.defer("lifecycle/activation-nbdcopy", case_activation_nbdcopy, S, tmp)
    R.defer("lifecycle/activation-by-hand-t", case_activation_by_hand, S, tmp)
    R.defer("lifecycle/exit-after-last-client", case_exit_after_last_client, S, tmp)
    R.defer("lifecycle/shared-1-second-client-waits", case_shared_1, S, tmp)
    R.defer("signals/sigint", case_signal, S, tmp, signal.SIGINT, False)
    R.defer("signals/sighup", case_signal, S, tmp, signal.SIGHUP, False)
    R.defer("signals/sigint-idle-client", case_signal, S, tmp, signal.SIGINT, True)
    R.defer("signals/sighup-idle-client", case_signal, S, tmp, signal.SIGHUP, True)
    R.defer("signals/sigterm-idle-handshake", case_sigterm_idle_handshake, S, tmp)
    write0 = "write -P 0 0 1M"
    R.defer("zeroes/detect-zeroes-off", case_zeroes, S, tmp, ["--detect-zeroes=off"], write0,
            {"data": True, "zero": False, "host": True})
    R.defer("zeroes/detect-zeroes-on", case_zeroes, S, tmp, ["--detect-zeroes=on"], write0,
            {"data": False, "zero": True, "host": True})
    R.defer("zeroes/detect-zeroes-unmap", case_zeroes, S, tmp,
            ["--discard=unmap", "--detect-zeroes=unmap"], write0,
            {"data": False, "zero": True, "host": False})
    R.defer("zeroes/discard-ignore", case_zeroes, S, tmp, ["--discard=ignore"],
            "discard 0 1M", {"data": True, "zero": False, "host": True})
    R.defer("zeroes/discard-unmap", case_zeroes, S, tmp, ["--discard=unmap"],
            "discard 0 1M", {"data": False, "zero": True, "host": False})
    R.defer("tcp/listener", case_tcp, S, tmp)
    for name, ours_only, opts, keywords in BAD_OPTIONS:
        if ours_only and S.peer:
            print(f"# bad-options/{name}: ours only, no peer comparison (qemu-nbd ignores -p/-b next to -k)")
            continue
        R.defer(f"bad-options/{name}", case_bad_option, S, tmp, opts, keywords)
    R.defer("bad-options/missing-image-and-socket-dir", case_bad_paths, S, tmp)
    R.defer("bad-options/tcp-port-in-use", case_port_in_use, S, tmp)
    R.defer("bad-options/image-locked", case_image_locked, S, tmp)
    R.run_deferred()
    R.finish()


if __name__ == "__main__":
    main()
