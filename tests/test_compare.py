#!/usr/bin/env python3
"""`qcow2kit compare` against `qemu-img compare` on the same pairs of images: the same exit
status (0 identical, 1 different, 2 open failed, 3 block status failed, 4 read failed) and
the same messages, over identical images in different formats, contents differing in data,
in a range allocated on one side only, sizes that differ with the tail allocated or not,
strict mode (sizes, zero cluster against unallocated), backing chains and an unreadable
compressed cluster.

Run: python3 tests/test_compare.py --qcow2kit build/qcow2kit [--only SUBSTR]
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



def same_as_qemu(args, err_prefix_only=False):
    ours = qk.run("compare", *args)
    theirs = T.run(["qemu-img", "compare", *args])
    T.check(not ours.crashed, ours.describe())
    T.check_eq(ours.rc, theirs.rc, f"exit status of compare {' '.join(args)}")
    T.check_eq(ours.out.decode(), theirs.out.decode(), "standard output")
    if err_prefix_only:
        # The reason after the last colon is qemu's strerror; ours names the damage.
        cut = lambda t: [x.split(": ", 1)[0] for x in T.strip_prog(t)]
        T.check_eq(cut(ours.err), cut(theirs.err), "error message (reason aside)")
    else:
        T.check_eq(T.strip_prog(ours.err), T.strip_prog(theirs.err), "error message")
    return ours


def cases(R):
    def build(d):
        """A family of images around one base content."""
        a = q.create(os.path.join(d, "a.qcow2"), 4 * MiB)
        q.io(a, ["write -P 0x11 0 100k", "write -P 0x22 1M 64k", "write -z 2M 64k"])
        raw = q.to_raw(a, os.path.join(d, "a.raw"))
        return a, raw

    def run(name, fn):
        def wrapped():
            d = os.path.join(TMP, re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
            os.makedirs(d, exist_ok=True)
            fn(d)
        R.defer(name, wrapped)

    def identical(d):
        a, raw = build(d)
        same_as_qemu([a, raw])
        same_as_qemu(["-f", "qcow2", "-F", "raw", a, raw])
        same_as_qemu(["-q", a, raw])
    run("identical", identical)

    def data_differs(d):
        a, raw = build(d)
        b = os.path.join(d, "b.qcow2")
        q.img("convert", "-O", "qcow2", a, b)
        q.io(b, ["write -P 0x99 1040k 1"])
        same_as_qemu([a, b])
        same_as_qemu(["-s", a, b])
    run("data-differs", data_differs)

    def one_side_allocated(d):
        a, raw = build(d)
        b = os.path.join(d, "b.qcow2")
        q.img("convert", "-O", "qcow2", a, b)
        q.io(b, ["write -P 0x42 3M 4k"])           # data where a is unallocated
        same_as_qemu([a, b])
        c = os.path.join(d, "c.qcow2")
        q.img("convert", "-O", "qcow2", a, c)
        q.io(c, ["write -P 0 3M 64k"])             # zeros written where a is unallocated
        same_as_qemu([a, c])
        same_as_qemu(["-s", a, c])
        q.io(c, ["write -P 0x01 3100k 1"])       # one byte, mid-cluster
        same_as_qemu([c, a])
    run("one-side-allocated", one_side_allocated)

    def sizes_differ(d):
        a, raw = build(d)
        big = os.path.join(d, "big.qcow2")
        q.img("convert", "-O", "qcow2", a, big)
        q.img("resize", big, "6M")
        same_as_qemu([a, big])
        same_as_qemu([big, a])
        same_as_qemu(["-s", a, big])
        q.io(big, ["write -P 0 5M 64k"])
        same_as_qemu([a, big])
        q.io(big, ["write -P 0x5 5000k 3"])
        same_as_qemu([a, big])
        same_as_qemu([big, raw])
    run("sizes-differ", sizes_differ)

    def strict_zero_vs_unallocated(d):
        a = q.create(os.path.join(d, "a.qcow2"), 1 * MiB)
        b = q.create(os.path.join(d, "b.qcow2"), 1 * MiB)
        q.io(b, ["write -z 64k 64k"])
        same_as_qemu([a, b])
        same_as_qemu(["-s", a, b])
    run("strict-zero-vs-unallocated", strict_zero_vs_unallocated)

    def chains(d):
        base = q.create(os.path.join(d, "base.qcow2"), 2 * MiB)
        q.io(base, ["write -P 0x31 0 2M"])
        top = q.create(os.path.join(d, "top.qcow2"), 2 * MiB, backing=base, backing_fmt="qcow2")
        q.io(top, ["write -P 0x32 64k 4k"])
        flat = q.to_raw(top, os.path.join(d, "flat.raw"))
        same_as_qemu([top, flat])
        q.io(top, ["write -P 0x33 1M 512"])
        same_as_qemu([top, flat])
        same_as_qemu([base, flat])
    run("backing-chains", chains)

    def errors(d):
        a, raw = build(d)
        same_as_qemu([a, os.path.join(d, "missing.qcow2")])
        bad = os.path.join(d, "bad.qcow2")
        with open(bad, "wb") as f:
            f.write(b"QFI\xfb" + bytes(508))
        same_as_qemu([a, bad])
        res = qk.run("compare", a)
        T.expect_clean_error(res, what="one file")
    run("open-errors", errors)

    def unreadable(d):
        src = os.path.join(d, "plain.raw")
        with open(src, "wb") as f:
            f.write(b"".join(f"line {i} of the text\n".encode() for i in range(60000)))
        c = os.path.join(d, "c.qcow2")
        q.img("convert", "-c", "-f", "raw", "-O", "qcow2", src, c)
        entry = T.peek(c, T.l2_entry_location(c, 256 * KiB), ">Q")
        T.poke_bytes(c, entry & ((1 << 54) - 1), b"\xff" * 64)
        same_as_qemu(["-f", "qcow2", "-F", "raw", c, src], err_prefix_only=True)
    run("unreadable-cluster", unreadable)


def main():
    global qk, q, TMP
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_compare")
    qk = T.Qcow2kit(args.qcow2kit)
    q = T.QemuTools()
    TMP = R.tmp
    cases(R)
    R.run_deferred()
    R.finish()


if __name__ == "__main__":
    main()
