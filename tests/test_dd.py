#!/usr/bin/env python3
"""`qcow2kit dd` against `qemu-img dd`: the same output image (size, contents, allocation) for
block sizes, counts and skips (7.2's count-includes-skip quirk, a skip past the end, odd
sizes, qcow2 and raw on either side), and the same messages and exit status for bad operands.

Run: python3 tests/test_dd.py --qcow2kit build/qcow2kit [--only SUBSTR]
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



def cases(R):
    def copies():
        d = os.path.join(TMP, "copies")
        os.makedirs(d)
        src = q.create(os.path.join(d, "src.qcow2"), 5 * MiB + 1536)
        q.io(src, ["write -P 0x11 0 100k", "write -P 0x22 1M 64k", "write -z 2M 64k",
                   "write -P 0x33 5M 1536"])
        raw = q.to_raw(src, os.path.join(d, "src.raw"))
        n = 0
        for source, fmt in ((src, "qcow2"), (raw, "raw")):
            for out_fmt in ("raw", "qcow2"):
                for ops in (["bs=64k", "count=2", "skip=1"], ["bs=1M", "count=3"],
                            ["bs=1000", "skip=3"], ["bs=4k"], ["skip=1G"],
                            ["bs=3", "count=5000", "skip=77"], ["bs=512", "count=0"]):
                    n += 1
                    ours = os.path.join(d, f"ours{n}.{out_fmt}")
                    theirs = os.path.join(d, f"theirs{n}.{out_fmt}")
                    args = ["-f", fmt, "-O", out_fmt, *ops, f"if={source}"]
                    r1 = qk.run("dd", *args, f"of={ours}")
                    r2 = T.run(["qemu-img", "dd", *args, f"of={theirs}"])
                    what = " ".join(args)
                    T.check(not r1.crashed, r1.describe())
                    T.check_eq(r1.rc, r2.rc, f"exit status of dd {what}")
                    T.check_eq(T.strip_prog(r1.err), T.strip_prog(r2.err), f"messages of dd {what}")
                    T.check_eq(q.info(ours)["virtual-size"], q.info(theirs)["virtual-size"],
                               f"output size of dd {what}")
                    res = q.img("compare", "-f", out_fmt, "-F", out_fmt, ours, theirs, ok=False)
                    T.check(res.rc == 0, f"dd {what}: output differs:\n" + res.describe())
                    def strip_map(p):
                        # Data over a hole in the host file (qcow2kit leaves zeros past the end
                        # of the file unwritten) is data all the same.
                        out = []
                        for e in T.strip_keys(q.map(p, extra=("-f", out_fmt)), {"offset"}):
                            if e["data"]:
                                e["zero"] = False
                            if out and all(out[-1][k] == e[k] for k in e if k not in
                                           ("start", "length")):
                                out[-1]["length"] += e["length"]
                            else:
                                out.append(e)
                        return out
                    T.check_json_eq(strip_map(ours), strip_map(theirs), f"map after dd {what}")
    R.defer("copies", copies)

    def errors():
        d = os.path.join(TMP, "errors")
        os.makedirs(d)
        src = q.create(os.path.join(d, "src.qcow2"), MiB)
        out = os.path.join(d, "out.raw")
        for ops in (["if=" + src], ["of=" + out], ["bs=0"], ["bs=abc"], ["count=-1"],
                    ["foo=1"], ["garbage"], ["bs=4G"], ["skip=-1"], ["count=1.5"],
                    ["if=" + os.path.join(d, "missing")]):
            full = ops if len(ops) == 1 and ops[0].startswith(("if=", "of=")) else \
                [*ops, "if=" + src, "of=" + out]
            if ops[0].startswith("if=" + os.path.join(d, "missing")):
                full = [*ops, "of=" + out]
            r1 = qk.run("dd", *full)
            r2 = T.run(["qemu-img", "dd", *full])
            T.check_eq(r1.rc, r2.rc, f"exit status of dd {' '.join(full)}")
            T.check_eq(T.strip_prog(r1.err), T.strip_prog(r2.err), f"messages of dd {' '.join(full)}")
            if os.path.exists(out):
                os.unlink(out)
    R.defer("errors", errors)


def main():
    global qk, q, TMP
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_dd")
    qk = T.Qcow2kit(args.qcow2kit)
    q = T.QemuTools()
    TMP = R.tmp
    cases(R)
    R.run_deferred()
    R.finish()


if __name__ == "__main__":
    main()
