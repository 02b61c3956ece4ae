#!/usr/bin/env python3
"""Hostile and malformed NBD input against `qcow2kit serve` (docs/nbd-design.md §4 item 6),
from a raw-socket client built on the §1.1 wire layouts.

Handshake: unknown client flags, bad option magic, EOF at every byte of a full handshake,
option length 2^31, a known option over 64 KiB, 4097-byte names, SET/LIST_META_CONTEXT before
STRUCTURED_REPLY, meta context listing and selection, a GO whose lengths do not add up, EXPORT_NAME of an unknown export, unknown options (ERR_UNSUP, parsing
goes on), LIST, INFO, ABORT, STARTTLS without TLS, EXPORT_NAME with and without zeroes.
Transmission: bad magic (drop), READ/WRITE/TRIM/WRITE_ZEROES past the end, lengths 0 and
2^32-1, READ of 64 MiB (EINVAL), WRITE of 64 MiB (drop), unknown command 42, unknown flags,
DF without structured replies, writes on a read-only export, BLOCK_STATUS without a context,
a close in the middle of a WRITE payload (the write must not happen), 10k pipelined READs whose
replies are never read, and well-formed requests (structured READ, DF, BLOCK_STATUS, REQ_ONE)
for contrast. Every case asserts the exact reply of §1.5 or a drop; where qemu-nbd 7.2 departs
from the design (EINVAL instead of EPERM/ENOSPC) the expectation depends on the flavour.

A healthy client writes and reads back patterns on its own connection throughout; at the end
its data must be intact, the server alive, and, after SIGTERM, exit 0 and a clean image.

Run: python3 tests/test_nbd_hostile.py --qcow2kit build/qcow2kit [--peer] [--only SUBSTR]
"""

import contextlib
import fcntl
import os
import socket
import struct
import sys
import termios
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_server as NS  # noqa: E402
import qk_testlib as T  # noqa: E402
from qk_testlib import KiB, MiB  # noqa: E402

# ---- §1.1 - §1.6 constants ---------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1 << 0, 1 << 1

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK_EXPORT, OPT_STARTTLS = 1, 2, 3, 4, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT = 6, 7, 8, 9
OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 10, 11

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_PLATFORM = 0x80000001, 0x80000002, 0x80000003, 0x80000004
ERR_TLS_REQD, ERR_UNKNOWN, ERR_SHUTDOWN = 0x80000005, 0x80000006, 0x80000007
ERR_BLOCK_SIZE_REQD, ERR_TOO_BIG = 0x80000008, 0x80000009
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_SEND_DF, TF_CAN_MULTI_CONN = 32, 64, 128, 256
TF_SEND_CACHE, TF_SEND_FAST_ZERO = 1024, 2048

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS, CMD_RESIZE = 5, 6, 7, 8
CF_FUA, CF_NO_HOLE, CF_DF, CF_REQ_ONE, CF_FAST_ZERO = 1, 2, 4, 8, 16

RF_DONE = 1
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR, CHUNK_ERROR_OFFSET = 0x8001, 0x8002

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP = 1, 5, 12, 22, 28, 75, 95

SIZE = 64 * MiB          # the writable export
HEALTHY_BASE = 48 * MiB  # the healthy client's region: 16 slots of 64 KiB
HEALTHY_SLOTS, SLOT = 16, 64 * KiB
TIMEOUT = 10


class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


# ---- the raw client ----------------------------------------------------------------------

class Reply:
    def __init__(self, handle, structured):
        self.handle = handle
        self.structured = structured
        self.error = 0
        self.message = b""
        self.chunks = []    # (flags, type, payload)
        self.data = None    # READ: the bytes, holes filled with zeros
        self.extents = {}   # BLOCK_STATUS: context id -> [(length, flags)]

    def __repr__(self):
        kinds = [(f, t, len(p)) for f, t, p in self.chunks]
        return (f"Reply(handle={self.handle}, structured={self.structured}, error={self.error}"
                f", message={self.message!r}, chunks={kinds}, extents={self.extents})")


class Client:
    """One NBD connection speaking raw bytes; every helper fails the case on a surprise."""

    def __init__(self, sock_path, timeout=TIMEOUT):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(sock_path)
        self.sr = False
        self.pending = {}   # handle -> (cmd, offset, length)
        self.next_handle = 1
        self.size = self.tflags = None

    def close(self):
        with contextlib.suppress(OSError):
            self.s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- bytes
    def send(self, data):
        self.s.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                got = self.s.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError:
                got = b""
            except socket.timeout:
                T.fail(f"no answer from the server within {self.s.gettimeout()}s "
                       f"(waited for {n - len(buf)} of {n} bytes)")
            if not got:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += got
        return bytes(buf)

    def drain_until_closed(self, timeout=TIMEOUT):
        """Read until the server closes; returns what it still sent. Fails on a timeout."""
        self.s.settimeout(timeout)
        got = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            try:
                b = self.s.recv(1 << 16)
            except ConnectionResetError:
                return bytes(got)
            except socket.timeout:
                b = None
            if b == b"":
                return bytes(got)
            if b:
                got += b
            if time.monotonic() > deadline:
                T.fail(f"the server did not close the connection within {timeout}s "
                       f"(it sent {len(got)} bytes: {bytes(got[:64]).hex()})")

    def expect_drop(self, what, allow_bytes=False):
        """The server must hang up (sending nothing more unless allow_bytes)."""
        got = self.drain_until_closed()
        if got and not allow_bytes:
            T.fail(f"{what}: expected a hard disconnect, got {len(got)} bytes first: "
                   f"{got[:64].hex()}")
        return got

    # -- handshake
    def greeting(self):
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        T.check_eq((magic, opt), (NBDMAGIC, IHAVEOPT), "greeting magics")
        T.check_eq(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, "handshake flags")
        return flags

    def send_client_flags(self, flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
        self.send(struct.pack(">I", flags))

    def send_option(self, opt, data=b"", length=None, magic=IHAVEOPT):
        self.send(struct.pack(">QII", magic, opt, len(data) if length is None else length)
                  + data)

    def option_reply(self, opt):
        magic, ropt, rtype, ln = struct.unpack(">QIII", self.recv_exact(20))
        T.check_eq(magic, OPT_REPLY_MAGIC, "option reply magic")
        T.check_eq(ropt, opt, "option echoed in the reply")
        return rtype, self.recv_exact(ln)

    def option(self, opt, data=b""):
        """Send an option and collect its replies up to ACK or an error:
        returns (final reply type, [(type, data)] of every reply)."""
        self.send_option(opt, data)
        replies = []
        while True:
            rtype, rdata = self.option_reply(opt)
            replies.append((rtype, rdata))
            if rtype == REP_ACK or rtype & 0x80000000:
                return rtype, replies

    def expect_option_error(self, opt, data, err, what):
        """The option must end with reply type `err`: an error as the only reply, or (where
        qemu-nbd accepts what the design refuses) ACK after any number of replies."""
        rtype, replies = self.option(opt, data)
        T.check_eq(hex(rtype), hex(err), f"{what}: reply type")
        if err != REP_ACK:
            T.check_eq(len(replies), 1, f"{what}: number of replies")
        return replies[-1][1]

    def start(self, flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        self.greeting()
        self.send_client_flags(flags)
        return self

    def structured_reply(self):
        rtype, _ = self.option(OPT_STRUCTURED_REPLY)
        T.check_eq(rtype, REP_ACK, "STRUCTURED_REPLY answer")
        self.sr = True

    def set_meta(self, contexts, name=""):
        rtype, replies = self.option(OPT_SET_META_CONTEXT, meta_data(name, contexts))
        T.check_eq(rtype, REP_ACK, f"SET_META_CONTEXT {contexts} answer")
        ids = {}
        for t, d in replies[:-1]:
            T.check_eq(t, REP_META_CONTEXT, "SET_META_CONTEXT reply type")
            ids[d[4:].decode()] = struct.unpack(">I", d[:4])[0]
        return ids

    def go(self, name="", infos=(), opt=OPT_GO):
        """GO (or INFO): returns (final type, {info type: data})."""
        rtype, replies = self.option(opt, info_data(name, infos))
        infos = {}
        for t, d in replies:
            if t == REP_INFO:
                infos[struct.unpack(">H", d[:2])[0]] = d
        if rtype == REP_ACK and INFO_EXPORT in infos:
            self.size, self.tflags = struct.unpack(">QH", infos[INFO_EXPORT][2:12])
        return rtype, infos

    def handshake(self, sr=True, contexts=("base:allocation",), name=""):
        """Fixed newstyle, NO_ZEROES, [SR, SET_META], GO: ready for transmission."""
        self.start()
        if sr:
            self.structured_reply()
            if contexts:
                self.ids = self.set_meta(contexts, name)
        rtype, _ = self.go(name)
        T.check_eq(rtype, REP_ACK, "GO answer")
        return self

    # -- transmission
    def request(self, cmd, offset=0, length=0, flags=0, payload=b"", handle=None):
        if handle is None:
            handle = self.next_handle
            self.next_handle += 1
        self.pending[handle] = (cmd, offset, length)
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length)
                  + payload)
        return handle

    def reply(self):
        """Read one whole reply (a simple reply, or structured chunks up to DONE)."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            T.check(handle in self.pending, f"simple reply for unknown handle {handle}")
            cmd, _off, ln = self.pending.pop(handle)
            r = Reply(handle, False)
            r.error = error
            if cmd == CMD_READ and error == 0:
                r.data = self.recv_exact(ln)
            return r
        T.check_eq(hex(magic), hex(STRUCTURED_REPLY_MAGIC), "reply magic")
        T.check(self.sr, "structured reply without STRUCTURED_REPLY negotiated")
        r = None
        while True:
            if r is not None:
                magic = struct.unpack(">I", self.recv_exact(4))[0]
                T.check_eq(hex(magic), hex(STRUCTURED_REPLY_MAGIC), "chunk magic")
            flags, ctype, handle, ln = struct.unpack(">HHQI", self.recv_exact(16))
            T.check(handle in self.pending, f"chunk for unknown handle {handle}")
            if r is None:
                r = Reply(handle, True)
                cmd, off, rlen = self.pending[handle]
                if cmd == CMD_READ:
                    r.data = bytearray(rlen)
            T.check_eq(handle, r.handle, "handle of the next chunk of a reply")
            payload = self.recv_exact(ln)
            r.chunks.append((flags, ctype, payload))
            self._chunk(r, ctype, payload, off, rlen)
            if flags & RF_DONE:
                del self.pending[handle]
                if r.data is not None:
                    r.data = None if r.error else bytes(r.data)
                return r

    @staticmethod
    def _chunk(r, ctype, p, off, rlen):
        if ctype in (CHUNK_ERROR, CHUNK_ERROR_OFFSET):
            r.error, mlen = struct.unpack(">IH", p[:6])
            r.message = p[6:6 + mlen]
        elif ctype == CHUNK_OFFSET_DATA:
            o = struct.unpack(">Q", p[:8])[0] - off
            T.check(0 <= o and o + len(p) - 8 <= rlen, f"data chunk outside the request: {o}")
            r.data[o:o + len(p) - 8] = p[8:]
        elif ctype == CHUNK_OFFSET_HOLE:
            o, hl = struct.unpack(">QI", p)
            T.check(0 <= o - off and o - off + hl <= rlen and hl > 0, f"bad hole {o} {hl}")
        elif ctype == CHUNK_BLOCK_STATUS:
            cid = struct.unpack(">I", p[:4])[0]
            r.extents[cid] = [struct.unpack(">II", p[i:i + 8]) for i in range(4, len(p), 8)]
        elif ctype != CHUNK_NONE:
            T.fail(f"unknown chunk type {ctype}")

    def call(self, cmd, offset=0, length=0, flags=0, payload=b""):
        h = self.request(cmd, offset, length, flags, payload)
        r = self.reply()
        T.check_eq(r.handle, h, "reply handle")
        return r

    def read(self, offset, length, flags=0):
        r = self.call(CMD_READ, offset, length, flags)
        T.check(r.error == 0, f"READ {offset}+{length} failed: {r}")
        return r.data

    def write(self, offset, data, flags=0):
        r = self.call(CMD_WRITE, offset, len(data), flags, data)
        T.check(r.error == 0, f"WRITE {offset}+{len(data)} failed: {r}")

    def disconnect(self):
        with contextlib.suppress(OSError):
            self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self.close()


def meta_data(name, queries):
    n = name.encode() if isinstance(name, str) else name
    d = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        qb = q.encode() if isinstance(q, str) else q
        d += struct.pack(">I", len(qb)) + qb
    return d


def info_data(name, infos=()):
    n = name.encode() if isinstance(name, str) else name
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + \
        b"".join(struct.pack(">H", i) for i in infos)


# ---- the healthy client ------------------------------------------------------------------

class Healthy(threading.Thread):
    """Writes a new pattern to one of its slots, reads it back, flushes now and then - until
    stopped. Remembers the last pattern of every slot for the final check."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.stop_event = threading.Event()
        self.error = None
        self.rounds = 0
        self.patterns = {}

    def run(self):
        try:
            with Client(self.sock) as c:
                c.handshake()
                i = 0
                while not self.stop_event.is_set():
                    slot, byte = i % HEALTHY_SLOTS, (i * 7) % 255 + 1
                    off = HEALTHY_BASE + slot * SLOT
                    c.write(off, bytes([byte]) * SLOT, CF_FUA if i % 3 == 0 else 0)
                    self.patterns[slot] = byte
                    got = c.read(off, SLOT)
                    if got != bytes([byte]) * SLOT:
                        raise T.Failure(f"healthy client: slot {slot} reads back wrong data")
                    if i % 10 == 9:
                        r = c.call(CMD_FLUSH)
                        if r.error:
                            raise T.Failure(f"healthy client: FLUSH failed: {r}")
                    i += 1
                    self.rounds = i
                    time.sleep(0.005)
                c.disconnect()
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def finish(self):
        self.stop_event.set()
        self.join(30)
        T.check(not self.is_alive(), "healthy client hangs")
        if self.error is not None:
            raise T.Failure(f"healthy client failed during the hostile cases: "
                            f"{type(self.error).__name__}: {self.error}")
        T.check(self.rounds > 10, f"healthy client made only {self.rounds} rounds")


# ---- cases -------------------------------------------------------------------------------

def full_handshake_bytes():
    """What a client sends for flags + SR + SET_META + GO + one READ."""
    b = struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
    b += struct.pack(">QII", IHAVEOPT, OPT_STRUCTURED_REPLY, 0)
    m = meta_data("", ["base:allocation"])
    b += struct.pack(">QII", IHAVEOPT, OPT_SET_META_CONTEXT, len(m)) + m
    g = info_data("", [INFO_BLOCK_SIZE])
    b += struct.pack(">QII", IHAVEOPT, OPT_GO, len(g)) + g
    b += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, 4096)
    return b


def handshake_cases(S, sock):
    """[(name, fn)] of handshake cases against the server on `sock`."""
    cases = []

    def case(fn):
        cases.append(("handshake/" + fn.__name__.replace("_", "-"), fn))
        return fn

    @case
    def unknown_client_flags():
        for flags in (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES | 1 << 2, 0x80000003, 0xFFFFFFFF):
            with Client(sock) as c:
                c.start(flags)
                with contextlib.suppress(OSError):
                    c.send_option(OPT_LIST)
                c.expect_drop(f"client flags 0x{flags:x}")

    @case
    def bad_option_magic():
        with Client(sock) as c:
            c.start()
            c.send_option(OPT_LIST, magic=IHAVEOPT ^ 1)
            c.expect_drop("option with a bad magic")

    @case
    def eof_at_every_byte():
        stream = full_handshake_bytes()
        for cut in range(len(stream)):
            with Client(sock) as c:
                c.greeting()
                c.send(stream[:cut])
                c.s.shutdown(socket.SHUT_WR)
                c.drain_until_closed()  # whatever it answered, it must then hang up

    @case
    def option_length_2_31():
        for opt in (OPT_GO, OPT_LIST, 0x4242):
            with Client(sock) as c:
                c.start()
                c.send_option(opt, length=1 << 31)
                with contextlib.suppress(OSError):
                    c.send(b"\0" * 4096)
                c.expect_drop(f"option {opt} with length 2^31")

    @case
    def names_of_4097_bytes():
        with Client(sock) as c:
            c.start()
            c.structured_reply()
            long = "x" * 4097
            c.expect_option_error(OPT_GO, info_data(long), ERR_INVALID,
                                  "GO with a 4097-byte name")
            c.expect_option_error(OPT_SET_META_CONTEXT, meta_data(long, ["base:allocation"]),
                                  ERR_INVALID, "SET_META_CONTEXT with a 4097-byte name")
            # qemu-nbd 7.2 ignores an over-long query (an unknown leaf) and ACKs
            c.expect_option_error(OPT_SET_META_CONTEXT, meta_data("", ["base:" + "a" * 4092]),
                                  S.value(ERR_INVALID, REP_ACK),
                                  "SET_META_CONTEXT with a 4097-byte query")
            T.check_eq(c.go()[0], REP_ACK, "GO after the rejected options")
            T.check_eq(c.read(0, 512), bytes(512), "READ after GO")

    @case
    def set_meta_before_sr():
        with Client(sock) as c:
            c.start()
            c.expect_option_error(OPT_SET_META_CONTEXT, meta_data("", ["base:allocation"]),
                                  ERR_INVALID, "SET_META_CONTEXT before STRUCTURED_REPLY")
            # The spec says MAY; the design says ERR_INVALID; qemu-nbd 7.2 answers the list
            c.expect_option_error(OPT_LIST_META_CONTEXT, meta_data("", []),
                                  S.value(ERR_INVALID, REP_ACK),
                                  "LIST_META_CONTEXT before STRUCTURED_REPLY")
            c.structured_reply()
            T.check_eq(c.set_meta(["base:allocation"]), {"base:allocation": 0},
                       "SET_META_CONTEXT after SR")

    @case
    def meta_context_options():
        with Client(sock) as c:
            c.start()
            c.structured_reply()
            c.expect_option_error(OPT_STRUCTURED_REPLY, b"", ERR_INVALID,
                                  "a second STRUCTURED_REPLY")
            rtype, replies = c.option(OPT_LIST_META_CONTEXT, meta_data("", []))
            T.check_eq(rtype, REP_ACK, "LIST_META_CONTEXT with no query")
            T.check_eq(sorted(d[4:] for _, d in replies[:-1]),
                       [b"base:allocation", b"qemu:allocation-depth"], "contexts listed")
            rtype, replies = c.option(OPT_LIST_META_CONTEXT, meta_data("", ["qemu:"]))
            T.check_eq([d[4:] for _, d in replies[:-1]], [b"qemu:allocation-depth"],
                       "LIST_META_CONTEXT of the qemu: namespace")
            for opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                c.expect_option_error(opt, meta_data("nope", ["base:allocation"]),
                                      ERR_UNKNOWN, f"option {opt} for an unknown export")
            T.check_eq(c.set_meta(["base:", "nope:x", "base:allocation"]),
                       {"base:allocation": 0}, "SET_META_CONTEXT ignoring what it must")
            T.check_eq(c.set_meta([]), {}, "SET_META_CONTEXT with no query")
            T.check_eq(c.go()[0], REP_ACK, "GO")
            r = c.call(CMD_BLOCK_STATUS, 0, 4096)
            T.check_eq(r.error, EINVAL, f"BLOCK_STATUS after an empty selection: {r}")

    @case
    def option_over_64k():
        with Client(sock) as c:
            c.start()
            # design §2.4: a known option with more than 64 KiB of data is drained and
            # refused with ERR_TOO_BIG; qemu-nbd 7.2 reads it (up to 32 MiB) and answers
            data = info_data("", [INFO_BLOCK_SIZE] * 35000)
            c.expect_option_error(OPT_INFO, data, S.value(ERR_TOO_BIG, REP_ACK),
                                  "INFO carrying 70 KB")
            T.check_eq(c.go()[0], REP_ACK, "GO afterwards")
            T.check_eq(c.read(0, 512), bytes(512), "READ after GO")

    @case
    def go_inconsistent_lengths():
        with Client(sock) as c:
            c.start()
            good = info_data("", [INFO_BLOCK_SIZE])
            bad = [good + b"\0",                                   # one byte too many
                   good[:-1],                                      # one byte short
                   struct.pack(">I", 100) + struct.pack(">H", 0),  # name longer than data
                   struct.pack(">I", 0) + struct.pack(">H", 3)]    # 3 infos, none sent
            for i, data in enumerate(bad):
                c.expect_option_error(OPT_GO, data, ERR_INVALID, f"GO with bad lengths #{i}")
            T.check_eq(c.go()[0], REP_ACK, "GO after the rejected ones")
            T.check_eq(c.read(0, 512), bytes(512), "READ after GO")

    @case
    def go_unknown_export():
        with Client(sock) as c:
            c.start()
            c.expect_option_error(OPT_GO, info_data("no-such-export"), ERR_UNKNOWN,
                                  "GO of an unknown export")
            c.expect_option_error(OPT_INFO, info_data("no-such-export"), ERR_UNKNOWN,
                                  "INFO of an unknown export")
            T.check_eq(c.go()[0], REP_ACK, "GO of the default export afterwards")

    @case
    def export_name_unknown():
        with Client(sock) as c:
            c.start()
            c.send_option(OPT_EXPORT_NAME, b"no-such-export")
            c.expect_drop("EXPORT_NAME of an unknown export")

    @case
    def export_name_zeroes():
        for flags, tail in ((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 0),
                            (FLAG_FIXED_NEWSTYLE, 124)):
            with Client(sock) as c:
                c.start(flags)
                c.send_option(OPT_EXPORT_NAME, b"")
                size, tflags = struct.unpack(">QH", c.recv_exact(10))
                T.check_eq(size, SIZE, "export size after EXPORT_NAME")
                T.check_eq(c.recv_exact(tail), bytes(tail), "padding after EXPORT_NAME")
                T.check(tflags & TF_HAS_FLAGS and not tflags & TF_SEND_DF,
                        f"transmission flags 0x{tflags:x} (no DF without SR)")
                T.check_eq(c.read(4096, 4096), bytes(4096), "READ after EXPORT_NAME")
                c.disconnect()

    @case
    def unknown_option_continues():
        with Client(sock) as c:
            c.start()
            for opt, data in ((0x4242, b"junk" * 100), (OPT_PEEK_EXPORT, b""),
                              (OPT_EXTENDED_HEADERS, b""), (0xFFFFFFFF, b"\0" * 70000)):
                c.expect_option_error(opt, data, ERR_UNSUP, f"unknown option {opt:#x}")
            c.structured_reply()
            c.expect_option_error(OPT_STRUCTURED_REPLY, b"x", ERR_INVALID,
                                  "STRUCTURED_REPLY carrying data")
            T.check_eq(c.go()[0], REP_ACK, "GO after unknown options")
            T.check_eq(c.read(0, 4096), bytes(4096), "READ after GO")

    @case
    def starttls_without_tls():
        with Client(sock) as c:
            c.start()
            c.expect_option_error(OPT_STARTTLS, b"", ERR_POLICY, "STARTTLS without TLS")
            T.check_eq(c.go()[0], REP_ACK, "GO after STARTTLS was refused")

    @case
    def list_exports():
        with Client(sock) as c:
            c.start()
            rtype, replies = c.option(OPT_LIST)
            T.check_eq(rtype, REP_ACK, "LIST answer")
            T.check_eq([t for t, _ in replies], [REP_SERVER, REP_ACK], "LIST reply types")
            d = replies[0][1]
            T.check_eq(struct.unpack(">I", d[:4])[0], 0, "LIST: length of the name")
            c.expect_option_error(OPT_LIST, b"x", ERR_INVALID, "LIST carrying data")
            T.check_eq(c.go()[0], REP_ACK, "GO after LIST")

    @case
    def info_then_go():
        with Client(sock) as c:
            c.start()
            rtype, infos = c.go("", [INFO_NAME, INFO_BLOCK_SIZE, 0x7777], opt=OPT_INFO)
            T.check_eq(rtype, REP_ACK, "INFO answer")
            size, tflags = struct.unpack(">QH", infos[INFO_EXPORT][2:12])
            T.check_eq(size, SIZE, "INFO_EXPORT size")
            T.check_eq(tflags & TF_READ_ONLY, 0, "INFO_EXPORT: read-only flag")
            T.check_eq(struct.unpack(">HIII", infos[INFO_BLOCK_SIZE]),
                       (INFO_BLOCK_SIZE, 1, 4096, 32 * MiB), "INFO_BLOCK_SIZE")
            T.check_eq(infos.get(INFO_NAME, b"\0\x01")[2:], b"", "INFO_NAME")
            # INFO does not enter transmission: more options follow.
            rtype, infos = c.go("", [])
            T.check_eq(rtype, REP_ACK, "GO after INFO")
            T.check(INFO_BLOCK_SIZE in infos, "GO without asking: BLOCK_SIZE is sent anyway")
            T.check_eq(c.read(0, 4096), bytes(4096), "READ after GO")

    @case
    def abort():
        with Client(sock) as c:
            c.start()
            c.send_option(OPT_ABORT)
            got = c.drain_until_closed()
            if got:  # an ACK is optional, but it must be a well-formed one
                T.check_eq(got, struct.pack(">QIII", OPT_REPLY_MAGIC, OPT_ABORT, REP_ACK, 0),
                           "answer to ABORT")

    return cases


def vm_status(pid, key):
    """A size from /proc/PID/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * KiB
    T.fail(f"no {key} for pid {pid}")


def reset_peak_rss(pid):
    """Sets VmHWM back to the current VmRSS (Linux: clear_refs 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def socket_queues(sock):
    """(bytes we sent that the peer has not read, bytes the peer sent that we have not read)."""
    outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    inq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    return outq, inq


def wait_until_connection_settles(sock, what, limit=120, quiet_s=2.0):
    """Returns once the server has stopped moving data on the connection `sock`: what it has
    not read of our requests and what it has sent us that we did not read both stay the same
    for `quiet_s`. That happens when it stops reading (backpressure) or has answered all it
    could; other clients may keep it busy meanwhile. On a loaded machine this only takes
    longer; fails after `limit` s of movement."""
    deadline = time.monotonic() + limit
    last, since = None, time.monotonic()
    while True:
        now = socket_queues(sock)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        if time.monotonic() > deadline:
            T.fail(f"{what}: the connection still moves data after {limit} s (queues {now})")
        time.sleep(0.05)


def transmission_cases(S, srv, ro_srv, v2_srv):
    sock, ro_sock = srv.sock, ro_srv.sock
    cases = []

    def case(fn):
        cases.append(("transmission/" + fn.__name__.replace("_", "-"), fn))
        return fn

    def expect_error(c, err, what, cmd, offset=0, length=0, flags=0, payload=b""):
        r = c.call(cmd, offset, length, flags, payload)
        T.check_eq(r.error, err, f"{what}: error ({r})")
        if c.sr:  # design §1.5: errors after SR come as one ERROR chunk with DONE
            T.check(r.structured and len(r.chunks) == 1 and
                    r.chunks[0][1] in (CHUNK_ERROR, CHUNK_ERROR_OFFSET) and
                    r.chunks[0][0] & RF_DONE, f"{what}: not one ERROR|DONE chunk: {r}")
        return r

    def still_works(c, what):
        T.check_eq(c.read(0, 512), bytes(512), f"READ after {what}")

    @case
    def transmission_flags():
        with Client(sock) as c:
            c.handshake()
            want = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | \
                TF_SEND_WRITE_ZEROES | TF_SEND_DF | TF_CAN_MULTI_CONN | TF_SEND_CACHE | \
                TF_SEND_FAST_ZERO
            T.check_eq(hex(c.tflags), hex(want), "transmission flags (writable, SR, -e 4)")
            T.check_eq(c.size, SIZE, "export size")
        with Client(ro_sock) as c:
            c.handshake()
            want = TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_DF | \
                TF_CAN_MULTI_CONN | TF_SEND_CACHE
            T.check_eq(hex(c.tflags), hex(want), "transmission flags (read-only, SR, -e 4)")

    @case
    def bad_request_magic():
        with Client(sock) as c:
            c.handshake()
            c.send(struct.pack(">IHHQQI", REQUEST_MAGIC ^ 0x100, 0, CMD_READ, 9, 0, 512))
            # qemu first sends an ERROR chunk with handle 0 (design §1.5); we don't
            c.expect_drop("request with a bad magic", allow_bytes=S.peer)

    @case
    def past_the_end():
        with Client(sock) as c:
            c.handshake()
            enospc = S.value(ENOSPC, EINVAL)
            for off, ln in ((SIZE - 512, 1024), (SIZE, 1), (SIZE + 4096, 512),
                            ((1 << 64) - 512, 1024)):
                expect_error(c, EINVAL, f"READ {off}+{ln}", CMD_READ, off, ln)
                expect_error(c, enospc, f"WRITE {off}+{ln}", CMD_WRITE, off, ln,
                             payload=b"\x66" * ln)
                expect_error(c, EINVAL, f"TRIM {off}+{ln}", CMD_TRIM, off, ln)
                expect_error(c, enospc, f"WRITE_ZEROES {off}+{ln}", CMD_WRITE_ZEROES, off, ln)
                expect_error(c, EINVAL, f"CACHE {off}+{ln}", CMD_CACHE, off, ln)
            # The last bytes are fine, and nothing spilled.
            T.check_eq(c.read(SIZE - 512, 512), bytes(512), "READ of the last sector")
            still_works(c, "requests past the end")

    @case
    def zero_lengths():
        with Client(sock) as c:
            c.handshake()
            r = c.call(CMD_READ, 4096, 0)
            T.check_eq((r.error, r.data), (0, b""), f"READ of length 0 ({r})")
            for cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE):
                r = c.call(cmd, 4096, 0)
                T.check_eq(r.error, 0, f"command {cmd} of length 0 ({r})")
            expect_error(c, EINVAL, "BLOCK_STATUS of length 0", CMD_BLOCK_STATUS, 0, 0)
            still_works(c, "zero-length requests")

    @case
    def length_2_32_minus_1():
        big = (1 << 32) - 1
        with Client(sock) as c:
            c.handshake()
            expect_error(c, EINVAL, "READ of 2^32-1", CMD_READ, 0, big)
            expect_error(c, EINVAL, "TRIM of 2^32-1", CMD_TRIM, 0, big)
            expect_error(c, S.value(ENOSPC, EINVAL), "WRITE_ZEROES of 2^32-1",
                         CMD_WRITE_ZEROES, 0, big)
            still_works(c, "2^32-1 lengths")
            c.request(CMD_WRITE, 0, big)
            c.expect_drop("WRITE of 2^32-1 bytes", allow_bytes=S.peer)

    @case
    def read_of_64_mib():
        with Client(sock) as c:
            c.handshake()
            expect_error(c, EINVAL, "READ of 64 MiB", CMD_READ, 0, 64 * MiB)
            T.check_eq(len(c.read(0, 32 * MiB)), 32 * MiB, "READ of 32 MiB (the maximum)")
            still_works(c, "READ of 64 MiB")

    @case
    def write_of_64_mib():
        with Client(sock) as c:
            c.handshake()
            c.request(CMD_WRITE, 0, 64 * MiB)
            with contextlib.suppress(OSError):
                c.send(b"\x55" * MiB)
            c.expect_drop("WRITE of 64 MiB", allow_bytes=S.peer)

    @case
    def unknown_command():
        with Client(sock) as c:
            c.handshake()
            expect_error(c, EINVAL, "command 42", 42, 0, 512)
            expect_error(c, EINVAL, "RESIZE", CMD_RESIZE, 0, 0)
            still_works(c, "unknown commands")

    @case
    def unknown_flags():
        with Client(sock) as c:
            c.handshake()
            expect_error(c, EINVAL, "READ with flag 1<<7", CMD_READ, 0, 512, flags=1 << 7)
            expect_error(c, EINVAL, "READ with flag 1<<15", CMD_READ, 0, 512, flags=1 << 15)
            expect_error(c, EINVAL, "WRITE with FAST_ZERO", CMD_WRITE, 0, 512, CF_FAST_ZERO,
                         payload=b"\x77" * 512)
            expect_error(c, EINVAL, "FLUSH with flag 1<<9", CMD_FLUSH, flags=1 << 9)
            # known flags on commands that do not take them
            expect_error(c, EINVAL, "READ with NO_HOLE", CMD_READ, 0, 512, CF_NO_HOLE)
            expect_error(c, EINVAL, "READ with REQ_ONE", CMD_READ, 0, 512, CF_REQ_ONE)
            expect_error(c, EINVAL, "TRIM with NO_HOLE", CMD_TRIM, 0, 512, CF_NO_HOLE)
            still_works(c, "unknown flags")

    @case
    def flush_with_range():
        with Client(sock) as c:
            c.handshake()
            # design §1.5: EINVAL; qemu-nbd 7.2 ignores offset and length and flushes
            for off, ln in ((0, 512), (4096, 0)):
                r = c.call(CMD_FLUSH, off, ln)
                T.check_eq(r.error, S.value(EINVAL, 0), f"FLUSH {off}+{ln}: {r}")
            T.check_eq(c.call(CMD_FLUSH).error, 0, "FLUSH 0+0")

    @case
    def fast_zero_on_v2():
        with Client(v2_srv.sock) as c:
            c.handshake()
            T.check(c.tflags & TF_SEND_FAST_ZERO, f"no FAST_ZERO: 0x{c.tflags:x}")
            for off, ln in ((0, 64 * KiB), (0, 4096), (2 * MiB, 64 * KiB)):
                expect_error(c, ENOTSUP, f"FAST_ZERO {off}+{ln} on a v2 image",
                             CMD_WRITE_ZEROES, off, ln, CF_FAST_ZERO)
            T.check_eq(c.read(0, MiB), b"\x11" * MiB, "data under the refused FAST_ZERO")
            T.check_eq(c.call(CMD_WRITE_ZEROES, 0, 64 * KiB).error, 0,
                       "WRITE_ZEROES without FAST_ZERO on a v2 image")
            T.check_eq(c.read(0, 128 * KiB), bytes(64 * KiB) + b"\x11" * (64 * KiB),
                       "after WRITE_ZEROES")

    @case
    def df_without_sr():
        with Client(sock) as c:
            c.handshake(sr=False)
            T.check_eq(c.tflags & TF_SEND_DF, 0, "DF advertised without SR")
            r = c.call(CMD_READ, 0, 512, CF_DF)
            T.check_eq((r.structured, r.error), (False, EINVAL), f"READ with DF, no SR: {r}")
            r = c.call(CMD_BLOCK_STATUS, 0, 512)
            T.check_eq((r.structured, r.error), (False, EINVAL),
                       f"BLOCK_STATUS without SR: {r}")
            T.check_eq(c.read(0, 512), bytes(512), "READ (simple reply) afterwards")

    @case
    def writes_on_read_only():
        eperm = S.value(EPERM, EINVAL)
        with Client(ro_sock) as c:
            c.handshake()
            T.check(c.tflags & TF_READ_ONLY, "the -r export is not read-only")
            expect_error(c, eperm, "WRITE on -r", CMD_WRITE, 0, 4096, payload=b"\x99" * 4096)
            expect_error(c, eperm, "TRIM on -r", CMD_TRIM, 0, 4096)
            expect_error(c, eperm, "WRITE_ZEROES on -r", CMD_WRITE_ZEROES, 0, 4096)
            expect_error(c, eperm, "WRITE|FUA on -r", CMD_WRITE, 0, 512, CF_FUA,
                         payload=b"\x99" * 512)
            # The payloads were consumed: the stream is still in sync.
            T.check_eq(c.read(0, 4096), b"\x5a" * 4096, "READ on -r after refused writes")
            T.check_eq(c.call(CMD_FLUSH).error, 0, "FLUSH on -r")

    @case
    def block_status_without_context():
        with Client(sock) as c:
            c.handshake(contexts=())
            expect_error(c, EINVAL, "BLOCK_STATUS without a context", CMD_BLOCK_STATUS, 0,
                         MiB)
            still_works(c, "BLOCK_STATUS without a context")

    @case
    def disconnect_mid_payload():
        off = 8 * MiB
        with Client(sock) as c:
            c.handshake()
            c.write(off, b"\x31" * (64 * KiB), CF_FUA)
        with Client(sock) as c:
            c.handshake()
            c.request(CMD_WRITE, off, 64 * KiB)
            c.send(b"\x32" * (10 * KiB))
        # The cut write must not have happened, not even partially.
        deadline = time.monotonic() + 1
        with Client(sock) as c:
            c.handshake()
            while time.monotonic() < deadline:
                T.check_eq(c.read(off, 64 * KiB), b"\x31" * (64 * KiB),
                           "data under a WRITE whose payload was cut short")
                time.sleep(0.1)

    @case
    def pipelined_reads_never_read():
        # 10k READs of 32 KiB (312 MiB of replies) that are never read: the server must
        # stop reading instead of buffering them (design §2.4: <= ~64 MiB per connection;
        # qemu-nbd has at most 16 requests in flight per client).
        pid = srv.proc.pid
        with Client(sock) as c:
            c.handshake()
            req = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, h,
                                       (h * 32 * KiB) % SIZE, 32 * KiB)
                           for h in range(1, 10001))
            reset_peak_rss(pid)
            rss0 = vm_status(pid, "VmRSS")
            c.s.settimeout(3)  # the server may stop reading (backpressure): then give up
            with contextlib.suppress(socket.timeout, OSError):
                c.s.sendall(req)
            # Judged when the server has settled on this connection (stopped reading, or
            # answered all it could), by its peak: not by a sample at some moment after.
            wait_until_connection_settles(c.s, "10k unread READs")
            grown = vm_status(pid, "VmHWM") - rss0
            T.check(grown < 160 * MiB, f"{S.name} grew by {grown // MiB} MiB holding the "
                                       f"replies of a client that does not read them")
            # Others are served while the flood's replies wait (the client's timeout
            # bounds the wait).
            with Client(sock) as other:
                other.handshake()
                still_works(other, "10k unread READs on another connection")

    @case
    def well_formed_requests():
        with Client(sock) as c:
            c.handshake(contexts=("base:allocation", "qemu:allocation-depth"))
            T.check_eq(c.ids, {"base:allocation": 0, "qemu:allocation-depth": 1},
                       "meta context ids")
            c.write(MiB, b"\x42" * 4096)
            r = c.call(CMD_READ, MiB - 4096, 12288)
            T.check_eq(r.data, bytes(4096) + b"\x42" * 4096 + bytes(4096), "structured READ")
            T.check(r.chunks[-1][0] & RF_DONE and
                    all(not f & RF_DONE for f, _, _ in r.chunks[:-1]), f"DONE flags: {r}")
            r = c.call(CMD_READ, MiB - 4096, 12288, CF_DF)
            T.check_eq([t for _, t, _ in r.chunks], [CHUNK_OFFSET_DATA], f"READ with DF: {r}")
            T.check_eq(r.data, bytes(4096) + b"\x42" * 4096 + bytes(4096), "READ with DF")
            r = c.call(CMD_BLOCK_STATUS, MiB - 4096, 12288)
            T.check_eq(r.error, 0, f"BLOCK_STATUS: {r}")
            T.check_eq(sorted(r.extents), [0, 1], "contexts in BLOCK_STATUS")
            for cid, ext in r.extents.items():
                T.check(ext and all(ln > 0 for ln, _ in ext), f"context {cid}: {ext}")
                T.check(sum(ln for ln, _ in ext[:-1]) < 12288, f"context {cid}: {ext}")
            # flags at the written 4k: data in base:allocation, local in allocation-depth
            found = {}
            for cid, ext in r.extents.items():
                p = MiB - 4096
                for ln, fl in ext:
                    if p <= MiB < p + ln:
                        found[cid] = fl
                    p += ln
            T.check_eq(found, {0: 0, 1: 1}, "status of the written block")
            r = c.call(CMD_BLOCK_STATUS, 0, SIZE, CF_REQ_ONE)
            T.check(all(len(e) == 1 and e[0][0] <= SIZE for e in r.extents.values()),
                    f"REQ_ONE: {r}")
            r = c.call(CMD_BLOCK_STATUS, 0, 4096, CF_FUA)
            T.check_eq(r.error, 0, f"BLOCK_STATUS with FUA (accepted on every command): {r}")
            T.check_eq(c.read(MiB, 4096, CF_FUA), b"\x42" * 4096, "READ with FUA")
            for cmd, flags in ((CMD_FLUSH, 0), (CMD_TRIM, 0), (CMD_WRITE_ZEROES, CF_NO_HOLE),
                               (CMD_WRITE_ZEROES, CF_FAST_ZERO), (CMD_CACHE, 0),
                               (CMD_WRITE_ZEROES, CF_FUA)):
                off, ln = (0, 0) if cmd == CMD_FLUSH else (2 * MiB, 64 * KiB)
                r = c.call(cmd, off, ln, flags)
                T.check_eq(r.error, 0, f"command {cmd} flags {flags}: {r}")
            T.check_eq(c.read(2 * MiB, 64 * KiB), bytes(64 * KiB), "after WRITE_ZEROES")
            c.request(CMD_DISC)
            c.expect_drop("DISC")

    return cases


def build(q, tmp):
    rw = q.create(os.path.join(tmp, "rw.qcow2"), SIZE, lazy_refcounts="on")
    ro = q.create(os.path.join(tmp, "ro.qcow2"), SIZE, lazy_refcounts="on")
    q.io(ro, ["write -P 0x5a 0 1M"])
    v2 = q.create(os.path.join(tmp, "v2.qcow2"), SIZE, compat="0.10")  # no zero clusters
    q.io(v2, ["write -P 0x11 0 1M"])
    return rw, ro, v2


def main():
    args = NS.parse_args(__doc__)
    # AddressSanitizer keeps freed memory in a quarantine (256 MiB by default), which the
    # flood case would count as the server's: keep it small for the servers started here.
    os.environ["ASAN_OPTIONS"] = ":".join(
        filter(None, [os.environ.get("ASAN_OPTIONS"), "quarantine_size_mb=16"]))
    R = T.Runner(args, "test_nbd_hostile")
    S = NS.Servers(args, R.tmp)
    if not S.check_binary(R):
        R.finish()
    imgs = R.setup("images", build, T.QemuTools(), R.tmp)
    if imgs is None:
        R.finish()
    rw, ro, v2 = imgs
    healthy = None
    try:
        with S.under_test(rw) as srv, S.under_test(ro, "-r") as ro_srv, \
                S.under_test(v2) as v2_srv:
            healthy = Healthy(srv.sock)
            healthy.start()
            for name, fn in handshake_cases(S, srv.sock) + \
                    transmission_cases(S, srv, ro_srv, v2_srv):
                with R.case(name):
                    fn()
                    T.check(srv.alive() and ro_srv.alive() and v2_srv.alive(),
                            "a server died")
            with R.case("healthy-client-unharmed"):
                healthy.finish()
                T.check(srv.alive(), "the server died")
            with R.case("server-still-serves"):
                with Client(srv.sock) as c:
                    c.handshake()
                    T.check_eq(c.read(HEALTHY_BASE, 4096)[:1],
                               bytes([healthy.patterns[0]]), "healthy slot 0 over a new "
                               "connection")
    except T.Failure as e:  # the start or the stop of a server (exit status, image check)
        with R.case("server-start-stop"):
            raise e
    else:
        with R.case("server-start-stop"):
            pass
    if healthy is not None and healthy.patterns:
        with R.case("healthy-data-after-stop"):
            T.QemuTools().io(rw, [f"read -P {b} {HEALTHY_BASE + s * SLOT} {SLOT}"
                                  for s, b in sorted(healthy.patterns.items())])
    R.finish()


if __name__ == "__main__":
    main()
