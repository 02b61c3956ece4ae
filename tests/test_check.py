#!/usr/bin/env python3
"""`qcow2kit check` against `qemu-img check` 7.2 as the oracle.

Base images made by qemu-img / qemu-io (64 KiB v3, v2, 512 B clusters, refcount_bits 1 and
64, extended L2, lazy refcounts, compressed clusters, an internal snapshot, a persistent
bitmap, preallocation=metadata) are damaged in named ways by tests/qcow2_damage.py. For each
(base, damage):

  check      the damage makes qemu-img check report what it is meant to (the oracle is
             checked first), guest clusters the damage did not touch still read their
             pattern; `qcow2kit check` and `qemu-img check` (human and json) print the same
             stdout, the same stderr lines (`qemu-img: ` read as `qcow2kit: `) and exit
             alike; the image is not modified.
  r-leaks    `-r leaks` on twin copies (qemu-img repairs one, qcow2kit the other): the same
  r-all      outputs and exit codes; then `qemu-img check` of our copy reports what it
  r-all-json reports of qemu's copy, every intact guest cluster reads its pattern and (where
             qemu's copy is readable) `qemu-img compare` finds both copies equal.

Where qemu-img 7.2 cannot repair a damage (UNREPAIRED below) we match it: same comparisons.
Where its repair fails outright (BETTER below), `-r all` must do better: our copy must then
pass `qemu-img check` with no errors and no leaks, intact data kept. After a refcount rebuild
qemu puts the new refcount structures in the first free clusters, we put them past
everything in use: there the image end offset is masked and ours must be >= qemu's.

Also: clean images of every base (human, json, -q, -U, -f qcow2, -r all), raw images (exit
63), a missing file, usage errors, a locked image with and without -U.

Run:  python3 tests/test_check.py --qcow2kit build/qcow2kit [--only SUBSTR] [-v]
      python3 tests/test_check.py --qcow2kit build/qcow2kit --oracle-only
            (only the qemu side: every damage does what it should to qemu-img check)
"""

import difflib
import os
import re
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qk_testlib as T  # noqa: E402
import qcow2_damage as D  # noqa: E402
from qk_testlib import KiB, MiB  # noqa: E402

GiB = 1 << 30

qk = None
q = None
TMP = None
ORACLE_ONLY = False


# --------------------------------------------------------------------------------------
# Base images
# --------------------------------------------------------------------------------------

# The data every 4 MiB base gets (qemu-io commands) and what the guest then reads:
# (offset, length, pattern), everything else zeros. 2080k..2144k straddles two clusters
# (partial subclusters with extended L2); 3M is written then zeroed without unmapping
# (a zero-alloc cluster on v3).
STD_WRITES = ["write -P 0x11 0 64k", "write -P 0x22 1M 128k", "write -P 0x33 2080k 64k",
              "write -P 0x44 3M 64k", "write -z 3M 64k"]
STD_CONTENT = [(0, 64 * KiB, 0x11), (1 * MiB, 128 * KiB, 0x22), (2080 * KiB, 64 * KiB, 0x33)]


class Base:
    def __init__(self, name, path, content, windows):
        self.name = name
        self.path = path
        self.content = content    # [(off, len, pattern)] later entries win
        self.windows = windows    # [(off, len)] guest ranges probed for intact data
        self.cs = T.read_header(path)["cluster_size"]


def _std(d, name, size=4 * MiB, **opts):
    p = os.path.join(d, f"{name}.qcow2")
    q.create(p, size, **opts)
    q.io(p, STD_WRITES)
    return p


def make_bases(d):
    bases = {}

    def add(name, path, content=STD_CONTENT, windows=((0, 4 * MiB),)):
        bases[name] = Base(name, path, list(content), list(windows))

    add("v3-64k", _std(d, "v3-64k"))
    add("v2", _std(d, "v2", compat="0.10"))
    add("c512", _std(d, "c512", cluster_size=512))
    add("rb1", _std(d, "rb1", refcount_bits=1))
    add("rb64", _std(d, "rb64", refcount_bits=64))
    add("extl2", _std(d, "extl2", extended_l2="on"))
    add("lazy", _std(d, "lazy", lazy_refcounts="on"))
    add("prealloc", _std(d, "prealloc", preallocation="metadata"))

    # Compressed clusters (several per host cluster) plus one normal cluster.
    src = os.path.join(d, "comp-src.qcow2")
    q.create(src, 4 * MiB)
    q.io(src, STD_WRITES[:3])
    comp = os.path.join(d, "compressed.qcow2")
    q.img("convert", "-c", "-O", "qcow2", src, comp)
    q.io(comp, ["write -P 0x44 3M 64k"])
    add("compressed", comp, STD_CONTENT + [(3 * MiB, 64 * KiB, 0x44)])

    # An internal snapshot; then guest 1M is rewritten (its cluster and the first L2 table
    # are copied), the second L2 table (guest 768M) stays shared with the snapshot.
    snap = os.path.join(d, "snapshot.qcow2")
    q.create(snap, 1 * GiB)
    q.io(snap, STD_WRITES[:3] + ["write -P 0x77 768M 64k"])
    q.img("snapshot", "-c", "s1", snap)
    q.io(snap, ["write -P 0x66 1M 64k"])
    add("snapshot", snap, STD_CONTENT + [(768 * MiB, 64 * KiB, 0x77), (1 * MiB, 64 * KiB, 0x66)],
        [(0, 4 * MiB), (768 * MiB, 1 * MiB)])

    # A persistent bitmap with dirty bits stored in a bitmap data cluster.
    bm = _std(d, "bitmap")
    q.img("bitmap", "--add", bm, "b0")
    q.io(bm, ["write -P 0x55 64k 64k"])
    add("bitmap", bm, STD_CONTENT + [(64 * KiB, 64 * KiB, 0x55)])
    return bases


BASE_NAMES = ["v3-64k", "v2", "c512", "rb1", "rb64", "extl2", "lazy", "prealloc",
              "compressed", "snapshot", "bitmap"]

GENERIC = ["v3-64k", "v2", "c512", "rb1", "rb64", "extl2", "lazy", "prealloc", "compressed",
           "snapshot", "bitmap"]

# damage -> bases it is applied to
MATRIX = {
    "leak": GENERIC,
    "refcount-high": ["v3-64k", "v2", "c512", "rb64", "extl2", "prealloc"],
    "refcount-zero-data": GENERIC,
    "refcount-zero-l2": ["v3-64k", "v2", "c512", "rb1", "rb64", "extl2", "snapshot"],
    "copied-cleared-l2": ["v3-64k", "v2", "c512", "rb1", "rb64", "extl2", "snapshot"],
    "copied-cleared-l1": ["v3-64k", "v2", "c512", "rb1", "extl2", "snapshot"],
    "copied-set-shared-l2": ["snapshot"],
    "copied-set-shared-l1": ["snapshot"],
    "reserved-l1": ["v3-64k", "v2", "c512", "rb1", "extl2"],
    "reserved-l2": ["v3-64k", "v2", "c512", "rb64", "extl2"],
    "unaligned-data": ["v3-64k", "v2", "rb1", "extl2", "prealloc"],
    "unaligned-zero-alloc": ["v3-64k", "rb64", "extl2", "lazy", "prealloc"],
    "l2-at-l1": ["v3-64k", "v2", "c512", "rb1", "extl2"],
    "l2-at-refblock": ["v3-64k", "v2", "c512", "rb64", "extl2"],
    "l2-at-reftable": ["v3-64k", "v2", "c512", "rb1", "extl2"],
    "l2-past-eof": ["v3-64k", "v2", "c512", "extl2", "compressed"],
    "reftable-past-eof": ["v3-64k", "v2", "c512", "rb1", "rb64", "snapshot"],
    "reftable-reserved": ["v3-64k", "v2", "c512", "rb64"],
    "refblock-shared": ["v3-64k", "v2", "c512", "rb1", "rb64"],
    "copied-compressed": ["compressed"],
    "snapshot-l1-zeroed": ["snapshot"],
    "snapshot-l1-reserved": ["snapshot"],
    "snapshot-l1-unaligned": ["snapshot"],
    "bitmap-leak": ["bitmap"],
    "dirty-lazy": ["lazy"],
    "corrupt-bit": ["v3-64k", "lazy"],
    "extl2-alloc-and-zero": ["extl2"],
    "extl2-unalloc-bitmap": ["extl2"],
}

# What the damage must make `qemu-img check` (no -r) say: (exit code, stderr substrings).
EXPECT = {
    "leak": (3, ["Leaked cluster"]),
    "refcount-high": (2, ["Leaked cluster", "ERROR OFLAG_COPIED data cluster"]),
    "refcount-zero-data": (2, ["refcount=0 reference=1"]),
    "refcount-zero-l2": (2, ["refcount=0 reference=1", "ERROR OFLAG_COPIED L2 cluster"]),
    "copied-cleared-l2": (2, ["ERROR OFLAG_COPIED data cluster"]),
    "copied-cleared-l1": (2, ["ERROR OFLAG_COPIED L2 cluster"]),
    "copied-set-shared-l2": (2, ["ERROR OFLAG_COPIED data cluster: l2_entry=8"]),
    "copied-set-shared-l1": (2, ["ERROR OFLAG_COPIED L2 cluster: l1_index=1 l1_entry=8"]),
    "reserved-l1": (2, ["ERROR found L1 entry with reserved bits set"]),
    "reserved-l2": (2, ["ERROR found l2 entry with reserved bits set"]),
    "unaligned-data": (2, ["Data cluster is not properly aligned"]),
    "unaligned-zero-alloc": (2, ["Preallocated cluster is not properly aligned"]),
    "l2-at-l1": (2, ["refcount=1 reference=2", "Leaked cluster"]),
    "l2-at-refblock": (2, ["ERROR refcount block 0 refcount=2", "refcount=1 reference=2"]),
    "l2-at-reftable": (2, ["refcount=1 reference=2", "Leaked cluster"]),
    "l2-past-eof": (2, ["exceeding the end of the file by one cluster or more"]),
    "reftable-past-eof": (2, ["is outside image"]),
    "reftable-reserved": (2, ["has reserved bits set"]),
    "refblock-shared": (2, ["refcount=2"]),
    "copied-compressed": (2, ["copied flag must never be set for compressed clusters"]),
    "snapshot-l1-zeroed": (3, ["Leaked cluster", "refcount=2 reference=1"]),
    "snapshot-l1-reserved": (2, ["ERROR found L1 entry with reserved bits set"]),
    "snapshot-l1-unaligned": (2, ["L1 table is not cluster aligned; snapshot table entry"]),
    "bitmap-leak": (3, ["Leaked cluster"]),
    "dirty-lazy": (2, ["refcount=0 reference=1"]),
    "corrupt-bit": (0, []),
    "extl2-alloc-and-zero": (2, ["Allocated cluster has corrupted subcluster allocation"]),
    "extl2-unalloc-bitmap": (2, ["Unallocated cluster has non-zero subcluster allocation"]),
}

# With 1-bit refcounts a cluster referenced twice overflows the in-memory refcount:
# qemu-img reports `ERROR: overflow cluster offset=...` (+ the `Use qemu-img amend` hint),
# counts a corruption, and -r all can neither raise the refcount nor trigger a rebuild.
_OVERFLOW = (2, ["ERROR: overflow cluster offset=", "Use qemu-img amend to increase"])
EXPECT_ON = {
    ("rb1", "l2-at-l1"): _OVERFLOW,
    ("rb1", "l2-at-reftable"): _OVERFLOW,
    ("rb1", "refblock-shared"): _OVERFLOW,
}

# qemu 7.2 leaves these unrepaired; we match it (ordinary twin comparisons; the oracle step
# checks that qemu's `-r all` copy still fails `qemu-img check`). For a later improvement:
#   reserved-l1, reserved-l2, snapshot-l1-reserved   reserved bits reported, entry left
#   unaligned-data        only the refcount of the cluster the offset runs into is raised
#   l2-past-eof           COPIED cleared, the entry past EOF left
#   copied-compressed     COPIED cleared in memory only, never written back
#   snapshot-l1-unaligned snapshot skipped (its clusters "leaked"), its entry left
#   extl2-alloc-and-zero, extl2-unalloc-bitmap   inconsistent subcluster bitmap left
#   rb1: l2-at-l1, l2-at-reftable, refblock-shared   refcount overflow, no rebuild
UNREPAIRED = {"reserved-l1", "reserved-l2", "unaligned-data", "l2-past-eof",
              "copied-compressed", "snapshot-l1-reserved", "snapshot-l1-unaligned",
              "extl2-alloc-and-zero", "extl2-unalloc-bitmap"}
UNREPAIRED_ON = set(EXPECT_ON)

# qemu-img 7.2's `-r all` fails here (it cannot be matched); we must repair.
BETTER = {
    "reftable-reserved":
        "qemu's rebuild trips its own overlap check (`Preventing invalid write on metadata "
        "(overlaps with refcount block)`) and exits 1 with the image marked corrupt; we "
        "must rebuild the refcount structure",
}


def expect(base, kind):
    return EXPECT_ON.get((base.name, kind), EXPECT[kind])


def qemu_unrepaired(base, kind):
    """qemu-img 7.2's `-r all` leaves this damage (or fails on it)."""
    return kind in UNREPAIRED or kind in BETTER or (base.name, kind) in UNREPAIRED_ON

# After a repair, qemu-img closes the read-write image and so re-stores the persistent
# bitmaps: new bitmap tables / data clusters, the old ones freed (the image end offset
# drops). A program that leaves bitmaps alone cannot have the same layout; for the bitmap
# base the post-repair `qemu-img check` comparison is relaxed to the exit code and the
# error/leak counts, and `qemu-img info` must list the same bitmaps.
RESTORES_BITMAPS = {"bitmap"}
# Worse, when its repair fails (`-r leaks` on a damage that needs a rebuild, exit 1) qemu
# still re-stores the bitmaps on close, allocating from the broken refcounts: the new
# bitmap data lands on a guest cluster whose refcount the damage zeroed (guest data
# destroyed, `ERROR cluster 5 refcount=1 reference=2` afterwards). We must not copy that:
# after a failed repair our copy must check as the damaged image did, its data intact.


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def case_dir(name):
    d = os.path.join(TMP, re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
    os.makedirs(d, exist_ok=True)
    return d


def run_q(args, cwd):
    return T.run(["qemu-img", "check", *args], cwd=cwd, timeout=120)


def run_k(args, cwd):
    return qk.run("check", *args, cwd=cwd, timeout=300)


def _norm_err(text, prog):
    """stderr lines with the program name of the message prefix replaced by `PROG`."""
    out = []
    for line in text.splitlines():
        line = re.sub(rf"^{prog}: ", "PROG: ", line)
        line = line.replace(f"Try '{prog} --help'", "Try 'PROG --help'")
        out.append(line)
    return out


def _diff(want, got, what, names=("qemu-img", "qcow2kit")):
    d = difflib.unified_diff(want, got, f"{names[0]} {what}", f"{names[1]} {what}",
                             lineterm="", n=2)
    return "\n".join(list(d)[:60])


REBUILT = "Rebuilding refcount structure"
_END_RX = re.compile(r'^(Image end offset: |\s*"image-end-offset": )(\d+)', re.M)


def _mask_end(text):
    """(text with the image end offset masked, that offset or None)."""
    m = _END_RX.search(text)
    return (_END_RX.sub(r"\1N", text), int(m.group(2))) if m else (text, None)


def same_run(got, want, what, rebuilt=False, names=("qemu-img", "qcow2kit")):
    """Result `got` (of names[1]) must equal `want` (of names[0]): stdout, stderr lines
    (modulo the program name prefix) and exit code. `rebuilt`: the refcount structure was
    rebuilt (see REBUILT), the image end offset of `got` need only be >= that of `want`."""
    if got.crashed:
        T.fail(f"{what}: {names[1]} crashed:\n" + got.describe())
    problems = []
    if got.rc != want.rc:
        problems.append(f"exit code: {names[0]} {want.rc}, {names[1]} {got.rc}")
    gt, wt = got.text, want.text
    if rebuilt:
        (gt, ge), (wt, we) = _mask_end(gt), _mask_end(wt)
        if (ge is None) != (we is None) or (ge is not None and ge < we):
            problems.append(f"image end offset after a rebuild: {names[0]} {we}, "
                            f"{names[1]} {ge} (must be >=)")
    if gt != wt:
        problems.append(_diff(wt.splitlines(), gt.splitlines(), "stdout", names))
    prog = "qemu-img" if got.argv[0] == "qemu-img" else "qcow2kit"
    we, ge = _norm_err(want.err, "qemu-img"), _norm_err(got.err, prog)
    if we != ge:
        problems.append(_diff(we, ge, "stderr", names))
    if problems:
        T.fail(f"{what} differs ($ {' '.join(got.argv[1:])}):\n" + "\n".join(problems))


def err_has(res, phrases, what):
    """Exit 1, no crash, and stderr contains every phrase (wording and line prefixes are
    our own)."""
    T.check(not res.crashed and res.rc == 1 and all(p in res.err for p in phrases),
            f"{what}: expected exit 1 and stderr with {phrases}:\n" + res.describe())


def probe_commands(base, damaged=(), only_clusters=None):
    """qemu-io read -P commands for every guest cluster in the base's windows that does not
    overlap a damaged range, merged into runs of one pattern."""
    cs = base.cs
    gran = min(cs, 512)
    bad = [(o, o + n) for o, n in damaged]

    def pattern_at(off):
        pat = 0
        for o, n, p in base.content:
            if o <= off < o + n:
                pat = p
        return pat

    cmds = []
    for wo, wn in base.windows:
        run_start, run_pat = None, None
        off = wo
        while off < wo + wn:
            c0 = off - off % cs
            is_bad = any(b0 < c0 + cs and c0 < b1 for b0, b1 in bad)
            pat = None if is_bad else pattern_at(off)
            if pat != run_pat or is_bad:
                if run_start is not None and run_pat is not None:
                    cmds.append(f"read -P {run_pat:#x} {run_start} {off - run_start}")
                run_start, run_pat = (None, None) if is_bad else (off, pat)
            off += gran
        if run_start is not None and run_pat is not None:
            cmds.append(f"read -P {run_pat:#x} {run_start} {off - run_start}")
    return cmds


def intact_reads(base, path, damaged, what):
    """Every guest cluster outside `damaged` reads the pattern the base wrote there."""
    cmds = probe_commands(base, damaged)
    argv = ["qemu-io", "-r", "-U", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    argv.append(path)
    res = T.run(argv, timeout=120)
    bad = [ln for ln in (res.text + res.err).splitlines()
           if "failed" in ln or "verification" in ln or "error" in ln.lower()]
    if bad or res.crashed:
        T.fail(f"{what}: intact guest clusters do not read as before:\n  " +
               "\n  ".join(bad[:12]) + ("\n" + res.describe(400) if res.crashed else ""))


DAMAGE_LOCKS = {}
DAMAGE_LOCK = threading.Lock()
DAMAGED = {}


def damaged_image(base, kind):
    """The damaged image of (base, kind), made once (the cases of a pair share it)."""
    key = (base.name, kind)
    with DAMAGE_LOCK:
        lock = DAMAGE_LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key in DAMAGED:
            r = DAMAGED[key]
            if isinstance(r, str):
                T.fail(r)
            return r
        d = case_dir(f"{base.name}-{kind}")
        path = os.path.join(d, "img.qcow2")
        shutil.copyfile(base.path, path)
        try:
            dmg = D.damage(kind, path, qcow2kit=qk.path if not ORACLE_ONLY else None)
        except D.NotApplicable as e:
            DAMAGED[key] = f"damage {kind} does not apply to base {base.name}: {e}"
            T.fail(DAMAGED[key])
        DAMAGED[key] = (d, path, dmg, T.sha256_file(path))
        return DAMAGED[key]


def twin_dir(d, tag, src):
    """A fresh copy of `src` as <d>/<tag>/img.qcow2 (so `filename` in the json is the same
    for both programs)."""
    sub = os.path.join(d, tag)
    shutil.rmtree(sub, ignore_errors=True)
    os.makedirs(sub)
    shutil.copyfile(src, os.path.join(sub, "img.qcow2"))
    return sub


def counts(res):
    """(errors, leaks, check-errors) from a human check summary."""
    t = res.text

    def n(rx):
        m = re.search(rx, t)
        return int(m.group(1)) if m else 0
    return (n(r"(\d+) errors were found"), n(r"(\d+) leaked clusters were found"),
            n(r"(\d+) internal errors"))


def same_features(ours, theirs):
    """The feature bits (dirty, corrupt...) of our repaired copy are those of qemu's."""
    a, b = T.read_header(ours), T.read_header(theirs)
    for k in ("incompatible_features", "compatible_features", "autoclear_features"):
        T.check(a[k] == b[k], f"after the repair {k} is {a[k]:#x}, qemu leaves {b[k]:#x}")


def bitmaps_of(path):
    info = q.info(path, extra=("-U",))
    return info.get("format-specific", {}).get("data", {}).get("bitmaps", [])


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------

def oracle_says(base, kind, res):
    """The damage does to qemu-img check what it is meant to."""
    rc, subs = expect(base, kind)
    missing = [s for s in subs if s not in res.err]
    if res.rc != rc or missing:
        T.fail(f"ORACLE: damage {kind} on {base.name} does not give qemu-img check exit {rc}"
               f" with {missing}:\n" + res.describe())


def case_check(base, kind):
    d, path, dmg, sha = damaged_image(base, kind)
    want = run_q(["img.qcow2"], d)
    oracle_says(base, kind, want)
    intact_reads(base, path, dmg.guest, f"ORACLE: damaged image ({dmg.desc})")
    want_j = run_q(["--output=json", "img.qcow2"], d)
    T.check(want_j.rc == want.rc, "ORACLE: json exit differs from human:\n" + want_j.describe())
    if ORACLE_ONLY:
        return
    same_run(run_k(["img.qcow2"], d), want, "check")
    same_run(run_k(["--output=json", "img.qcow2"], d), want_j, "check --output=json")
    T.check(T.sha256_file(path) == sha, "qcow2kit check without -r modified the image")


def case_repair(base, kind, mode, json_out):
    d, path, dmg, _sha = damaged_image(base, kind)
    tag = f"r-{mode}{'-json' if json_out else ''}"
    qd = twin_dir(d, "q-" + tag, path)
    kd = twin_dir(d, "k-" + tag, path)
    args = ["-r", mode] + (["--output=json"] if json_out else []) + ["img.qcow2"]
    want = run_q(args, qd)
    T.check(not want.crashed, "ORACLE: qemu-img crashed:\n" + want.describe())
    want_post = run_q(["img.qcow2"], qd)
    unrepaired = mode == "all" and qemu_unrepaired(base, kind)
    qemu_fixed = want.rc in (0, 3) and want_post.rc in (0, 3) and counts(want_post)[0] == 0
    if mode == "all":
        T.check(qemu_fixed != unrepaired,
                f"ORACLE: {kind} on {base.name}: expected qemu-img 7.2 "
                f"{'not ' if unrepaired else ''}to repair it with -r all:\n" +
                want.describe() + "\n" + want_post.describe())
    if qemu_fixed:
        intact_reads(base, os.path.join(qd, "img.qcow2"), dmg.guest,
                     f"ORACLE: qemu's repaired copy ({dmg.desc})")
    if ORACLE_ONLY:
        return
    got = run_k(args, kd)
    ours = os.path.join(kd, "img.qcow2")
    if mode == "all" and kind in BETTER:
        reason = BETTER[kind]
        if got.crashed or got.rc != 0:
            T.fail(f"-r all must repair what qemu-img 7.2 cannot ({reason}):\n"
                   + got.describe())
        post = run_q(["img.qcow2"], kd)
        if post.rc != 0 or "No errors were found on the image." not in post.text:
            T.fail(f"qemu-img check of our repaired copy is not clean ({reason}):\n"
                   + post.describe())
        intact_reads(base, ours, dmg.guest, "our repaired copy")
        return
    rebuilt = REBUILT in want.err
    same_run(got, want, f"check {' '.join(args[:-1])}", rebuilt)
    post = run_q(["img.qcow2"], kd)
    if base.name in RESTORES_BITMAPS and want.rc == 1:
        # qemu destroys guest data here (see RESTORES_BITMAPS); we must leave the image
        # as it was.
        before = run_q(["img.qcow2"], d)
        T.check((post.rc, post.text, post.err) == (before.rc, before.text, before.err),
                "after a failed repair qemu-img check of our copy differs from the damaged "
                f"image's:\nours:\n{post.describe()}\nbefore:\n{before.describe()}")
        intact_reads(base, ours, dmg.guest, "our copy after a failed repair")
        return
    if base.name in RESTORES_BITMAPS:
        # See RESTORES_BITMAPS: layouts differ after qemu re-stores its bitmaps.
        T.check(post.rc == want_post.rc and counts(post) == counts(want_post),
                "qemu-img check of our repaired copy vs of qemu's (rc and counts):\n"
                f"ours:\n{post.describe()}\nqemu's:\n{want_post.describe()}")
        T.check_json_eq(bitmaps_of(ours), bitmaps_of(os.path.join(qd, "img.qcow2")),
                        "bitmaps after repair")
    else:
        same_run(post, want_post, "qemu-img check after the repair", rebuilt,
                 ("qemu's copy", "our copy"))
    intact_reads(base, ours, dmg.guest, "our repaired copy")
    same_features(ours, os.path.join(qd, "img.qcow2"))
    if qemu_fixed:
        cmp = T.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                     os.path.join(qd, "img.qcow2"), ours], timeout=120)
        T.check(cmp.rc == 0, "guest contents of the repaired copies differ:\n" + cmp.describe())


def case_clean(base):
    d = case_dir(f"clean-{base.name}")
    path = os.path.join(d, "img.qcow2")
    if not os.path.exists(path):
        shutil.copyfile(base.path, path)
    sha = T.sha256_file(path)
    variants = [["img.qcow2"], ["--output=json", "img.qcow2"], ["-q", "img.qcow2"],
                ["-U", "--output=human", "img.qcow2"], ["-f", "qcow2", "img.qcow2"],
                ["-q", "--output=json", "img.qcow2"]]
    for args in variants:
        want = run_q(args, d)
        T.check(want.rc == 0, "ORACLE: base image is not clean:\n" + want.describe())
        if not ORACLE_ONLY:
            same_run(run_k(args, d), want, "check " + " ".join(args[:-1]))
    if not ORACLE_ONLY:
        T.check(T.sha256_file(path) == sha, "qcow2kit check without -r modified the image")
    for mode, js in (("all", False), ("leaks", True)):
        args = ["-r", mode] + (["--output=json"] if js else []) + ["img.qcow2"]
        qd, kd = twin_dir(d, f"q-{mode}", path), twin_dir(d, f"k-{mode}", path)
        want = run_q(args, qd)
        T.check(want.rc == 0, "ORACLE: -r on a clean image:\n" + want.describe())
        if ORACLE_ONLY:
            continue
        same_run(run_k(args, kd), want, f"check -r {mode}")
        post, want_post = run_q(["img.qcow2"], kd), run_q(["img.qcow2"], qd)
        if base.name not in RESTORES_BITMAPS:
            T.check((post.rc, post.text) == (want_post.rc, want_post.text),
                    f"after -r {mode}: ours\n{post.describe()}\nqemu's\n{want_post.describe()}")
        else:
            T.check(post.rc == 0, "after -r: ours\n" + post.describe())
        intact_reads(base, os.path.join(kd, "img.qcow2"), (), f"after -r {mode}")
        same_features(os.path.join(kd, "img.qcow2"), os.path.join(qd, "img.qcow2"))


def misc_cases(R, bases):
    def raw_image():
        d = case_dir("raw")
        q.create(os.path.join(d, "img.raw"), 1 * MiB, fmt="raw")
        for args in (["img.raw"], ["-f", "raw", "img.raw"], ["--output=json", "img.raw"],
                     ["-r", "all", "img.raw"]):
            want = run_q(args, d)
            T.check(want.rc == 63 and "does not support checks" in want.err,
                    "ORACLE: raw:\n" + want.describe())
            if not ORACLE_ONLY:
                same_run(run_k(args, d), want, "check " + " ".join(args))
    R.defer("misc/raw-image-exit-63", raw_image)

    def qcow2_as_raw():
        d = case_dir("qcow2-as-raw")
        shutil.copyfile(bases["v3-64k"].path, os.path.join(d, "img.qcow2"))
        args = ["-f", "raw", "img.qcow2"]
        want = run_q(args, d)
        T.check(want.rc == 63, "ORACLE:\n" + want.describe())
        if not ORACLE_ONLY:
            same_run(run_k(args, d), want, "check -f raw")
    R.defer("misc/qcow2-with-f-raw-exit-63", qcow2_as_raw)

    def missing_file():
        d = case_dir("missing")
        for args in (["nope.qcow2"], ["-r", "all", "nope.qcow2"]):
            want = run_q(args, d)
            T.check(want.rc == 1, "ORACLE:\n" + want.describe())
            if not ORACLE_ONLY:
                same_run(run_k(args, d), want, "check " + " ".join(args))
    R.defer("misc/missing-file-exit-1", missing_file)

    def bad_output():
        d = case_dir("bad-output")
        shutil.copyfile(bases["v3-64k"].path, os.path.join(d, "img.qcow2"))
        args = ["--output=xml", "img.qcow2"]
        want = run_q(args, d)
        T.check(want.rc == 1, "ORACLE:\n" + want.describe())
        if not ORACLE_ONLY:
            err_has(run_k(args, d), ["--output", "xml"], "check --output=xml")
    R.defer("misc/output-xml-refused", bad_output)

    def usage_errors():
        # Usage errors: exit 1 and a message naming the problem (the wording of the
        # "Try ... --help" line is the program's own).
        d = case_dir("usage")
        shutil.copyfile(bases["v3-64k"].path, os.path.join(d, "img.qcow2"))
        for args, words in ((["-r", "foo", "img.qcow2"], ["leaks", "foo"]),
                            ([], ["file", "required"]),
                            (["img.qcow2", "img.qcow2"], ["file", "argument", "expect"])):
            want = run_q(args, d)
            T.check(want.rc == 1, "ORACLE:\n" + want.describe())
            if not ORACLE_ONLY:
                T.expect_clean_error(run_k(args, d), words)
    R.defer("misc/usage-errors", usage_errors)

    def locked():
        d = case_dir("locked")
        shutil.copyfile(bases["v3-64k"].path, os.path.join(d, "img.qcow2"))
        def hold():
            return subprocess.Popen(["qemu-io", "-f", "qcow2", "img.qcow2"], cwd=d,
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        holder = hold()
        try:
            deadline = time.monotonic() + 60  # until qemu-io holds its locks
            while run_q(["img.qcow2"], d).rc != 1:
                if time.monotonic() > deadline:
                    T.fail("qemu-io did not lock the image (qemu-img check still opens it)")
                if holder.poll() is not None:
                    # qemu-io gives up when our probe's check holds its lock just as it
                    # opens the image: start it again.
                    holder = hold()
                time.sleep(0.05)
            for args in (["img.qcow2"], ["-U", "img.qcow2"], ["-r", "leaks", "img.qcow2"],
                         ["-U", "--output=json", "img.qcow2"]):
                want = run_q(args, d)
                T.check(want.rc == (0 if "-U" in args else 1), "ORACLE:\n" + want.describe())
                if ORACLE_ONLY:
                    continue
                got = run_k(args, d)
                if "-U" in args:
                    same_run(got, want, "check " + " ".join(args))
                else:
                    err_has(got, ["Failed to get", "lock", "Is another process using the image"],
                            "check " + " ".join(args))
        finally:
            holder.stdin.close()
            holder.wait(timeout=30)
        # -U with -r: refused by qemu-img ("force-share=on can only be used with read-only
        # images").
        args = ["-U", "-r", "leaks", "img.qcow2"]
        want = run_q(args, d)
        T.check(want.rc == 1, "ORACLE:\n" + want.describe())
        if not ORACLE_ONLY:
            same_run(run_k(args, d), want, "check -U -r leaks")
    R.defer("misc/locked-image-and-U", locked)

    def quiet_damaged():
        base = bases["v3-64k"]
        d, path, _dmg, _sha = damaged_image(base, "leak")
        for args in (["-q", "img.qcow2"], ["-q", "--output=json", "img.qcow2"]):
            want = run_q(args, d)
            if not ORACLE_ONLY:
                same_run(run_k(args, d), want, "check " + " ".join(args))
        for mode in ("leaks", "all"):
            args = ["-q", "-r", mode, "img.qcow2"]
            qd, kd = twin_dir(d, f"q-quiet-{mode}", path), twin_dir(d, f"k-quiet-{mode}", path)
            want = run_q(args, qd)
            if not ORACLE_ONLY:
                same_run(run_k(args, kd), want, "check " + " ".join(args))
    R.defer("misc/quiet-leak-and-repair", quiet_damaged)

    def layout_sources():
        # The damage module finds the same tables from qcow2kit's dump and from its own
        # parsing (so a damage means the same thing whichever way it was located).
        if ORACLE_ONLY:
            return
        for b in bases.values():
            a = D.layout(b.path, qcow2kit=qk.path)
            p = D.layout(b.path, use_dump=False)
            T.check(a.source == "dump", f"{b.name}: qcow2kit dump --all --output=json failed")
            T.check_json_eq(a.as_json(), p.as_json(), f"{b.name}: layout dump vs own parse")
    R.defer("misc/damage-layout-dump-equals-parse", layout_sources)


# --------------------------------------------------------------------------------------

def main():
    global qk, q, TMP, ORACLE_ONLY
    if "--oracle-only" in sys.argv:
        ORACLE_ONLY = True
        sys.argv.remove("--oracle-only")
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_check")
    qk = T.Qcow2kit(args.qcow2kit)
    q = T.QemuTools()
    TMP = R.tmp
    if not ORACLE_ONLY:
        if not qk.exists():
            with R.case("qcow2kit-binary-exists"):
                T.fail(f"{args.qcow2kit} does not exist or is not executable")
            R.finish()
        with R.case("check-help"):
            res = qk.run("check", "--help")
            T.check(res.rc == 0 and re.search(r"usage", res.text, re.I),
                    "`qcow2kit check --help` does not print a usage:\n" + res.describe())
            T.check("check" in qk.ok("--help").text, "--help does not mention `check`")
        if R.failed:
            R.finish()
    bases = R.setup("bases", make_bases, case_dir("bases"))
    if bases is None:
        R.finish()
    for name in BASE_NAMES:
        R.defer(f"clean/{name}", case_clean, bases[name])
    misc_cases(R, bases)
    for kind, names in MATRIX.items():
        for name in names:
            b = bases[name]
            R.defer(f"{name}/{kind}/check", case_check, b, kind)
            R.defer(f"{name}/{kind}/r-leaks", case_repair, b, kind, "leaks", False)
            R.defer(f"{name}/{kind}/r-all", case_repair, b, kind, "all", False)
            if name in ("v3-64k", "snapshot", "compressed") or kind in ("leak",):
                R.defer(f"{name}/{kind}/r-all-json", case_repair, b, kind, "all", True)
    R.run_deferred()
    R.finish()


if __name__ == "__main__":
    main()
