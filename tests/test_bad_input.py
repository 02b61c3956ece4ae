#!/usr/bin/env python3
"""Hostile images: qcow2kit must refuse them cleanly.

Every image here is a copy of a valid qemu-img image with a few bytes poked (reference §1).
For each one `qcow2kit info`, `map`, `read` and `dump --all` must end with the exit status
decided below (1 = error, 0 = the damage is in something that command does not need), and an
error must come with a stderr message containing one of the expected keywords. Never a
death by signal, a sanitizer report or a hang (30 s timeout).

Decisions (what "does not need" means here):
  * header-level damage (magic, version, cluster_bits, header_length, table offsets/sizes
    in the header, unknown incompatible features, extensions, backing name, snapshot table,
    bitmaps extension) is validated when the image is opened: every command exits 1;
  * a damaged L1 entry: `info` exits 0; `map`, whole-image `read` and `dump --all` (which
    dumps the L2 tables) exit 1; `read` of ranges under other L1 entries still works;
  * a damaged L2 entry / compressed descriptor / subcluster bitmap: `info` exits 0, `read` of
    that cluster exits 1 naming the offset, reads elsewhere work; `dump --all` only prints the
    entry (exit 0); `map` exits 1 where the entry itself is invalid (unaligned, reserved bits,
    bad bitmap) and 0 where only the data it points to is bad (past EOF, bad payload);
  * the corrupt bit: read-only commands work (exit 0) and info reports "corrupt": true;
  * backing trouble (loop, missing file): `info` and `dump` do not open backing files (exit
    0), `info --backing-chain`, `map` and `read` exit 1.
Commands are run as `info --output=json -f qcow2`, `map --output=json -f qcow2`,
`read -f qcow2 --sha256` and `dump -f qcow2 --all` (with -f qcow2 so that nothing is probed as
raw, which is what qemu-img would do with a file that is not qcow2).

Then a deterministic fuzz loop: 200 (2000 with --long) single-byte/word mutations of the
first clusters of a small valid image (fixed seed); `info` and `read --sha256` (and every 20th
time `map` and `dump --all`) must exit 0 or 1 (1 with a message), never crash or hang.

Run: python3 tests/test_bad_input.py --qcow2kit build/qcow2kit [--long] [--only SUBSTR]
"""

import os
import random
import shutil
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qk_testlib as T  # noqa: E402
from qk_testlib import KiB, MiB  # noqa: E402

TIMEOUT = 30

COMMANDS = {
    "info": ["info", "--output=json", "-f", "qcow2"],
    "map": ["map", "--output=json", "-f", "qcow2"],
    "read": ["read", "-f", "qcow2", "--sha256"],
    "dump": ["dump", "-f", "qcow2", "--all"],
}


class E:
    """Expected outcome of one command: exit status and (for errors) stderr keywords."""

    def __init__(self, rc, *keywords):
        self.rc = rc
        self.keywords = keywords


OK = E(0)
TRUNC_KW = ("header", "truncated", "short", "too small", "end of file", "eof", "empty",
            "magic", "size")


def all_fail(*kw):
    return {c: E(1, *kw) for c in COMMANDS}


# --------------------------------------------------------------------------------------
# Base images
# --------------------------------------------------------------------------------------

class Bases:
    """Valid images made once by qemu-img/qemu-io, copied for each case."""

    # 4 KiB clusters, 6 MiB: three L1 entries (each maps 2 MiB), one L2 table each.
    G4K_CMDS = ["write -P 0x11 0 8k",
                "write -P 0x22 2101248 8k",        # 2M+4k: under L1[1]
                "write -c -P 0x44 2162688 4k",     # 2M+64k: compressed, under L1[1]
                "write -P 0x33 4M 4k",             # under L1[2]
                "write -z 4198400 4k"]             # zero cluster under L1[2]

    def __init__(self, q, d):
        self.q = q
        self.d = d
        self.g4k = self._make("g4k.qcow2", 6 * MiB, self.G4K_CMDS, cluster_size=4096)
        self.g4k_zstd = self._make("g4k-zstd.qcow2", 6 * MiB, self.G4K_CMDS, cluster_size=4096,
                                   compression_type="zstd")
        self.g64k = self._make("g64k.qcow2", 1 * MiB,
                               ["write -P 0x11 0 64k", "write -P 0x22 256k 128k"])
        self.gext = self._make("gext.qcow2", 1 * MiB,
                               ["write -P 0x55 64k 2k", "write -P 0x66 0 64k"],
                               extended_l2="on")
        self.gsnap = self._make("gsnap.qcow2", 1 * MiB, ["write -P 0x11 0 64k"])
        q.img("snapshot", "-c", "snap1", self.gsnap)
        q.io(self.gsnap, ["write -P 0x12 0 4k"])
        self.gbitmap = self._make("gbitmap.qcow2", 1 * MiB, ["write -P 0x11 0 64k"])
        q.img("bitmap", "--add", self.gbitmap, "bm0")
        # The fuzz target: 512 B clusters, 64 KiB: header, reftable, refblock, L1, L2s, data,
        # a compressed cluster and a zero cluster all within the first clusters.
        self.gfuzz = self._make("gfuzz.qcow2", 64 * KiB,
                                ["write -P 0x11 0 1536", "write -P 0x22 33000 3000",
                                 "write -c -P 0x33 40960 512", "write -z 48k 1k",
                                 "write -P 0x44 65000 536"], cluster_size=512)
        # External data file (absolute name: qemu resolves relative ones against the cwd).
        self.gdata = os.path.join(d, "gdata.qcow2")
        q.create(self.gdata, 1 * MiB, cluster_size=4096, data_file=self.gdata + ".data")
        q.io(self.gdata, ["write -P 0x77 0 8k", "write -P 0x78 64k 4k"])
        # A second fuzz target: 16 KiB clusters with extended L2 entries, zstd compressed
        # clusters, an internal snapshot and a bitmap (its first 8 clusters hold them all).
        self.gfuzz2 = self._make("gfuzz2.qcow2", 256 * KiB,
                                 ["write -P 0x11 0 5k", "write -c -P 0x22 32k 16k",
                                  "write -z 66k 8k", "write -P 0x33 200k 3k"],
                                 cluster_size=16384, extended_l2="on", compression_type="zstd")
        q.img("snapshot", "-c", "s", self.gfuzz2)
        q.io(self.gfuzz2, ["write -P 0x44 1k 2k"])
        q.img("bitmap", "--add", self.gfuzz2, "b")
        self.refs = {}
        for name in ("g4k", "g64k", "gext", "gsnap", "gbitmap", "gfuzz", "gdata"):
            path = getattr(self, name)
            self.refs[name] = q.to_raw(path, path + ".raw")

    def _make(self, name, size, cmds, **opts):
        path = os.path.join(self.d, name)
        self.q.create(path, size, **opts)
        self.q.io(path, cmds)
        return path


def copy(src, dst):
    shutil.copyfile(src, dst)
    return dst


# --------------------------------------------------------------------------------------
# The cases: name, builder(bases, path) -> path, expectations, extra checks
# --------------------------------------------------------------------------------------

def l1_entry_off(path, index):
    return T.read_header(path)["l1_table_offset"] + 8 * index


CASES = []


def case(name, expect, extra=None):
    def deco(fn):
        CASES.append((name, fn, expect, extra or []))
        return fn
    return deco


# Range-read checks: ("read", offset, length, expect, ref_name or None)
def rr(off, ln, expect, ref="g4k"):
    return ("range", off, ln, expect, ref)


# -- truncation ------------------------------------------------------------------------

@case("empty-file", all_fail(*TRUNC_KW))
def _(b, p):
    open(p, "wb").close()
    return p


@case("truncated-50-bytes", all_fail(*TRUNC_KW))
def _(b, p):
    copy(b.g64k, p)
    os.truncate(p, 50)
    return p


@case("truncated-half-v3-header", all_fail(*TRUNC_KW))
def _(b, p):
    copy(b.g64k, p)
    os.truncate(p, 90)          # v2 part complete, v3 fields cut
    return p


@case("truncated-header-only", all_fail("L1", "refcount", "end of file", "eof", "truncated",
                                        "past", "beyond", "outside", "short"))
def _(b, p):
    copy(b.g64k, p)
    os.truncate(p, 64 * KiB)    # cluster 0 only: reftable, refblock, L1, L2 all gone
    return p


# -- header fields ---------------------------------------------------------------------

@case("bad-magic", all_fail("magic", "not a qcow2", "not in qcow2"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, magic=0x514649FA)
    return p


@case("version-1", all_fail("version"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, version=1)
    return p


@case("version-4", all_fail("version"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, version=4)
    return p


@case("cluster-bits-8", all_fail("cluster"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, cluster_bits=8)
    return p


@case("cluster-bits-22", all_fail("cluster"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, cluster_bits=22)
    return p


@case("l1-size-huge", all_fail("L1"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, l1_size=0x7FFFFFFF)
    return p


@case("l1-size-too-small", all_fail("L1"))
def _(b, p):
    copy(b.g4k, p)
    T.set_header(p, l1_size=2)        # 6 MiB needs 3 entries
    return p


@case("l1-offset-unaligned", all_fail("L1"))
def _(b, p):
    copy(b.g64k, p)
    h = T.read_header(p)
    T.set_header(p, l1_table_offset=h["l1_table_offset"] + 512)
    return p


@case("l1-offset-past-eof", all_fail("L1"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, l1_table_offset=1 << 40)
    return p


@case("refcount-table-past-eof", all_fail("refcount"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, refcount_table_offset=1 << 40)
    return p


@case("refcount-table-unaligned", all_fail("refcount"))
def _(b, p):
    copy(b.g64k, p)
    h = T.read_header(p)
    T.set_header(p, refcount_table_offset=h["refcount_table_offset"] + 4096)
    return p


@case("refcount-table-clusters-0", all_fail("refcount"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, refcount_table_clusters=0)
    return p


@case("refcount-table-clusters-huge", all_fail("refcount"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, refcount_table_clusters=0x7FFFFFFF)
    return p


@case("refcount-order-7", all_fail("refcount"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, refcount_order=7)
    return p


@case("header-length-96", all_fail("header"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, header_length=96)
    return p


@case("header-length-past-cluster", all_fail("header"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, header_length=0x20000)
    return p


@case("header-length-unaligned", all_fail("header"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, header_length=109)
    return p


@case("compression-type-mismatch", all_fail("compress"))
def _(b, p):
    copy(b.g64k, p)
    T.poke(p, 104, ">B", 1)     # zstd in the field but incompatible bit 3 clear
    return p


@case("compression-type-unknown", all_fail("compress"))
def _(b, p):
    copy(b.g64k, p)
    T.poke(p, 104, ">B", 7)
    h = T.read_header(p)
    T.set_header(p, incompatible_features=h["incompatible_features"] | (1 << 3))
    return p


@case("unknown-incompat-bit5", all_fail("feature"))
def _(b, p):
    copy(b.g4k, p)              # 4 KiB clusters: no feature-name table
    T.set_header(p, incompatible_features=1 << 5)
    return p


@case("unknown-incompat-bit5-named", all_fail("frobnication"))
def _(b, p):
    copy(b.g64k, p)
    # Rename the table's entry for incompatible bit 4 (unused here) to describe bit 5.
    t = [e for e in T.read_extensions(p) if e[0] == T.EXT_FEATURE_TABLE]
    T.check(t, "base image has no feature-name table")
    _, off, ln = t[0]
    for i in range(ln // 48):
        typ, bit = T.peek(p, off + 48 * i, ">B"), T.peek(p, off + 48 * i + 1, ">B")
        if typ == 0 and bit == 4:
            T.poke_bytes(p, off + 48 * i, bytes([0, 5]) + b"frobnication".ljust(46, b"\0"))
            break
    else:
        T.fail("no entry for incompatible bit 4 in the feature table")
    T.set_header(p, incompatible_features=1 << 5)
    return p


@case("unknown-autoclear-bit", {c: OK for c in COMMANDS})
def _(b, p):
    copy(b.g64k, p)             # unknown autoclear bits are ignored by readers
    T.set_header(p, autoclear_features=1 << 7)
    return p


@case("unknown-compat-bit", {c: OK for c in COMMANDS})
def _(b, p):
    copy(b.g64k, p)             # unknown compatible bits are ignored
    T.set_header(p, compatible_features=1 << 9)
    return p


@case("corrupt-bit", {c: OK for c in COMMANDS}, extra=[("info-corrupt-true",),
                                                      rr(0, 64 * KiB, OK, "g64k")])
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, incompatible_features=1 << 1)
    return p


@case("backing-name-length-2000", all_fail("backing"))
def _(b, p):
    copy(b.g64k, p)
    T.poke_bytes(p, 1024, b"x" * 2000)
    T.set_header(p, backing_file_offset=1024, backing_file_size=2000)
    return p


@case("backing-name-past-cluster", all_fail("backing"))
def _(b, p):
    copy(b.g64k, p)
    T.set_header(p, backing_file_offset=64 * KiB - 10, backing_file_size=100)
    return p


@case("extension-past-cluster", all_fail("extension"))
def _(b, p):
    copy(b.g64k, p)
    off = T.ext_header_offset(p, T.EXT_FEATURE_TABLE)
    T.check(off is not None, "no feature table extension")
    T.poke(p, off + 4, ">I", 0x10000)
    return p


@case("backing-format-extension-too-long", all_fail("extension", "backing", "format"))
def _(b, p):
    copy(b.g64k, p)
    # A backing-format extension longer than any format name, with a backing file set.
    off = T.ext_header_offset(p, T.EXT_FEATURE_TABLE)
    T.poke_bytes(p, off, struct.pack(">II", T.EXT_BACKING_FORMAT, 200) + b"q" * 200 +
                 bytes(8 - 200 % 8 if 200 % 8 else 0) + struct.pack(">II", 0, 0))
    T.poke_bytes(p, 2048, b"base.qcow2")
    T.set_header(p, backing_file_offset=2048, backing_file_size=10)
    return p


@case("snapshot-table-past-eof", all_fail("snapshot"))
def _(b, p):
    copy(b.gsnap, p)
    T.set_header(p, snapshots_offset=1 << 40)
    return p


@case("snapshot-table-unaligned", all_fail("snapshot"))
def _(b, p):
    copy(b.gsnap, p)
    h = T.read_header(p)
    T.set_header(p, snapshots_offset=h["snapshots_offset"] + 8)
    return p


@case("nb-snapshots-huge", all_fail("snapshot"))
def _(b, p):
    copy(b.gsnap, p)
    T.set_header(p, nb_snapshots=0xFFFFFFFF)
    return p


@case("bitmaps-ext-nb-bitmaps-0", all_fail("bitmap"))
def _(b, p):
    copy(b.gbitmap, p)
    off = T.ext_header_offset(p, T.EXT_BITMAPS)
    T.check(off is not None, "no bitmaps extension in the base image")
    T.poke(p, off + 8, ">I", 0)
    return p


@case("bitmaps-ext-bad-length", all_fail("bitmap", "extension"))
def _(b, p):
    copy(b.gbitmap, p)
    off = T.ext_header_offset(p, T.EXT_BITMAPS)
    T.check(off is not None, "no bitmaps extension in the base image")
    T.poke(p, off + 4, ">I", 16)
    return p


# -- L1 entries (g4k: L1[1] maps guest [2 MiB, 4 MiB)) -----------------------------------

L1_KW = ("L1", "L2")
# dump shows a bad L1 entry (marked INVALID) instead of failing: it is an inspection tool.
L1_EXPECT = {"info": OK, "map": E(1, *L1_KW), "read": E(1, *L1_KW), "dump": OK}
L1_EXTRA = [rr(0, 8 * KiB, OK), rr(4 * MiB, 8 * KiB, OK), rr(2 * MiB + 4096, 4096, E(1, *L1_KW)),
            ("range-names-offset", 2 * MiB + 4096, 4096)]


@case("l1-entry-reserved-bits", L1_EXPECT, L1_EXTRA)
def _(b, p):
    copy(b.g4k, p)
    o = l1_entry_off(p, 1)
    T.poke(p, o, ">Q", T.peek(p, o, ">Q") | (1 << 57))
    return p


@case("l1-entry-past-eof", L1_EXPECT, L1_EXTRA)
def _(b, p):
    copy(b.g4k, p)
    T.poke(p, l1_entry_off(p, 1), ">Q", (1 << 63) | (1 << 40))
    return p


@case("l1-entry-unaligned", L1_EXPECT, L1_EXTRA)
def _(b, p):
    copy(b.g4k, p)
    o = l1_entry_off(p, 1)
    T.poke(p, o, ">Q", T.peek(p, o, ">Q") + 512)
    return p


# -- L2 entries (g4k: guest 2 MiB + 4 KiB) -----------------------------------------------

BAD_GUEST = 2 * MiB + 4096
L2_KW = ("L2", "cluster", "offset")
L2_EXPECT = {"info": OK, "map": E(1, *L2_KW), "read": E(1, *L2_KW), "dump": OK}
L2_EXTRA = [rr(0, 8 * KiB, OK), rr(4 * MiB, 8 * KiB, OK), rr(BAD_GUEST + 4096, 4096, OK),
            rr(BAD_GUEST, 4096, E(1, *L2_KW)), ("range-names-offset", BAD_GUEST + 100, 10)]


def poke_l2(p, guest, fn):
    loc = T.l2_entry_location(p, guest)
    T.poke(p, loc, ">Q", fn(T.peek(p, loc, ">Q")))


@case("l2-entry-unaligned", L2_EXPECT, L2_EXTRA)
def _(b, p):
    copy(b.g4k, p)
    poke_l2(p, BAD_GUEST, lambda v: v + 512)
    return p


@case("l2-entry-reserved-bits", L2_EXPECT, L2_EXTRA)
def _(b, p):
    copy(b.g4k, p)
    poke_l2(p, BAD_GUEST, lambda v: v | (1 << 57))
    return p


# Like QEMU (whose file layer zero-fills reads past the end of a file), a data cluster past
# the end of the file reads as zeros; `check` is what reports it. Reads elsewhere are intact.
@case("l2-entry-past-eof", {"info": OK, "map": OK, "read": OK, "dump": OK},
      [rr(0, 8 * KiB, OK), rr(4 * MiB, 8 * KiB, OK), rr(BAD_GUEST + 4096, 4096, OK),
       ("map-still-reports", BAD_GUEST)])
def _(b, p):
    copy(b.g4k, p)
    poke_l2(p, BAD_GUEST, lambda v: (1 << 63) | (1 << 40))
    return p


@case("l2-zero-flag-in-v2", {"info": OK, "map": E(1, *L2_KW, "zero"), "read": E(1, *L2_KW, "zero"),
                             "dump": OK},
      [rr(0, 64 * KiB, OK, "g64k"), rr(256 * KiB, 4096, E(1, *L2_KW, "zero"), "g64k")])
def _(b, p):
    copy(b.g64k, p)
    # Make a v2 image (72-byte header, no extensions) and set the zero flag on an entry.
    T.set_header(p, version=2)
    T.poke_bytes(p, 72, bytes(64 * KiB - 72))
    poke_l2(p, 256 * KiB, lambda v: v | 1)
    return p


# -- compressed clusters (g4k: guest 2 MiB + 64 KiB) -------------------------------------

COMP_GUEST = 2 * MiB + 64 * KiB
COMP_KW = ("compress", "inflate", "zstd", "deflate", "zlib")
COMP_EXPECT = {"info": OK, "map": OK, "read": E(1, *COMP_KW), "dump": OK}
COMP_EXTRA = [rr(0, 8 * KiB, OK), rr(BAD_GUEST, 8 * KiB, OK),
              rr(COMP_GUEST + 1000, 10, E(1, *COMP_KW)),
              ("range-names-offset", COMP_GUEST + 1000, 10)]


def compressed_descriptor(p, guest):
    loc = T.l2_entry_location(p, guest)
    v = T.peek(p, loc, ">Q")
    T.check(v & (1 << 62), f"entry {v:#x} at {loc:#x} is not compressed")
    cb = T.read_header(p)["cluster_bits"]
    x = 70 - cb
    host = v & ((1 << x) - 1) & ((1 << 56) - 1)
    nsec = ((v >> x) & ((1 << (cb - 8)) - 1)) + 1
    return loc, v, x, host, nsec


@case("compressed-past-eof", COMP_EXPECT, COMP_EXTRA)
def _(b, p):
    copy(b.g4k, p)
    loc, v, x, host, nsec = compressed_descriptor(p, COMP_GUEST)
    T.poke(p, loc, ">Q", (v & ~((1 << x) - 1)) | (1 << 40) | 123)
    return p


def garbage_payload(src):
    def build(b, p):
        copy(getattr(b, src), p)
        loc, v, x, host, nsec = compressed_descriptor(p, COMP_GUEST)
        # 0xff: deflate block type 3 (reserved) / not a zstd frame magic.
        T.poke_bytes(p, host, b"\xff" * (nsec * 512 - host % 512))
        return p
    return build


CASES.append(("compressed-garbage-zlib", garbage_payload("g4k"), COMP_EXPECT, COMP_EXTRA))
CASES.append(("compressed-garbage-zstd", garbage_payload("g4k_zstd"), COMP_EXPECT, COMP_EXTRA))


@case("compressed-in-datafile-image", {"info": OK, "map": E(1, "compress"),
                                       "read": E(1, "compress"), "dump": OK},
      [rr(0, 8 * KiB, OK, "gdata"), rr(8 * KiB, 4096, E(1, "compress"), "gdata")])
def _(b, p):
    # qcow2 forbids compressed clusters in an image with an external data file.
    copy(b.gdata, p)
    loc = T.l2_entry_location(p, 8 * KiB)
    T.check(T.peek(p, loc, ">Q") == 0, "guest 8 KiB should be unallocated in the base")
    T.poke(p, loc, ">Q", (1 << 62) | 0x3000)
    return p


# -- extended L2 (gext: 64 KiB clusters, guest cluster 1 has subcluster 0 allocated) ------

EXT_KW = ("subcluster", "bitmap", "L2")
EXT_GUEST = 64 * KiB


@case("extl2-alloc-and-zero-bit", {"info": OK, "map": E(1, *EXT_KW), "read": E(1, *EXT_KW),
                                   "dump": OK},
      [rr(0, 64 * KiB, OK, "gext"), rr(EXT_GUEST, 2048, E(1, *EXT_KW), "gext"),
       ("range-names-offset", EXT_GUEST + 10, 10)])
def _(b, p):
    copy(b.gext, p)
    loc = T.l2_entry_location(p, EXT_GUEST)
    bm = T.peek(p, loc + 8, ">Q")
    T.check(bm & 1, f"subcluster 0 not allocated in bitmap {bm:#x}")
    T.poke(p, loc + 8, ">Q", bm | (1 << 32))
    return p


@case("extl2-alloc-bit-without-cluster", {"info": OK, "map": E(1, *EXT_KW),
                                          "read": E(1, *EXT_KW), "dump": OK},
      [rr(0, 64 * KiB, OK, "gext"), rr(2 * EXT_GUEST + 100, 100, E(1, *EXT_KW), "gext")])
def _(b, p):
    copy(b.gext, p)
    loc = T.l2_entry_location(p, EXT_GUEST) + 16    # guest cluster 2: unallocated
    T.poke_bytes(p, loc, struct.pack(">QQ", 0, 1))   # no host cluster, subcluster 0 "allocated"
    return p


# -- backing files -----------------------------------------------------------------------

BACKING_KW = ("backing", "loop", "cycle", "recursive", "chain")
BACKING_EXPECT = {"info": OK, "map": E(1, *BACKING_KW), "read": E(1, *BACKING_KW), "dump": OK}


@case("backing-loop", BACKING_EXPECT, [("chain-fails", BACKING_KW)])
def _(b, p):
    d = os.path.dirname(p)
    a = os.path.basename(p)
    bn = "loop-b.qcow2"
    b.q.create(bn, 1 * MiB, cwd=d, backing=a, backing_fmt="qcow2", unsafe=True)
    b.q.create(a, 1 * MiB, cwd=d, backing=bn, backing_fmt="qcow2", unsafe=True)
    return p


@case("backing-self-loop", BACKING_EXPECT, [("chain-fails", BACKING_KW)])
def _(b, p):
    d = os.path.dirname(p)
    a = os.path.basename(p)
    b.q.create(a, 1 * MiB, cwd=d, backing="./" + a, backing_fmt="qcow2", unsafe=True)
    return p


@case("backing-missing", {"info": OK, "map": E(1, "no-such-base.qcow2"),
                          "read": E(1, "no-such-base.qcow2"), "dump": OK},
      [("chain-fails", ("no-such-base.qcow2",))])
def _(b, p):
    d = os.path.dirname(p)
    b.q.create(os.path.basename(p), 1 * MiB, cwd=d, backing="no-such-base.qcow2",
               backing_fmt="qcow2", unsafe=True)
    return p


# --------------------------------------------------------------------------------------
# Running the cases
# --------------------------------------------------------------------------------------

def names_offset(res, offsets):
    forms = set()
    for o in offsets:
        forms |= {str(o), hex(o), f"{o:#x}".upper().replace("0X", "0x"), f"{o:x}"}
    return any(f in res.err for f in forms)


def check_command(qk, p, cmd, argv, ex):
    res = qk.run(*argv, p, timeout=TIMEOUT)
    if ex.rc == 0:
        T.expect_ok(res, f"`{cmd}` should succeed on this image")
    else:
        T.expect_clean_error(res, ex.keywords, f"`{cmd}` should fail cleanly", rc=ex.rc)


def check_range(qk, bases, p, off, ln, ex, refname, out):
    res = qk.run("read", "-f", "qcow2", "-o", off, "-l", ln, "--output", out, p,
                 timeout=TIMEOUT)
    if ex.rc == 0:
        T.expect_ok(res, "a read away from the damage should work")
        with open(out, "rb") as f:
            got = f.read()
        want = T.read_range(bases.refs[refname], off, ln)
        T.check(got == want, f"read -o {off} -l {ln}: content differs from qemu-img's"
                             f" (first difference at +{T.first_difference(got, want)})")
    else:
        T.expect_clean_error(res, ex.keywords, "a read of the damaged range should fail cleanly",
                             rc=ex.rc)


def relevant_offsets(p, off):
    """Offsets an error about guest offset `off` may reasonably name: the guest offset (or
    its cluster), the L1/L2 entry locations, the L2 table and the host offset."""
    h = T.read_header(p)
    cs = h["cluster_size"]
    cands = {off, off - off % cs}
    try:
        loc = T.l2_entry_location(p, off)
        v = T.peek(p, loc, ">Q")
        cands |= {loc, v & T.L2_OFFSET_MASK, (v & T.L2_OFFSET_MASK) + off % cs}
        if v & (1 << 62):
            x = 70 - h["cluster_bits"]
            cands.add(v & ((1 << x) - 1) & ((1 << 56) - 1))
    except T.Failure:
        pass
    l2e = cs // (16 if h["incompatible_features"] & 16 else 8)
    l1i = (off // cs) // l2e
    v1 = T.l1_entries(p)[l1i]
    cands |= {v1 & T.L1_OFFSET_MASK, h["l1_table_offset"] + 8 * l1i}
    return sorted(cands)


def check_names_offset(qk, p, off, ln, cands):
    res = qk.run("read", "-f", "qcow2", "-o", off, "-l", ln, "--sha256", p, timeout=TIMEOUT)
    T.expect_clean_error(res, (), "read of the damaged range")
    T.check(names_offset(res, cands), "the error message names none of the relevant offsets "
            f"{[hex(c) for c in cands]}:\n" + res.describe())


def check_info_corrupt(qk, p):
    info = qk.json("info", "--output=json", p, timeout=TIMEOUT)
    T.check_eq(info.get("format-specific", {}).get("data", {}).get("corrupt"), True,
               "format-specific.data.corrupt")


def check_chain_fails(qk, p, kws):
    res = qk.run("info", "--backing-chain", "--output=json", p, timeout=TIMEOUT)
    T.expect_clean_error(res, kws, "info --backing-chain should fail cleanly")


def check_map_reports(qk, p, guest):
    m = qk.json("map", "--output=json", "-f", "qcow2", p, timeout=TIMEOUT)
    hit = [e for e in m if e["start"] <= guest < e["start"] + e["length"]]
    T.check(len(hit) == 1 and hit[0].get("data") is True and hit[0].get("offset") == 1 << 40,
            f"map entry for guest {guest}: {hit}")


def queue_case(R, qk, bases, name, build, expect, extra):
    """Build one hostile image and queue its cases (run concurrently later)."""
    pre = f"bad/{name}"
    d = os.path.join(R.tmp, name)
    os.makedirs(d)
    p = R.setup(pre, build, bases, os.path.join(d, f"{name}.qcow2"))
    if p is None:
        return
    for cmd, argv in COMMANDS.items():
        R.defer(f"{pre}/{cmd}", check_command, qk, p, cmd, argv, expect.get(cmd, OK))
    for i, x in enumerate(extra):
        kind = x[0]
        if kind == "range":
            _, off, ln, ex, refname = x
            R.defer(f"{pre}/read-range-{off}+{ln}", check_range, qk, bases, p, off, ln, ex,
                    refname, os.path.join(d, f"range{i}.out"))
        elif kind == "range-names-offset":
            _, off, ln = x
            R.defer(f"{pre}/read-error-names-offset", check_names_offset, qk, p, off, ln,
                    relevant_offsets(p, off))
        elif kind == "info-corrupt-true":
            R.defer(f"{pre}/info-shows-corrupt", check_info_corrupt, qk, p)
        elif kind == "chain-fails":
            R.defer(f"{pre}/info-backing-chain", check_chain_fails, qk, p, x[1])
        elif kind == "map-still-reports":
            R.defer(f"{pre}/map-reports-cluster", check_map_reports, qk, p, x[1])
        else:
            raise AssertionError(kind)


# --------------------------------------------------------------------------------------
# Fuzzing
# --------------------------------------------------------------------------------------

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 0x200, 0x1FF, 0x10000, 1 << 40, (1 << 63), (1 << 62) | 0x200,
               (1 << 64) - 1, (1 << 63) - 1, 0x8000000000000200]


def mutate(data, rnd, span, hot):
    """Return (new_bytes, description) with one byte or one word changed; most mutations
    hit metadata (the `hot` (offset, length) ranges), the others anywhere in the first
    `span` bytes."""
    buf = bytearray(data)
    kind = rnd.choice(["byte", "byte", "bit", "u16", "u32", "u32", "u64", "u64"])

    def pick(width=1):
        if rnd.random() < 0.8:              # a metadata structure, then a byte in it
            start, ln = rnd.choice(hot)
            off = start + rnd.randrange(ln)
        else:
            off = rnd.randrange(span)
        return min(off, span - width) & ~(width - 1)
    if kind in ("byte", "bit"):
        off = pick()
        old = buf[off]
        buf[off] = (old ^ (1 << rnd.randrange(8))) if kind == "bit" else rnd.randrange(256)
        return bytes(buf), f"{kind} at {off}: {old:#04x} -> {buf[off]:#04x}"
    width = {"u16": 2, "u32": 4, "u64": 8}[kind]
    off = pick(width)
    if rnd.random() < 0.6:
        val = rnd.choice(INTERESTING) & ((1 << (8 * width)) - 1)
    else:
        val = rnd.getrandbits(8 * width)
    fmt = {2: ">H", 4: ">I", 8: ">Q"}[width]
    old = struct.unpack_from(fmt, buf, off)[0]
    struct.pack_into(fmt, buf, off, val)
    return bytes(buf), f"{kind} at {off}: {old:#x} -> {val:#x}"


def fuzz_one(qk, p, i, desc):
    cmds = [COMMANDS["info"] + [p], COMMANDS["read"] + [p]]
    if i % 20 == 0:
        cmds += [COMMANDS["map"] + [p], COMMANDS["dump"] + [p]]
    for argv in cmds:
        res = qk.run(*argv, timeout=TIMEOUT)
        if res.crashed or res.rc not in (0, 1) or (res.rc == 1 and not res.err.strip()):
            T.fail(f"mutation {desc} (seed {FUZZ_SEED:#x}, iteration {i}; the image is {p}, "
                   "kept with --keep):\n" + res.describe())
    os.unlink(p)


FUZZ_SEED = 0x5EED


def queue_fuzz(R, qk, bases, iterations):
    targets = []
    for path in (bases.gfuzz, bases.gfuzz2):
        with open(path, "rb") as f:
            orig = f.read()
        hot = T.metadata_ranges(path)
        span = min(len(orig), max(o + ln for o, ln in hot))  # up to the last metadata
        targets.append((os.path.basename(path), orig, span, hot))
    rnd = random.Random(FUZZ_SEED)
    d = os.path.join(R.tmp, "fuzz")
    os.makedirs(d)
    for i in range(iterations):
        name, orig, span, hot = targets[i % len(targets)]
        data, desc = mutate(orig, rnd, span, hot)
        desc = f"{name}: {desc}"
        p = os.path.join(d, f"fuzz-{i:04d}.qcow2")
        with open(p, "wb") as f:
            f.write(data)
        R.defer(f"fuzz/{i:04d}", fuzz_one, qk, p, i, desc)


def show_qemu(bases, tmp):
    """Debug aid (--show-qemu): what qemu-img does with each hostile image."""
    for name, build, _expect, _extra in CASES:
        d = os.path.join(tmp, "qemu-" + name)
        os.makedirs(d)
        try:
            p = build(bases, os.path.join(d, f"{name}.qcow2"))
        except Exception as e:  # noqa: BLE001
            print(f"{name}: build failed: {e}")
            continue
        outs = []
        for argv in (["info", "-f", "qcow2", p], ["map", "--output=json", "-f", "qcow2", p],
                     ["convert", "-f", "qcow2", "-O", "raw", p, p + ".raw"]):
            res = T.run(["qemu-img", *argv], timeout=30)
            outs.append(f"{argv[0]}={res.rc} {res.err.strip()[:150]!r}")
        print(f"{name}:\n    " + "\n    ".join(outs))


def main():
    extra_flag = "--show-qemu" in sys.argv
    if extra_flag:
        sys.argv.remove("--show-qemu")
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_bad_input")
    qk = T.Qcow2kit(args.qcow2kit)
    bdir = os.path.join(R.tmp, "bases")
    os.makedirs(bdir)
    bases = R.setup("bases", Bases, T.QemuTools(), bdir)
    if bases is None:
        R.finish()
    if extra_flag:
        show_qemu(bases, R.tmp)
        R.finish()
    if not qk.exists():
        with R.case("qcow2kit-binary-exists"):
            T.fail(f"{args.qcow2kit} does not exist or is not executable")
        R.finish()
    for name, build, expect, extra in CASES:
        if args.only and args.only not in f"bad/{name}/":
            continue
        R.setup(f"queue/{name}", queue_case, R, qk, bases, name, build, expect, extra)
    if not args.only or args.only.startswith("fuzz"):
        queue_fuzz(R, qk, bases, 2000 if args.long else 200)
    R.run_deferred()
    R.finish()


if __name__ == "__main__":
    main()
