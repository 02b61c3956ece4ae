#!/usr/bin/env python3
"""`qcow2kit check` of broken snapshot tables against `qemu-img check` 7.2 (QEMU's iotest
261 cases and two more).

A base image with two internal snapshots (different data in each) is made by qemu-img; its
snapshot table is then rewritten in fresh clusters at the end of the file (refcounts set, the
old table freed) with one kind of damage:

  incomplete       a version 3 entry with 8 bytes of extra data (needs 16)
  incomplete-v2    the same in a version 2 image, where it is allowed
  extra-too-big    an entry with 2024 bytes of extra data (at most 1 KiB)
  too-many         65546 entries (at most 65536)
  too-big          1102 entries with 64 KiB names, a table past 64 MiB
  offset-unaligned the header's table offset moved off its cluster boundary
  past-eof         the header points 3 entries at a cluster past the end of the file

For each: `check` (human and json) prints and exits as qemu-img (stderr modulo the program
name) and leaves the file unchanged; `-r leaks` and `-r all` on twin copies (qemu-img repairs
one, qcow2kit the other) print and exit alike; after `-r all` qemu-img check finds our copy
as it finds its own, `qemu-img snapshot -l` lists the same snapshots, and the active layer and
every snapshot that survived read the same from both copies (`qemu-img compare`, `convert
-l`). `info` opens or refuses the damaged image as qemu-img does.

Run:  python3 tests/test_check_snapshot_table.py --qcow2kit build/qcow2kit [--only SUBSTR]
"""

import os
import re
import shutil
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qk_testlib as T  # noqa: E402
import qcow2_damage as D  # noqa: E402
from qk_testlib import KiB, MiB  # noqa: E402

qk = None
q = None
TMP = None

# qemu-img prints this when freeing an old table that lay past the end of the file fails;
# our rewrite leaves those (non-existent) clusters alone silently.
QEMU_ONLY_LINES = {"qcow2_free_clusters failed: Invalid argument"}


# qemu-img opens an image whose snapshot table lies past the end of the file (reading zeros
# there); qcow2kit refuses it, naming the problem, and leaves it to check.
INFO_STRICTER = {"past-eof"}


# --------------------------------------------------------------------------------------
# The snapshot table, read and written by hand
# --------------------------------------------------------------------------------------

def read_table(path):
    """[[fixed(40 bytes), extra, id, name]] of every entry."""
    h = T.read_header(path)
    off, out = h["snapshots_offset"], []
    for _ in range(h["nb_snapshots"]):
        fixed = bytearray(T.read_range(path, off, 40))
        id_len, name_len = struct.unpack(">HH", fixed[12:16])
        extra_len = struct.unpack(">I", fixed[36:40])[0]
        p = off + 40
        extra = T.read_range(path, p, extra_len)
        sid = T.read_range(path, p + extra_len, id_len)
        name = T.read_range(path, p + extra_len + id_len, name_len)
        out.append([fixed, extra, sid, name])
        off = (p + extra_len + id_len + name_len + 7) & ~7
    return out


def encode(entries):
    b = bytearray()
    for fixed, extra, sid, name in entries:
        f = bytearray(fixed)
        f[12:16] = struct.pack(">HH", len(sid), len(name))
        f[36:40] = struct.pack(">I", len(extra))
        e = bytes(f) + extra + sid + name
        b += e + b"\0" * (-len(e) % 8)
    return bytes(b)


def write_table(path, entries):
    """Writes `entries` as the table in fresh clusters at the end of the file, sets their
    refcounts, frees the old table's clusters and points the header at the new one."""
    h = T.read_header(path)
    cs = 1 << h["cluster_bits"]
    old_off, old_len = h["snapshots_offset"], len(encode(read_table(path)))
    data = encode(entries)
    at = (os.path.getsize(path) + cs - 1) // cs * cs
    T.poke_bytes(path, at, data + b"\0" * (-len(data) % cs))
    lay = D.layout(path, use_dump=False)
    for c in range(at // cs, (at + len(data) + cs - 1) // cs):
        lay.set_refcount(c, 1)
    for c in range(old_off // cs, (old_off + old_len + cs - 1) // cs):
        lay.set_refcount(c, 0)
    T.set_header(path, nb_snapshots=len(entries), snapshots_offset=at)


def _filler(entries, count, name_len):
    fixed = bytearray(40)
    extra = struct.pack(">QQQ", 0, 64 * MiB, 2**64 - 1)
    base = len(entries)
    for i in range(count):
        entries.append([fixed, extra, str(base + i + 1).encode(), b"n" * name_len])


def d_incomplete(path):
    e = read_table(path)
    e[0][1] = e[0][1][:8]
    write_table(path, e)


def d_extra_too_big(path):
    e = read_table(path)
    e[1][1] = e[1][1] + b"\xab" * 2000
    write_table(path, e)


def d_too_many(path):
    e = read_table(path)
    _filler(e, 65546 - len(e), 1)
    write_table(path, e)


def d_too_big(path):
    e = read_table(path)
    _filler(e, 1100, 65535)
    write_table(path, e)


def d_offset_unaligned(path):
    T.set_header(path, snapshots_offset=T.read_header(path)["snapshots_offset"] + 512)


def d_past_eof(path):
    cs = 1 << T.read_header(path)["cluster_bits"]
    end = (os.path.getsize(path) + cs - 1) // cs * cs
    T.set_header(path, snapshots_offset=end + 10 * cs, nb_snapshots=3)


# name: (damage, base, the phrase qemu-img check must print without repair)
CASES = {
    "incomplete": (d_incomplete, "v3", "ERROR snapshot table entry 0 is incomplete"),
    "incomplete-v2": (d_incomplete, "v2", "No errors were found"),
    "extra-too-big": (d_extra_too_big, "v3", "Too much extra metadata in snapshot table entry 1"),
    "too-many": (d_too_many, "v3", "ERROR snapshot table too large"),
    "too-big": (d_too_big, "v3", "Snapshot table is too big"),
    "offset-unaligned": (d_offset_unaligned, "v3", "ERROR snapshot table offset invalid"),
    "past-eof": (d_past_eof, "v3", "exceeding the end of the file"),
}


# --------------------------------------------------------------------------------------

def make_base(d, name, compat):
    path = os.path.join(d, f"{name}.qcow2")
    q.create(path, 64 * MiB, compat=compat)
    q.io(path, ["write -P 0x11 0 128k", "write -P 0x12 1M 64k"])
    q.img("snapshot", "-c", "s0", path)
    q.io(path, ["write -P 0x22 64k 64k", "write -P 0x23 2M 64k"])
    q.img("snapshot", "-c", "s1", path)
    q.io(path, ["write -P 0x33 0 64k", "write -P 0x34 3M 64k"])
    return path


def norm_err(res):
    prog = "qemu-img" if res.argv[0] == "qemu-img" else "qcow2kit"
    lines = []
    for line in res.err.splitlines():
        if line in QEMU_ONLY_LINES:
            continue
        line = re.sub(rf"^{prog}: ", "PROG: ", line)
        lines.append(line.replace(f"{prog} check -r all", "PROG check -r all"))
    return lines


def same_run(got, want, what):
    T.check(not got.crashed, f"{what}: qcow2kit crashed:\n" + got.describe())
    problems = []
    if got.rc != want.rc:
        problems.append(f"exit code: qemu-img {want.rc}, qcow2kit {got.rc}")
    if got.text != want.text:
        problems.append(f"stdout:\n--- qemu-img\n{want.text}--- qcow2kit\n{got.text}")
    if norm_err(got) != norm_err(want):
        problems.append("stderr:\n--- qemu-img\n" + "\n".join(norm_err(want)[:30]) +
                        "\n--- qcow2kit\n" + "\n".join(norm_err(got)[:30]))
    if problems:
        T.fail(f"{what} differs:\n" + "\n".join(problems))


def twins(d, src, tag):
    qp, kp = os.path.join(d, f"q-{tag}.qcow2"), os.path.join(d, f"k-{tag}.qcow2")
    shutil.copy(src, qp)
    shutil.copy(src, kp)
    return qp, kp


def snapshot_names(path):
    res = q.img("snapshot", "-l", path)
    return [ln.split()[1] for ln in res.text.splitlines()[2:] if len(ln.split()) > 1]


def case(name, bases):
    damage, base, phrase = CASES[name]
    d = os.path.join(TMP, name)
    os.makedirs(d, exist_ok=True)
    img = os.path.join(d, "img.qcow2")
    shutil.copy(bases[base], img)
    damage(img)
    want = T.run(["qemu-img", "check", img], timeout=300)
    T.check(phrase in want.text + want.err, f"ORACLE: qemu-img check lacks {phrase!r}:\n" +
            want.describe())
    sha = T.sha256_file(img)
    for args in ([], ["--output=json"]):
        want = T.run(["qemu-img", "check", *args, img], timeout=300)
        same_run(qk.run("check", *args, img, timeout=300), want, f"check {' '.join(args)}")
    T.check(T.sha256_file(img) == sha, "check without -r modified the image")

    want, got = q.img("info", img, ok=False), qk.run("info", img)
    if name in INFO_STRICTER:
        T.check(want.rc == 0 and got.rc == 1 and "extends past end of file" in got.err,
                "info: expected qemu-img to open the image and qcow2kit to refuse it:\n" +
                got.describe())
    else:
        T.check(got.rc == want.rc, f"info: qemu-img exit {want.rc}, qcow2kit {got.rc}:\n" +
                got.describe())
    if want.rc == 0 and got.rc == 0:
        T.check(snapshot_names(img) == [ln.split()[1] for ln in got.text.splitlines()
                                        if re.match(r"^\d+\s", ln)],
                "info: the snapshot list differs from qemu-img snapshot -l:\n" + got.text)

    for mode in ("leaks", "all"):
        qp, kp = twins(d, img, mode)
        want = T.run(["qemu-img", "check", "-r", mode, qp], timeout=600)
        got = qk.run("check", "-r", mode, kp, timeout=600)
        same_run(got, want, f"check -r {mode}")
        if mode != "all":
            continue
        after_q = T.run(["qemu-img", "check", qp], timeout=300)
        after_k = T.run(["qemu-img", "check", kp], timeout=300)
        T.check(after_k.text == after_q.text and after_k.rc == after_q.rc,
                "qemu-img check after the repairs differs:\n--- of qemu's\n" + after_q.text +
                "--- of ours\n" + after_k.text)
        if q.img("snapshot", "-l", qp, ok=False).rc != 0:
            # qemu-img cannot repair this (offset-unaligned): neither copy opens.
            T.check(q.img("snapshot", "-l", kp, ok=False).rc != 0,
                    "our repaired copy opens where qemu's does not (update the test)")
            continue
        names = snapshot_names(qp)
        T.check(snapshot_names(kp) == names, f"snapshot lists differ after -r all: qemu "
                f"{names[:5]}..., ours {snapshot_names(kp)[:5]}...")
        cmp = T.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", qp, kp])
        T.check(cmp.rc == 0, "active layers differ after -r all:\n" + cmp.describe())
        for sn in [n for n in names if n in ("s0", "s1")]:
            raws = []
            for p in (qp, kp):
                out = p + f".{sn}.raw"
                q.img("convert", "-l", f"snapshot.name={sn}", "-O", "raw", p, out)
                raws.append(T.sha256_file(out))
                os.unlink(out)
            T.check(raws[0] == raws[1], f"snapshot {sn} reads differently after -r all")
        for p in (qp, kp):
            os.unlink(p)


def main():
    global qk, q, TMP
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_check_snapshot_table")
    qk = T.Qcow2kit(args.qcow2kit)
    q = T.QemuTools()
    TMP = R.tmp

    def bases_fn(d):
        os.makedirs(d, exist_ok=True)
        return {"v3": make_base(d, "v3", "1.1"), "v2": make_base(d, "v2", "0.10")}
    bases = R.setup("bases", bases_fn, os.path.join(TMP, "bases"))
    if bases is None:
        R.finish()
    for name in CASES:
        R.defer(name, case, name, bases)
    R.run_deferred()
    R.finish()


if __name__ == "__main__":
    main()
