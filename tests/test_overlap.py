#!/usr/bin/env python3
"""Metadata overlap protection (QEMU's qcow2_pre_write_overlap_check), with qemu-io / qemu-nbd
7.2 as the oracle.

Base images made by qemu-img / qemu-io (2 GiB, data at 0, 1M and 768M so that there are two
L2 tables): 64 KiB clusters v3, v2 (compat=0.10), v2 with a raw backing file (its backing
format extension sits right after the 72-byte v2 header), 4 KiB clusters, extended L2, and
one with an internal snapshot (`qemu-img snapshot -c`, then guest 1M rewritten). Each is
damaged by tests/qcow2_damage.py so that one write lands on metadata:

  l2-at-l1 / l2-at-l2 / l2-at-refblock / l2-at-reftable / l2-at-snapshot-table /
  l2-at-snapshot-l1   an L2 entry (COPIED, so the write is in place) points there;
  l1-at-reftable      an unused L1 entry points at the refcount table: an allocating write
                      in its range writes that "L2 table" back onto the refcount table;
  refcount-zero-l1 / -l2 / -refblock   the refcount of that table is 0: the allocator hands
                      its cluster out for the data of an allocating write.

For each (base, damage):
  write/...    `qcow2kit write -o <off> -l 4096 --pattern 0x33` exits 1 naming the structure
               with QEMU's words; the file differs from a copy taken before only in bytes
               72..79, bit 1 added (on v2, which has no feature bits, QEMU writes nothing:
               neither may we); l1-at-reftable may also change refcount blocks and append the
               new data cluster (QEMU's order: refcounts first). qemu-img info says corrupt;
               a second write is refused naming the corrupt image; `qcow2kit read`,
               `qcow2kit info` and `qemu-io -r` still read the intact data; `qcow2kit check`
               (read-only, the image unchanged) exits as `qemu-img check` of the unwritten
               twin.
  qemu-io/...  qemu-io does the same write on a twin: both refuse it, both mark the image
               corrupt (or not), the files are byte for byte the same (QEMU may append a
               longer zero tail to a new data cluster), a second write fares the same.
  nbd/...      (a subset) `qcow2kit serve` on the damaged image: qemu-io over NBD gets EIO
               for the write, reads of intact data still work, later writes fail; after
               SIGTERM (exit 0) the file is what `write/` expects and what qemu-nbd left of
               a twin. nbd/logs-corruption: the server says why on stderr, as qemu-nbd does.
  control/...  undamaged images (the bases, 512 B clusters with L1 growth by resize and
               refcount-table growth, the snapshot image for shared-L2 copy-on-write):
               allocating writes, rewrites, write-zeroes (with and without unmap) and
               discards at many offsets through `qcow2kit write` (and over NBD), replayed
               with qemu-io on a twin: every command succeeds, the images compare equal,
               `qemu-img check` is clean and nothing is marked corrupt.

Run: python3 tests/test_overlap.py --qcow2kit build/qcow2kit [--only SUBSTR] [-v] [--keep]
"""

import os
import shutil
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_server as NS  # noqa: E402
import qcow2_damage as D  # noqa: E402
import qk_testlib as T  # noqa: E402
from qk_testlib import KiB, MiB  # noqa: E402

GiB = 1 << 30
TIMEOUT = 120
PATTERN = 0x33
CORRUPT = 2  # incompatible feature bit 1
REFUSED_OPEN = ("Image is corrupt; cannot be opened read/write (repair it with "
                "'qcow2kit check -r all')")

qk = None
q = None

# --------------------------------------------------------------------------------------
# Base images
# --------------------------------------------------------------------------------------

BASE_WRITES = ["write -P 0x11 0 64k", "write -P 0x22 1M 128k", "write -P 0x77 768M 64k"]
BASE_CONTENT = [(0, 64 * KiB, 0x11), (1 * MiB, 128 * KiB, 0x22), (768 * MiB, 64 * KiB, 0x77)]


class Base:
    def __init__(self, name, path, content):
        self.name = name
        self.path = path
        self.content = content            # [(off, len, pattern)], later entries win
        self.h = T.read_header(path)
        self.version = self.h["version"]
        self.cs = self.h["cluster_size"]


def make_bases(d):
    bases = {}

    def std(name, **opts):
        p = os.path.join(d, f"{name}.qcow2")
        q.create(p, 2 * GiB, **opts)
        q.io(p, BASE_WRITES)
        bases[name] = Base(name, p, list(BASE_CONTENT))

    std("v3-64k")
    std("v2", compat="0.10")
    std("c4k", cluster_size=4096)
    std("extl2", extended_l2="on")

    raw = os.path.join(d, "backing.raw")
    q.create(raw, 2 * GiB, fmt="raw")
    p = os.path.join(d, "v2-backing.qcow2")
    q.create(p, compat="0.10", backing=raw, backing_fmt="raw")
    q.io(p, BASE_WRITES)
    bases["v2-backing"] = Base("v2-backing", p, list(BASE_CONTENT))

    # An internal snapshot, then guest 1M rewritten: its cluster and the first L2 table are
    # copied (refcount 1, COPIED), the second L2 table (768M) stays shared with the snapshot.
    p = os.path.join(d, "snapshot.qcow2")
    q.create(p, 2 * GiB)
    q.io(p, BASE_WRITES)
    q.img("snapshot", "-c", "s1", p)
    q.io(p, ["write -P 0x66 1M 64k"])
    bases["snapshot"] = Base("snapshot", p, BASE_CONTENT + [(1 * MiB, 64 * KiB, 0x66)])
    return bases


# damage -> what QEMU says it overlaps with
WHAT = {
    "l2-at-l1": "active L1 table",
    "l2-at-l2": "active L2 table",
    "l2-at-refblock": "refcount block",
    "l2-at-reftable": "refcount table",
    "l2-at-snapshot-table": "snapshot table",
    "l2-at-snapshot-l1": "inactive L1 table",
    "l1-at-reftable": "refcount table",
    "refcount-zero-l1": "active L1 table",
    "refcount-zero-l2": "active L2 table",
    "refcount-zero-refblock": "refcount block",
}

COMMON = ["l2-at-l1", "l2-at-l2", "l2-at-refblock", "l2-at-reftable", "l1-at-reftable"]
REFZERO = ["refcount-zero-l1", "refcount-zero-l2", "refcount-zero-refblock"]
MATRIX = {
    "v3-64k": COMMON + REFZERO,
    "v2": COMMON + ["refcount-zero-l2"],
    "v2-backing": ["l2-at-l1"],
    "c4k": COMMON + REFZERO,
    "extl2": COMMON + REFZERO,
    "snapshot": COMMON + ["l2-at-snapshot-table", "l2-at-snapshot-l1", "refcount-zero-l2"],
}
NBD_CASES = [("v3-64k", "l2-at-refblock"), ("v2", "l2-at-l1"), ("c4k", "l1-at-reftable"),
             ("extl2", "l2-at-l2"), ("snapshot", "l2-at-snapshot-l1"),
             ("snapshot", "l2-at-snapshot-table"), ("v3-64k", "refcount-zero-l2")]


class Prepared:
    """A base damaged once (pristine copy kept; every case copies it)."""

    def __init__(self, base, kind, path, dmg):
        self.base, self.kind, self.path, self.dmg = base, kind, path, dmg
        self.what = WHAT[kind]
        self.off = dmg.write_at
        lay = D.parse_layout(path)
        self.refblocks = [e & D.REFT_OFFSET_MASK for _i, _at, e in lay.reftable]
        self.allocating = kind == "l1-at-reftable"

    def copy(self, d, name):
        p = os.path.join(d, name)
        shutil.copyfile(self.path, p)
        return p

    def intact(self):
        """[(off, len, expected bytes)] of the base's content the damage did not touch."""
        bad = list(self.dmg.guest) + [(self.off, 4 * KiB)]
        out = []
        for off, ln, _pat in self.base.content:
            if any(off < b + bl and b < off + ln for b, bl in bad):
                continue
            out.append((off, ln, expected_bytes(self.base.content, off, ln)))
        T.check(out, f"{self.base.name}/{self.kind}: no intact range left to read")
        return out


def expected_bytes(content, off, ln):
    buf = bytearray(ln)
    for o, n, pat in content:
        lo, hi = max(o, off), min(o + n, off + ln)
        if lo < hi:
            buf[lo - off:hi - off] = bytes([pat]) * (hi - lo)
    return bytes(buf)


def uniform_runs(off, data):
    """[(offset, length, byte)] of the runs of one byte value in `data` (read at `off`)."""
    out = []
    i = 0
    while i < len(data):
        j = i
        while j < len(data) and data[j] == data[i]:
            j += 1
        out.append((off + i, j - i, data[i]))
        i = j
    return out


def qemu_reads(prep):
    """qemu-io read -P commands checking every intact range."""
    return [f"read -P {b:#x} {o} {n}" for off, _ln, want in prep.intact()
            for o, n, b in uniform_runs(off, want)]


def prepare(base, kind, d):
    path = os.path.join(d, f"{base.name}-{kind}.qcow2")
    shutil.copyfile(base.path, path)
    dmg = D.damage(kind, path, use_dump=False)
    T.check(dmg.write_at is not None, f"{kind}: the damage gives no guest offset to write")
    return Prepared(base, kind, path, dmg)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def diff_offsets(a, b, limit=64):
    """Offsets (up to `limit`) where two byte strings of the same length differ."""
    out = []
    step = 4096
    for base in range(0, min(len(a), len(b)), step):
        if a[base:base + step] != b[base:base + step]:
            for i in range(base, min(base + step, len(a), len(b))):
                if a[i] != b[i]:
                    out.append(i)
                    if len(out) >= limit:
                        return out
    return out


def in_ranges(off, ranges):
    return any(o <= off < o + n for o, n in ranges)


def check_changes(prep, before, after, who):
    """The file after a refused write against the copy taken before it."""
    what = f"{who}: {prep.base.name}/{prep.kind}"
    v3 = prep.base.version >= 3
    if not prep.allocating:
        T.check_eq(len(after), len(before), f"{what}: file size")
    else:
        T.check(len(after) >= len(before), f"{what}: the file shrank ({len(before)} -> "
                f"{len(after)})")
    allowed = [(72, 8)] if v3 else []
    if prep.allocating:  # the new data cluster's refcount is written before the L2 table
        allowed += [(b, prep.base.cs) for b in prep.refblocks]
    bad = [o for o in diff_offsets(before, after[:len(before)]) if not in_ranges(o, allowed)]
    if bad:
        o = bad[0]
        T.fail(f"{what}: the refused write changed the file at {len(bad)}"
               f"{'+' if len(bad) >= 64 else ''} byte(s) outside "
               f"{'the incompatible features (72..79)' if v3 else 'nothing (v2 has no feature bits; QEMU writes nothing)'}"
               f", first at {o:#x}: {before[o:o + 8].hex()} -> {after[o:o + 8].hex()}")
    old = int.from_bytes(before[72:80], "big")
    new = int.from_bytes(after[72:80], "big")
    if v3:
        T.check_eq(hex(new), hex(old | CORRUPT),
                   f"{what}: incompatible features (only bit 1 added)")


def fmt_specific(path):
    return q.info(path).get("format-specific", {}).get("data", {})


def check_corrupt_flag(prep, path, who):
    data = fmt_specific(path)
    if prep.base.version >= 3:
        T.check_eq(data.get("corrupt"), True, f"{who}: qemu-img info corrupt")
    else:
        T.check(not data.get("corrupt"), f"{who}: v2 image reported corrupt: {data}")


def refused(res, what, who):
    T.expect_clean_error(res, [f"Preventing invalid write on metadata (overlaps with {what})"],
                         f"{who}: the write onto the {what} must fail with EIO naming it")


def qemu_io_refused(res, what, who):
    text = res.text + res.err
    T.check(not res.crashed, f"{who}: qemu-io crashed:\n{res.describe()}")
    T.check("write failed: Input/output error" in text,
            f"{who}: qemu-io did not fail the write with EIO:\n{res.describe()}")
    T.check(f"Preventing invalid write on metadata (overlaps with {what})" in text,
            f"{who}: qemu-io did not name the {what}:\n{res.describe()}")


def same_files(a, b, what):
    """Byte for byte equal, apart from a longer all-zero tail of one of them."""
    da, db = read_file(a), read_file(b)
    n = min(len(da), len(db))
    bad = diff_offsets(da[:n], db[:n])
    if bad:
        o = bad[0]
        T.fail(f"{what}: the files differ at {len(bad)}{'+' if len(bad) >= 64 else ''} "
               f"byte(s), first at {o:#x}: ours {da[o:o + 8].hex()} qemu's {db[o:o + 8].hex()}")
    tail = (da if len(da) > n else db)[n:]
    T.check(not any(tail), f"{what}: sizes {len(da)} (ours) and {len(db)} (qemu's) and the "
            f"longer tail is not all zeros")


def qk_write(path, off, ln=4 * KiB, pattern=PATTERN):
    return qk.run("write", "-o", off, "-l", ln, "--pattern", hex(pattern), path)


# --------------------------------------------------------------------------------------
# Cases on damaged images
# --------------------------------------------------------------------------------------

def case_write(prep, tmp):
    d = tempfile.mkdtemp(prefix=f"w-{prep.base.name}-{prep.kind}-", dir=tmp)
    img = prep.copy(d, "img.qcow2")
    twin = prep.copy(d, "twin.qcow2")
    before = read_file(img)
    who = "qcow2kit write"
    refused(qk_write(img, prep.off), prep.what, who)
    after = read_file(img)  # judged last, so that a bad byte does not hide the rest
    check_corrupt_flag(prep, img, who)
    if prep.base.name == "v2-backing":
        T.check_eq(q.info(img).get("backing-filename-format"), "raw",
                   "backing format after the refused write (the v2 extension at offset 72)")
    if prep.base.version >= 3:
        # Any later read-write open is refused; nothing is written.
        for off in (768 * MiB, 1536 * MiB):
            T.expect_clean_error(qk_write(img, off, pattern=0x44), [REFUSED_OPEN],
                                 "a second write on the corrupt image")
        T.check(read_file(img) == after, "the refused second write changed the file")
    # Read-only use still works.
    for off, ln, want in prep.intact():
        res = qk.ok("read", "-o", off, "-l", ln, "--output", os.path.join(d, "r.bin"), img)
        got = read_file(os.path.join(d, "r.bin"))
        if got != want:
            i = T.first_difference(got, want)
            T.fail(f"qcow2kit read -o {off:#x} -l {ln:#x}: differs at +{i:#x}: "
                   f"{got[i:i + 8].hex()} expected {want[i:i + 8].hex()}\n{res.describe()}")
    q.io(img, qemu_reads(prep), extra=("-r",))
    info = qk.json("info", "--output=json", img)
    if prep.base.version >= 3:
        T.check_eq(info.get("format-specific", {}).get("data", {}).get("corrupt"), True,
                   "qcow2kit info --output=json: corrupt")
    qk.ok("info", img)
    mine = read_file(img)
    ours = qk.run("check", img)
    T.expect_no_crash(ours, "qcow2kit check of the corrupt image", allowed_rc=(0, 1, 2, 3))
    theirs = q.img("check", twin, ok=False)
    T.check_eq(ours.rc, theirs.rc, "qcow2kit check exit code (written image) vs qemu-img "
               f"check (unwritten twin)\n{ours.describe()}\n{theirs.describe()}")
    T.check(read_file(img) == mine, "qcow2kit check without -r changed the image")
    check_changes(prep, before, after, who)


def case_qemu_agrees(prep, tmp):
    d = tempfile.mkdtemp(prefix=f"q-{prep.base.name}-{prep.kind}-", dir=tmp)
    a = prep.copy(d, "ours.qcow2")
    b = prep.copy(d, "qemus.qcow2")
    before = read_file(a)
    refused(qk_write(a, prep.off), prep.what, "qcow2kit write")
    qemu_io_refused(q.io(b, [f"write -P {PATTERN:#x} {prep.off} 4k"], ok=False), prep.what,
                    "qemu-io")
    check_changes(prep, before, read_file(b), "qemu-io (the oracle)")
    T.check_eq(fmt_specific(a).get("corrupt"), fmt_specific(b).get("corrupt"),
               "corrupt in qemu-img info: ours vs qemu's")
    ca, cb = os.path.join(d, "ours.after"), os.path.join(d, "qemus.after")
    shutil.copyfile(a, ca)
    shutil.copyfile(b, cb)
    # A second write elsewhere fares alike (v3: both refuse to open; v2: both write).
    ra = qk_write(a, 768 * MiB, pattern=0x44)
    rb = q.io(b, ["write -P 0x44 768M 4k"], ok=False)
    rb_ok = rb.rc == 0 and "failed" not in rb.text + rb.err
    T.check_eq(ra.rc == 0, rb_ok, f"second write succeeded (ours vs qemu's)\n{ra.describe()}\n"
               f"{rb.describe()}")
    same_files(ca, cb, "after the refused write: ours vs qemu's")


def _served(kind, image, tmp, extra=()):
    workdir = tempfile.mkdtemp(prefix=f"srv-{kind}-", dir=tmp)
    sock = os.path.join(workdir, "s")
    srv = NS.Served(kind, NS.server_argv(kind, qk.path, sock, image, extra), image, sock,
                    NS.nbd_uri(sock), workdir)
    srv.start(True)
    return srv


def _stop(srv):
    """SIGTERM; exit 0 within the timeout, no sanitizer report (the image is damaged:
    nbd_server's clean-image check does not apply)."""
    srv._stopped = True
    if srv.alive():
        srv.proc.send_signal(signal.SIGTERM)
    try:
        rc = srv.wait_exit(what="exit after SIGTERM")
    finally:
        srv.kill()
    err = srv.stderr()
    T.check(not any(m in err for m in T.SANITIZER_MARKERS),
            f"{srv.name}: sanitizer report:\n$ {srv.cmdline()}\n{err}")
    T.check_eq(rc, 0, f"{srv.name} exit status after SIGTERM ({err.strip()[:500]})")
    return err


def nbd_io(uri, cmds):
    return q.io(uri, cmds, fmt="raw", ok=False)


def case_nbd(prep, tmp):
    d = tempfile.mkdtemp(prefix=f"n-{prep.base.name}-{prep.kind}-", dir=tmp)
    img = prep.copy(d, "ours.qcow2")
    ref = prep.copy(d, "qemus.qcow2")
    before = read_file(img)
    srv = _served("ours", img, tmp)
    try:
        res = nbd_io(srv.uri, [f"write -P {PATTERN:#x} {prep.off} 4k"])
        T.check("write failed: Input/output error" in res.text + res.err,
                f"the write onto the {prep.what} over NBD did not fail with EIO:\n"
                f"{res.describe()}")
        T.check(srv.alive(), f"the server died after the write:\n{srv.stderr()}")
        reads = qemu_reads(prep)
        T.expect_ok(nbd_io(srv.uri, reads), "reads of intact data after the refused write")
        res = nbd_io(srv.uri, [f"write -P 0x44 {1536 * MiB} 4k"])
        T.check("write failed" in res.text + res.err,
                f"a later write to the corrupt image over NBD succeeded:\n{res.describe()}")
        T.expect_ok(nbd_io(srv.uri, reads), "reads of intact data after the second write")
    finally:
        err = _stop(srv)
    check_corrupt_flag(prep, img, "qcow2kit serve")
    peer = _served("peer", ref, tmp)
    try:
        nbd_io(peer.uri, [f"write -P {PATTERN:#x} {prep.off} 4k"])
    finally:
        _stop(peer)
    check_changes(prep, before, read_file(img), "qcow2kit serve")
    same_files(img, ref, "after the server stopped: ours vs qemu-nbd's")
    return err


def case_nbd_logs(prep, tmp):
    """qemu-nbd prints `qcow2: Marking image as corrupt: Preventing invalid write on
    metadata (overlaps with ...)` on stderr; the operator of qcow2kit serve must learn why
    the image went corrupt too."""
    d = tempfile.mkdtemp(prefix="log-", dir=tmp)
    img = prep.copy(d, "ours.qcow2")
    srv = _served("ours", img, tmp)
    try:
        nbd_io(srv.uri, [f"write -P {PATTERN:#x} {prep.off} 4k"])
    finally:
        err = _stop(srv)
    want = f"Preventing invalid write on metadata (overlaps with {prep.what})"
    T.check(want in err, f"qcow2kit serve's stderr does not say `{want}` (qemu-nbd does); "
            f"it printed: {err.strip()[:800]!r}")


# --------------------------------------------------------------------------------------
# Control: legitimate writes are never refused
# --------------------------------------------------------------------------------------

def ops_2g(size):
    K, M = KiB, MiB
    return [
        ("P", 0, 4 * K, 0x51),                # rewrite (copy-on-write of a shared cluster)
        ("P", 60 * K, 8 * K, 0x52),           # across a cluster boundary
        ("P", 1 * M + 512, 3000, 0x53),       # unaligned, inside written data
        ("P", 2 * M - 1 * K, 2 * K, 0x54),    # across 2 MiB (an L2 boundary at 4 KiB clusters)
        ("P", 256 * M - 2 * K, 4 * K, 0x55),  # across 256 MiB (extended L2, 64 KiB clusters)
        ("P", 512 * M - 32 * K, 64 * K, 0x56),  # across 512 MiB (64 KiB clusters)
        ("P", 768 * M + 4 * K, 4 * K, 0x57),  # into the L2 table shared with the snapshot
        ("P", 1 * GiB + 7 * K, 100 * K, 0x58),  # a new L2 table
        ("Z", 1 * M + 64 * K, 64 * K),        # zeroes over data
        ("ZU", 0, 64 * K),                    # zeroes, unmapping
        ("D", 768 * M, 64 * K),               # discard over data
        ("P", 1536 * M, 1 * M, 0x5a),
        ("Z", 1536 * M + 4 * K, 8 * K),       # zeroes inside a cluster
        ("D", 1536 * M + 64 * K, 128 * K),
        ("P", 1536 * M + 64 * K, 4 * K, 0x5b),  # allocate again after the discard
        ("ZU", 1 * M, 128 * K),
        ("P", 1 * M + 4 * K, 4 * K, 0x5c),
        ("P", size - 4 * K, 4 * K, 0x5d),     # the last cluster
        ("P", 0, 64 * K, 0x5e),               # allocate again after the unmap
    ]


def qk_op(op):
    kind, off, ln = op[0], op[1], op[2]
    args = ["-o", off, "-l", ln]
    if kind == "P":
        args += ["--pattern", hex(op[3])]
    elif kind == "Z":
        args += ["--zeroes"]
    elif kind == "ZU":
        args += ["--zeroes", "--unmap"]
    elif kind == "D":
        args += ["--discard"]
    return args


def qemu_op(op):
    kind, off, ln = op[0], op[1], op[2]
    return {"P": f"write -P {op[3] if len(op) > 3 else 0:#x} {off} {ln}",
            "Z": f"write -z {off} {ln}", "ZU": f"write -z -u {off} {ln}",
            "D": f"discard {off} {ln}"}[kind]


def run_ops_qk(img, ops):
    for op in ops:
        res = qk.run("write", *qk_op(op), img, timeout=TIMEOUT)
        T.expect_ok(res, f"legitimate write {op[:3]} refused")
        T.check("Preventing" not in res.err, f"overlap message on a legitimate write:\n"
                f"{res.describe()}")


def check_control(ours, qemus, what):
    res = q.img("compare", "-f", "qcow2", "-F", "qcow2", ours, qemus, ok=False)
    T.check_eq(res.rc, 0, f"{what}: qemu-img compare with the qemu-io twin\n{res.describe()}")
    res = q.img("check", ours, ok=False)
    T.check_eq(res.rc, 0, f"{what}: qemu-img check\n{res.describe()}")
    h = T.read_header(ours)
    T.check(not h["incompatible_features"] & CORRUPT, f"{what}: corrupt bit set")
    T.check(not fmt_specific(ours).get("corrupt"), f"{what}: qemu-img info says corrupt")


def case_control(base, tmp):
    d = tempfile.mkdtemp(prefix=f"c-{base.name}-", dir=tmp)
    ours, qemus = os.path.join(d, "ours.qcow2"), os.path.join(d, "qemus.qcow2")
    shutil.copyfile(base.path, ours)
    shutil.copyfile(base.path, qemus)
    ops = ops_2g(base.h["size"])
    run_ops_qk(ours, ops)
    q.io(qemus, [qemu_op(o) for o in ops])
    check_control(ours, qemus, f"control {base.name}")


C512_BEFORE = [("P", 0, 64 * KiB, 0x61), ("P", 1 * MiB - 100, 300, 0x62),
               ("P", 32 * KiB - 1 * KiB, 2 * KiB, 0x63)]  # across an L2 table (32 KiB)
C512_AFTER = [("P", 64 * MiB - 4 * KiB, 24 * MiB, 0x64),   # one process; refcount table grows
              ("P", 100, 1000, 0x65), ("Z", 65 * MiB, 1 * MiB), ("D", 70 * MiB, 2 * MiB),
              ("P", 70 * MiB + 512, 4 * KiB, 0x66), ("ZU", 80 * MiB, 1 * MiB),
              ("P", 128 * MiB - 512, 512, 0x67), ("P", 40 * MiB, 4 * MiB, 0x68),
              ("D", 0, 64 * KiB), ("P", 4 * KiB, 1 * KiB, 0x69)]


def case_control_c512(tmp):
    """512-byte clusters: the L1 table grows (resize 64M -> 128M moves it, freeing the old
    one), then one 24 MiB write makes the refcount table grow (8 MiB of host per table
    cluster) and frees the old table; later allocations may reuse both."""
    d = tempfile.mkdtemp(prefix="c-c512-", dir=tmp)
    ours, qemus = os.path.join(d, "ours.qcow2"), os.path.join(d, "qemus.qcow2")
    for p in (ours, qemus):
        q.create(p, 64 * MiB, cluster_size=512)
    h0 = T.read_header(ours)
    run_ops_qk(ours, C512_BEFORE)
    q.io(qemus, [qemu_op(o) for o in C512_BEFORE])
    qk.ok("resize", ours, 128 * MiB)
    q.img("resize", "-q", qemus, str(128 * MiB))
    h1 = T.read_header(ours)
    T.check(h1["l1_table_offset"] != h0["l1_table_offset"] and h1["l1_size"] > h0["l1_size"],
            f"the L1 table did not move/grow: {h0['l1_table_offset']:#x}/{h0['l1_size']} -> "
            f"{h1['l1_table_offset']:#x}/{h1['l1_size']}")
    run_ops_qk(ours, C512_AFTER)
    q.io(qemus, [qemu_op(o) for o in C512_AFTER])
    h2 = T.read_header(ours)
    T.check(h2["refcount_table_clusters"] > h0["refcount_table_clusters"],
            f"the refcount table did not grow: {h0['refcount_table_clusters']} -> "
            f"{h2['refcount_table_clusters']} cluster(s)")
    check_control(ours, qemus, "control c512")


def case_control_nbd(base_path, size, ops, tmp, name):
    """The same through one long-lived `qcow2kit serve` (tables allocated, grown and freed
    within one process); nbd_server checks exit 0 and a clean image on stop."""
    d = tempfile.mkdtemp(prefix=f"cn-{name}-", dir=tmp)
    ours, qemus = os.path.join(d, "ours.qcow2"), os.path.join(d, "qemus.qcow2")
    if base_path:
        shutil.copyfile(base_path, ours)
        shutil.copyfile(base_path, qemus)
    else:
        for p in (ours, qemus):
            q.create(p, size, cluster_size=512)
    cmds = [qemu_op(o) for o in ops]
    with NS.serve("ours", ours, tmp, qk.path, ("--discard=unmap",)) as srv:
        res = nbd_io(srv.uri, cmds)
        T.check(res.rc == 0 and "failed" not in res.text + res.err,
                f"legitimate writes over NBD failed:\n{res.describe()}")
    q.io(qemus, cmds)
    check_control(ours, qemus, f"control over NBD {name}")


# --------------------------------------------------------------------------------------

def main():
    global qk, q
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_overlap")
    qk = T.Qcow2kit(args.qcow2kit)
    q = T.QemuTools(timeout=TIMEOUT)
    if not qk.exists():
        with R.case("qcow2kit-binary-exists"):
            T.fail(f"{args.qcow2kit} does not exist or is not executable")
        R.finish()
    bdir = os.path.join(R.tmp, "bases")
    os.makedirs(bdir)
    bases = R.setup("bases", make_bases, bdir)
    if bases is None:
        R.finish()
    ddir = os.path.join(R.tmp, "damaged")
    os.makedirs(ddir)
    preps = {}
    for bname, kinds in MATRIX.items():
        for kind in kinds:
            p = R.setup(f"damage/{bname}/{kind}", prepare, bases[bname], kind, ddir)
            if p is not None:
                preps[(bname, kind)] = p

    for (bname, kind), p in preps.items():
        R.defer(f"write/{bname}/{kind}", case_write, p, R.tmp)
        R.defer(f"qemu-io/{bname}/{kind}", case_qemu_agrees, p, R.tmp)
    for key in NBD_CASES:
        if key in preps:
            R.defer(f"nbd/{key[0]}/{key[1]}", case_nbd, preps[key], R.tmp)
    if ("v3-64k", "l2-at-l1") in preps:
        R.defer("nbd/logs-corruption", case_nbd_logs, preps[("v3-64k", "l2-at-l1")], R.tmp)
    for bname in ("v3-64k", "v2", "c4k", "extl2", "snapshot", "v2-backing"):
        R.defer(f"control/{bname}", case_control, bases[bname], R.tmp)
    R.defer("control/c512-l1-and-reftable-growth", case_control_c512, R.tmp)
    R.defer("control/nbd-snapshot", case_control_nbd, bases["snapshot"].path, None,
            ops_2g(2 * GiB), R.tmp, "snapshot")
    R.defer("control/nbd-c512-reftable-growth", case_control_nbd, None, 64 * MiB,
            C512_BEFORE + [("P", 8 * MiB, 24 * MiB, 0x64), ("D", 10 * MiB, 1 * MiB),
                           ("P", 10 * MiB + 4 * KiB, 8 * KiB, 0x6a), ("ZU", 20 * MiB, 1 * MiB),
                           ("P", 60 * MiB, 4 * MiB, 0x6b)], R.tmp, "c512")
    R.run_deferred()
    R.finish()


if __name__ == "__main__":
    main()
