"""Start and stop an NBD server for the tests/test_nbd_*.py scripts (Python standard library).

Two flavours serve an image on a unix socket in a temporary directory:

  ours  qcow2kit serve -k SOCK [-t] -e 4 EXTRA... IMAGE
  peer  qemu-nbd -A -f qcow2 [-t] -e 4 -k SOCK EXTRA... IMAGE

EXTRA are options both programs spell the same way: -r, -x NAME, -D DESC, --discard=unmap,
--cache=writeback, --aio=threads.

``Servers(args, tmp)`` picks the flavours of a run: ``under_test`` is ours, or qemu-nbd when the
script was given ``--peer`` (that validates the cases against QEMU today); ``reference`` is
always qemu-nbd, the differential oracle, serving a copy of the image.

``with servers.under_test(IMAGE, "-r") as srv:`` yields a ``Served`` that unpacks as
``(uri, sock, proc)``. The server is up when the block starts (it accepted a connection, or,
without -t where a probe would count as its one client, its socket is listening). When the
block ends it gets SIGTERM and must exit with status 0 within 30 s, with no sanitizer report on
stderr; then ``qemu-img check`` of the image must be clean and its dirty flag clear.
Keywords of under_test/reference/serve: ``persistent=False`` leaves out -t, ``shared=N``
replaces -e 4, and ``tcp=(ADDR, PORT)`` listens there (-b ADDR -p PORT; the uri is
nbd://ADDR:PORT/NAME and sock is None) instead of on a unix socket.
"""

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import qk_testlib as T

START_TIMEOUT = 20
STOP_TIMEOUT = 30


def parse_args(description):
    """qk_testlib.parse_args plus ``--peer`` (run the cases with qemu-nbd as the server under
    test), which is taken out of sys.argv first."""
    peer = "--peer" in sys.argv[1:]
    sys.argv = [a for a in sys.argv if a != "--peer"]
    args = T.parse_args(description + "\n\n--peer: run the cases against qemu-nbd instead.")
    args.peer = peer
    return args


def export_name(extra):
    """The -x NAME among server options, or "" (the default export)."""
    extra = list(extra)
    for i, a in enumerate(extra):
        if a == "-x" and i + 1 < len(extra):
            return extra[i + 1]
        if a.startswith("--export-name="):
            return a.split("=", 1)[1]
    return ""


def nbd_uri(sock, name=""):
    return f"nbd+unix:///{name}?socket={sock}"


def nbds_uri(sock, certdir, name=""):
    """The TLS form of nbd_uri, with libnbd's client credentials directory (ca-cert.pem,
    client-cert.pem, client-key.pem)."""
    return f"nbds+unix:///{name}?socket={sock}&tls-certificates={certdir}"


def tcp_uri(addr, port, name=""):
    return f"nbd://{addr}:{port}/{name}"


def free_tcp_port(addr="127.0.0.1"):
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def copy_image(src, dst):
    """Copy an image, or a directory holding an image with its backing files."""
    if os.path.isdir(src):
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def check_image_clean(image, what="image"):
    """qemu-img check finds nothing and the dirty flag is clear (v3 images have the flag;
    it is only ever set with lazy refcounts)."""
    res = T.run(["qemu-img", "check", image], timeout=120)
    T.expect_ok(res, f"qemu-img check of the {what} after the server stopped")
    info = T.QemuTools().info(image)
    T.check(info.get("dirty-flag", False) is False,
            f"{what}: dirty flag still set after the server stopped: {info}")


def _listening(sock):
    """Whether a unix socket at this path is listening (from /proc/net/unix, without
    connecting: a connection counts as a client)."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # Num RefCount Protocol Flags Type St Inode [Path]; flag 0x10000 = listening
            if len(parts) >= 8 and parts[7] == sock and int(parts[3], 16) & 0x10000:
                return True
    return False


def _tcp_listening(port):
    """Whether something listens on this local TCP port (from /proc/net/tcp{,6}, without
    connecting)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                # sl local_address rem_address st ...; st 0A = LISTEN
                if len(parts) > 3 and parts[3] == "0A" and \
                        int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def _accepts(sock):
    """Whether a connection succeeds: sock is a unix socket path or an (addr, port) pair."""
    tcp = isinstance(sock, tuple)
    s = socket.socket(socket.AF_INET if tcp else socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(sock)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Served:
    """A running server. Unpacks as (uri, sock, proc)."""

    def __init__(self, kind, argv, image, sock, uri, workdir, tcp=None):
        self.kind, self.argv, self.image = kind, argv, image
        self.sock, self.uri, self.workdir = sock, uri, workdir
        self.tcp = tcp  # (addr, port) of a TCP listener, else None (sock is the listener)
        self.stderr_path = os.path.join(workdir, "stderr")
        self.proc = None
        self._stopped = False

    def __iter__(self):
        return iter((self.uri, self.sock, self.proc))

    @property
    def name(self):
        return "qemu-nbd" if self.kind == "peer" else "qcow2kit serve"

    def stderr(self):
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def cmdline(self):
        return " ".join(self.argv)

    def alive(self):
        return self.proc.poll() is None

    def start(self, persistent):
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                T.fail(f"{self.name} exited ({self.proc.returncode}) before serving:\n"
                       f"$ {self.cmdline()}\n{self.stderr()}")
            if self.tcp is not None:
                if _accepts(self.tcp) if persistent else _tcp_listening(self.tcp[1]):
                    return
            elif os.path.exists(self.sock) and stat.S_ISSOCK(os.stat(self.sock).st_mode) and \
                    (_accepts(self.sock) if persistent else _listening(self.sock)):
                return
            if time.monotonic() > deadline:
                self.kill()
                T.fail(f"{self.name} did not accept connections within {START_TIMEOUT}s:\n"
                       f"$ {self.cmdline()}\n{self.stderr()}")
            time.sleep(0.02)

    def wait_exit(self, timeout=STOP_TIMEOUT, what="exit"):
        """Wait for the server to exit by itself; fail if it does not."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            T.fail(f"{self.name} did not {what} within {timeout}s:\n$ {self.cmdline()}\n"
                   f"{self.stderr()}")

    def stop(self, sig=signal.SIGTERM):
        """Signal the server (if it still runs) and check how it ended: exit 0 within
        STOP_TIMEOUT, no sanitizer report, then the image is clean. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.wait_exit(what=f"exit after {signal.Signals(sig).name}")
        except T.Failure:
            self.kill()
            raise
        err = self.stderr()
        T.check(not any(m in err for m in T.SANITIZER_MARKERS),
                f"{self.name}: sanitizer report on stderr:\n$ {self.cmdline()}\n{err}")
        T.check(rc == 0, f"{self.name} exited with status {rc} (expected 0):\n"
                         f"$ {self.cmdline()}\n{err}")
        check_image_clean(self.image, f"image served by {self.name}")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def server_argv(kind, qcow2kit, sock, image, extra=(), persistent=True, shared=4, tcp=None):
    t = ["-t"] if persistent else []
    e = ["-e", str(shared)]
    where = ["-k", sock] if tcp is None else ["-b", tcp[0], "-p", str(tcp[1])]
    if kind == "ours":
        return [qcow2kit, "serve", *where, *t, *e, *extra, image]
    if kind == "peer":
        return ["qemu-nbd", "-A", "-f", "qcow2", *t, *e, *where, *extra, image]
    raise ValueError(kind)


@contextlib.contextmanager
def serve(kind, image, tmp, qcow2kit=None, extra=(), persistent=True, shared=4, tcp=None):
    """Serve `image` with flavour `kind` ("ours" or "peer") on a socket under `tmp`; see the
    module docstring. persistent=False leaves out -t; tcp=(addr, port) listens there."""
    workdir = tempfile.mkdtemp(prefix=f"srv-{kind}-", dir=tmp)  # servers may run at once
    extra = [str(e) for e in extra]
    if tcp is None:
        sock = os.path.join(workdir, "s")
        uri = nbd_uri(sock, export_name(extra))
    else:
        sock, tcp = None, (tcp[0], int(tcp[1]))
        uri = tcp_uri(*tcp, export_name(extra))
    srv = Served(kind, server_argv(kind, qcow2kit, sock, str(image), extra, persistent, shared,
                                   tcp),
                 str(image), sock, uri, workdir, tcp)
    srv.start(persistent)
    try:
        yield srv
    except BaseException:
        # The case failed already: stop the server, but its first error is the one to report.
        try:
            srv.stop()
        except Exception as e:  # noqa: BLE001
            print(f"# (also, while stopping after the failure: {str(e).splitlines()[0]})")
        finally:
            srv.kill()
        raise
    srv.stop()


class Servers:
    """The flavours of this run: under_test is qcow2kit (qemu-nbd with --peer), reference is
    always qemu-nbd."""

    def __init__(self, args, tmp):
        self.peer = args.peer
        self.qcow2kit = args.qcow2kit
        self.tmp = tmp
        self.kind = "peer" if args.peer else "ours"
        self.name = "qemu-nbd" if args.peer else "qcow2kit serve"

    def under_test(self, image, *extra, **kw):
        return serve(self.kind, image, self.tmp, self.qcow2kit, extra, **kw)

    def reference(self, image, *extra, **kw):
        return serve("peer", image, self.tmp, None, extra, **kw)

    def value(self, ours, qemu):
        """An expectation that differs where qemu-nbd 7.2 departs from the design (§1.5)."""
        return qemu if self.peer else ours

    def check_binary(self, R):
        """Ours: the binary must exist (a failed case otherwise); returns False to stop."""
        if self.peer or T.Qcow2kit(self.qcow2kit).exists():
            return True
        with R.case("qcow2kit-binary-exists"):
            T.fail(f"{self.qcow2kit} does not exist or is not executable")
        return False
