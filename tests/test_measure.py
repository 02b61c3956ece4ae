#!/usr/bin/env python3
"""`qcow2kit measure` against `qemu-img measure`: the same numbers (human and JSON output)
for --size and for sources (qcow2 with data, zeros and holes, raw files with holes, odd
sizes, backing chains, images with persistent bitmaps) over target options (cluster sizes,
refcount widths, extended L2, compat, preallocation, a backing file), and the same messages
and exit status for every refused combination.

Run: python3 tests/test_measure.py --qcow2kit build/qcow2kit [--only SUBSTR]
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qk_testlib as T  # noqa: E402
from qk_testlib import KiB, MiB  # noqa: E402

qk = None
q = None
TMP = None



def same(args):
    ours = qk.run("measure", *args)
    theirs = T.run(["qemu-img", "measure", *args])
    T.check(not ours.crashed, ours.describe())
    what = "measure " + " ".join(args)
    T.check_eq(ours.rc, theirs.rc, f"exit status of {what}")
    T.check_eq(ours.out.decode(), theirs.out.decode(), f"output of {what}")
    T.check_eq(T.strip_prog(ours.err), T.strip_prog(theirs.err), f"messages of {what}")


def cases(R):
    def sizes():
        for size in ("0", "1000", "1G", "1T", "100M"):
            for target in ([], ["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=512"],
                           ["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=64"],
                           ["-O", "qcow2", "-o", "extended_l2=on"],
                           ["--output=json", "-O", "qcow2"], ["--output=json"]):
                same(["--size", size, *target])
    R.defer("size", sizes)

    def sources():
        d = os.path.join(TMP, "sources")
        os.makedirs(d)
        img = q.create(os.path.join(d, "a.qcow2"), 100 * MiB)
        q.io(img, ["write 0 1M", "write 5M 100k", "write -z 10M 1M", "write 50M 4k",
                   "write 99M 1M"])
        raw = os.path.join(d, "odd.raw")
        with open(raw, "wb") as f:
            f.truncate(3 * MiB + 1001)
            f.seek(MiB + 7)
            f.write(b"x" * 70000)
        base = q.create(os.path.join(d, "base.qcow2"), 20 * MiB)
        q.io(base, ["write 0 8M"])
        top = q.create(os.path.join(d, "top.qcow2"), 30 * MiB, backing=base, backing_fmt="qcow2")
        q.io(top, ["write 12M 1M"])
        v2 = q.create(os.path.join(d, "v2.qcow2"), 10 * MiB, compat="0.10")
        q.io(v2, ["write 0 1M"])
        bm = q.create(os.path.join(d, "bitmaps.qcow2"), 64 * MiB)
        q.img("bitmap", "--add", bm, "b0")
        q.img("bitmap", "--add", "-g", "512", bm, "a-much-longer-bitmap-name")
        for src in (img, raw, top, v2, bm):
            for target in ([], ["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"],
                           ["-O", "qcow2", "-o", "cluster_size=2M"],
                           ["-O", "qcow2", "-o", "compat=0.10"],
                           ["-O", "qcow2", "-o", "preallocation=falloc"],
                           ["-O", "qcow2", "-o", "preallocation=metadata"],
                           ["-O", "qcow2", "-o", f"backing_file={base},backing_fmt=qcow2"],
                           ["--output=json", "-O", "qcow2"]):
                same([*target, src])
        same(["-f", "raw", "-O", "qcow2", img])
        q.img("snapshot", "-c", "s1", img)
        q.io(img, ["write 20M 10M"])
        for args in (["-l", "s1"], ["-l", "1"], ["-l", "missing"], ["-l", "snapshot.id=1"],
                     ["-l", "snapshot.name=s1"], ["-l", "snapshot.name=1"]):
            same([*args, "-O", "qcow2", img])
    R.defer("sources", sources)

    def errors():
        d = os.path.join(TMP, "errors")
        os.makedirs(d)
        img = q.create(os.path.join(d, "a.qcow2"), MiB)
        for args in ([], ["--size", "1G", img], ["--size", "1G", "-f", "qcow2"],
                     ["--size", "1x"], ["-O", "qcow2", "-o", "foo=bar", img],
                     ["-O", "vmdk", img], [os.path.join(d, "missing")], [img, img]):
            same(args)
    R.defer("errors", errors)


def main():
    global qk, q, TMP
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_measure")
    qk = T.Qcow2kit(args.qcow2kit)
    q = T.QemuTools()
    TMP = R.tmp
    cases(R)
    R.run_deferred()
    R.finish()


if __name__ == "__main__":
    main()
