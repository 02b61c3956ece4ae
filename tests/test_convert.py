#!/usr/bin/env python3
"""`qcow2kit convert` against `qemu-img convert` of the same sources with the same options.

Every case converts once with qcow2kit and once with qemu-img, then requires: the target
equals the source (`qemu-img compare`), a clean `qemu-img check` (qcow2 targets), and the
same data/zero map as qemu-img's target (host offsets aside). Compressed targets are read
back by qemu-img and must be no more than 2% larger than qemu-img's. Also: -B, -n with and
without --target-is-zero, several sources, odd sizes, -S, -W / -m / --threads giving
byte-identical targets, progress, qemu-img's messages for every refused option, and a
source that fails to read mid-way (the created target removed; --salvage reads zeros).

Run: python3 tests/test_convert.py --qcow2kit build/qcow2kit [--only SUBSTR]
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


def case_dir(name):
    d = os.path.join(TMP, re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
    os.makedirs(d, exist_ok=True)
    return d


def text_data(size, seed):
    """Compressible bytes that differ from cluster to cluster."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += f"block {seed}.{i}: qcow2kit converts {i * 7919 % 1000003} bytes\n".encode()
        i += 1
    return bytes(out[:size])


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


# ---- sources ---------------------------------------------------------------------------

def mixed_qcow2(d, name="src.qcow2", **opts):
    """Data, text, zero clusters, unallocated ranges, partial clusters and a tail."""
    path = os.path.join(d, name)
    q.create(path, 7 * MiB + 3 * 512, **opts)
    txt = write_file(os.path.join(d, "text.bin"), text_data(1 * MiB, 1))
    q.io(path, ["write -P 0x11 0 200k", "write -P 0 300k 100k", "write -z 1M 256k",
                "write -P 0x22 1536k 512", "write -P 0x33 2M 4k", "write -P 0x44 2052k 1k",
                "write -P 0x55 7M 1536"])
    T.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {txt} 3M 1M", path], timeout=60)
    T.check(q.img("compare", "-f", "qcow2", "-F", "raw", path, path, ok=False).rc in (0, 1, 2),
            "source made")
    return path


def raw_source(d, name="src.raw", size=5 * MiB + 1000):
    """A raw file of odd size with holes, zeros written as bytes, data and text."""
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(64 * KiB)
        f.write(b"\x5a" * (192 * KiB))
        f.seek(1 * MiB)
        f.write(bytes(256 * KiB))  # zeros written out (data on disk, zero content)
        f.seek(2 * MiB + 512)
        f.write(text_data(1 * MiB, 2))
        f.seek(size - 700)
        f.write(b"\x77" * 700)
    return path


def chain_source(d):
    """qcow2 over qcow2 over raw, with data at every level."""
    base = os.path.join(d, "base.raw")
    write_file(base, text_data(3 * MiB, 3))
    mid = q.create(os.path.join(d, "mid.qcow2"), 4 * MiB, backing=base, backing_fmt="raw")
    q.io(mid, ["write -P 0x66 512k 128k", "write -z 1M 64k"])
    top = q.create(os.path.join(d, "top.qcow2"), 4 * MiB, backing=mid, backing_fmt="qcow2",
                   cluster_size=4096)
    q.io(top, ["write -P 0x77 600k 8k", "write -z 2M 64k", "discard 0 64k"])
    return top


def compressed_source(d):
    raw = write_file(os.path.join(d, "plain.raw"), text_data(2 * MiB, 4) + os.urandom(512 * KiB))
    path = os.path.join(d, "compressed.qcow2")
    q.img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, path)
    q.io(path, ["write -P 0x12 1M 4k"])
    return path


# ---- checks ----------------------------------------------------------------------------

def norm_map(path, fmt):
    out = []
    for e in q.map(path, extra=("-f", fmt)):
        e = {k: v for k, v in e.items() if k not in ("offset", "compressed")}
        # Allocated data reading as zeros because the host file has a hole there (qcow2kit
        # does not write the zero tail of a fresh cluster past the end of the file; qemu-img
        # map probes the file) counts as plain data: contents are compared separately.
        if e.get("data"):
            e["zero"] = False
        if out and out[-1]["start"] + out[-1]["length"] == e["start"] and \
                {k: v for k, v in out[-1].items() if k not in ("start", "length")} == \
                {k: v for k, v in e.items() if k not in ("start", "length")}:
            out[-1]["length"] += e["length"]
        else:
            out.append(dict(e))
    return out


def check_clean(path):
    res = q.img("check", path, ok=False)
    T.check(res.rc == 0 and "No errors were found" in res.text,
            f"qemu-img check {os.path.basename(path)} is not clean:\n" + res.describe())


def both(d, sources, args, out_fmt, src_fmt=None, check_map=True, target_backing=False):
    """Converts with qcow2kit and qemu-img; checks the targets. Returns (ours, theirs)."""
    ext = "qcow2" if out_fmt == "qcow2" else "raw"
    ours = os.path.join(d, f"ours.{ext}")
    theirs = os.path.join(d, f"theirs.{ext}")
    common = (["-f", src_fmt] if src_fmt else []) + ["-O", out_fmt, *args]
    res = qk.run("convert", *common, *sources, ours, timeout=300)
    T.expect_ok(res, "qcow2kit convert")
    T.check(not res.out and not res.err, "convert printed something:\n" + res.describe())
    q.img("convert", *common, *sources, theirs)
    if out_fmt == "qcow2":
        check_clean(ours)
    # The target equals qemu-img's target (and so the sources).
    res = q.img("compare", "-f", out_fmt, "-F", out_fmt, ours, theirs, ok=False)
    T.check(res.rc == 0, "target differs from qemu-img's:\n" + res.describe())
    if len(sources) == 1 and not target_backing:
        res = q.img("compare", *(["-f", src_fmt] if src_fmt else []), "-F", out_fmt,
                    sources[0], ours, ok=False)
        T.check(res.rc == 0, "target differs from the source:\n" + res.describe())
    T.check_eq(q.info(ours)["virtual-size"], q.info(theirs)["virtual-size"], "virtual size")
    if check_map:
        T.check_json_eq(norm_map(ours, out_fmt), norm_map(theirs, out_fmt),
                        "qemu-img map of the target (offsets aside)")
    return ours, theirs


def matrix_cases(R):
    sources = {
        "qcow2-64k": lambda d: (mixed_qcow2(d), "qcow2"),
        "qcow2-512": lambda d: (mixed_qcow2(d, cluster_size=512), "qcow2"),
        "qcow2-2M": lambda d: (mixed_qcow2(d, cluster_size=2 * MiB), "qcow2"),
        "qcow2-extl2": lambda d: (mixed_qcow2(d, extended_l2="on"), "qcow2"),
        "raw-odd": lambda d: (raw_source(d), "raw"),
        "chain": lambda d: (chain_source(d), "qcow2"),
        "compressed": lambda d: (compressed_source(d), "qcow2"),
    }
    targets = {
        "qcow2": ("qcow2", []),
        "raw": ("raw", []),
        "qcow2-512": ("qcow2", ["-o", "cluster_size=512"]),
        "qcow2-2M": ("qcow2", ["-o", "cluster_size=2M"]),
        "qcow2-extl2": ("qcow2", ["-o", "extended_l2=on"]),
        "qcow2-S0": ("qcow2", ["-S", "0"]),
        "raw-S64k": ("raw", ["-S", "64k"]),
        "qcow2-W-m1": ("qcow2", ["-W", "-m", "1"]),
        "zlib": ("qcow2", ["-c"]),
        "zstd": ("qcow2", ["-c", "-o", "compression_type=zstd"]),
        "zlib-512": ("qcow2", ["-c", "-o", "cluster_size=512"]),
        "zstd-2M": ("qcow2", ["-c", "-o", "cluster_size=2M,compression_type=zstd"]),
        "zlib-S0": ("qcow2", ["-c", "-S", "0"]),
    }
    for sname, make in sources.items():
        for tname, (fmt, args) in targets.items():
            name = f"matrix/{sname}->{tname}"

            def one(name=name, make=make, fmt=fmt, args=args):
                d = case_dir(name)
                src, src_fmt = make(d)
                ours, theirs = both(d, [src], args, fmt, src_fmt)
                if "-c" in args:
                    a, b = os.path.getsize(ours), os.path.getsize(theirs)
                    T.check(a <= b * 1.02 + 4096,
                            f"compressed target {a} bytes, qemu-img's {b}: more than 2% larger")
                    # qemu-io reads it all back (decoding every compressed cluster).
                    res = q.img("compare", "-F", "qcow2", ours, theirs, ok=False)
                    T.check(res.rc == 0, res.describe())
            R.defer(name, one)


def feature_cases(R):
    def backing():
        d = case_dir("backing")
        base = q.create(os.path.join(d, "base.qcow2"), 4 * MiB)
        q.io(base, ["write -P 0x31 0 4M"])
        src = q.create(os.path.join(d, "src.qcow2"), 5 * MiB, backing=base, backing_fmt="qcow2")
        q.io(src, ["write -P 0x32 1M 100k", "write -z 2M 64k", "write -P 0x33 4M 1M"])
        ours, theirs = both(d, [src], ["-B", base, "-F", "qcow2"], "qcow2", target_backing=True)
        res = q.img("compare", src, ours, ok=False)
        T.check(res.rc == 0, "overlay target differs from the source:\n" + res.describe())
        T.check_eq(q.info(ours).get("backing-filename"), base, "target's backing file")
    R.defer("backing-B", backing)

    def no_create(target_is_zero):
        d = case_dir(f"n-{target_is_zero}")
        src = mixed_qcow2(d)
        size = q.info(src)["virtual-size"]
        extra = ["--target-is-zero"] if target_is_zero else []
        ours, theirs = os.path.join(d, "ours.qcow2"), os.path.join(d, "theirs.qcow2")
        for t in (ours, theirs):
            q.create(t, size + 64 * KiB)
            if not target_is_zero:  # old contents that zero ranges must overwrite
                q.io(t, ["write -P 0xee 0 7M"])
        T.expect_ok(qk.run("convert", "-n", "-O", "qcow2", *extra, src, ours), "convert -n")
        q.img("convert", "-n", "-O", "qcow2", *extra, src, theirs)
        check_clean(ours)
        res = q.img("compare", ours, theirs, ok=False)
        T.check(res.rc == 0, "differs from qemu-img's -n target:\n" + res.describe())
        T.check_json_eq(norm_map(ours, "qcow2"), norm_map(theirs, "qcow2"), "map after -n")
    R.defer("n-target-not-zero", no_create, False)
    R.defer("n-target-is-zero", no_create, True)

    def snapshot():
        d = case_dir("snapshot")
        src = q.create(os.path.join(d, "src.qcow2"), 4 * MiB, cluster_size=4096)
        q.io(src, ["write -P 0x41 0 1M", "write -z 2M 64k"])
        q.img("snapshot", "-c", "first", src)
        q.io(src, ["write -P 0x42 512k 1M", "discard 0 64k", "write -P 0x43 3M 4k"])
        q.img("resize", src, "6M")
        for args in (["-l", "first"], ["-l", "1"], ["-l", "snapshot.name=first"],
                     ["-l", "snapshot.id=1"], ["-c", "-l", "first"]):
            ours, theirs = both(d, [src], args, "qcow2", target_backing=True)
            ref = os.path.join(d, "ref.raw")
            q.img("convert", "-l", "first", "-O", "raw", src, ref)
            res = q.img("compare", "-F", "raw", ours, ref, ok=False)
            T.check(res.rc == 0, f"-l {args}: not the snapshot's data:\n" + res.describe())
        # IDs and names that cross: snapshot.name= must match names only, snapshot.id= IDs.
        q.img("snapshot", "-c", "2", src)   # ID 2, name "2"
        q.io(src, ["write -P 0x44 0 64k"])
        q.img("snapshot", "-c", "1", src)   # ID 3, name "1"
        for spec in ("snapshot.name=1", "snapshot.id=2", "snapshot.id=3,snapshot.name=1", "1"):
            ours, theirs = both(d, [src], ["-l", spec], "qcow2", target_backing=True)
        for args in (["-l", "snapshot.id=3,snapshot.name=2"], ["-l", "nothere"],
                     ["-l", "first", src]):
            out = os.path.join(d, "x.qcow2")
            ours = qk.run("convert", "-O", "qcow2", *args, src, out)
            theirs = T.run(["qemu-img", "convert", "-O", "qcow2", *args, src, out])
            T.expect_clean_error(ours)
            T.check_eq(T.strip_prog(ours.err), T.strip_prog(theirs.err), f"message for {args}")
            if os.path.exists(out):
                os.unlink(out)
    R.defer("snapshot-l", snapshot)

    def compressed_into_larger():
        # -c -n onto a larger image: the source's last, partial cluster must not wipe the
        # rest of that cluster in the target (it is written plain; qemu-img refuses it).
        d = case_dir("compressed-n-larger")
        src = write_file(os.path.join(d, "src.raw"), text_data(100 * KiB, 9))
        out = q.create(os.path.join(d, "out.qcow2"), MiB)
        q.io(out, ["write -P 0xee 0 1M"])
        T.expect_ok(qk.run("convert", "-n", "-c", "-f", "raw", "-O", "qcow2", src, out),
                    "convert -n -c")
        check_clean(out)
        ref = os.path.join(d, "ref.raw")
        with open(ref, "wb") as f:
            f.write(text_data(100 * KiB, 9) + b"\xee" * (MiB - 100 * KiB))
        res = q.img("compare", "-F", "raw", out, ref, ok=False)
        T.check(res.rc == 0, "target damaged past the source's end:\n" + res.describe())
    R.defer("compressed-n-onto-larger-target", compressed_into_larger)

    def several():
        d = case_dir("several")
        a = raw_source(d, "a.raw", 1 * MiB + 700)
        b = mixed_qcow2(d, "b.qcow2")
        c = raw_source(d, "c.raw", 3 * MiB)
        for fmt, args in (("qcow2", []), ("raw", []), ("qcow2", ["-c"])):
            ours, theirs = both(d, [a, b, c], args, fmt)
    R.defer("several-sources", several)

    def deterministic():
        d = case_dir("deterministic")
        src = compressed_source(d)
        outs = []
        for i, args in enumerate((["--threads", "1", "-m", "1"], ["--threads", "2"],
                                  ["--threads", "4", "-m", "16"])):
            out = os.path.join(d, f"out{i}.qcow2")
            T.expect_ok(qk.run("convert", "-c", "-O", "qcow2", *args, src, out), "convert -c")
            outs.append(out)
        for o in outs[1:]:
            T.check(T.sha256_file(o) == T.sha256_file(outs[0]),
                    f"{os.path.basename(o)} differs from {os.path.basename(outs[0])}: in-order "
                    "writes must not depend on threads or requests")
    R.defer("same-output-for-any-thread-count", deterministic)

    def progress():
        d = case_dir("progress")
        src = mixed_qcow2(d)
        out = os.path.join(d, "out.qcow2")
        res = T.run([qk.path, "convert", "-p", "-O", "qcow2", src, out],
                    env={**os.environ, "QCOW2KIT_PROGRESS": "force"})
        T.expect_ok(res, "convert -p")
        out = res.out.decode()
        T.check(out.startswith("    (0.00/100%)\r") and out.endswith("(100.00/100%)\r\n"),
                f"progress output {out!r}")
        res = qk.run("convert", "-p", "-O", "qcow2", src, out + "2")
        T.check(not res.out, "progress drawn into a pipe without QCOW2KIT_PROGRESS=force")
        res = T.run([qk.path, "convert", "-p", "-q", "-O", "qcow2", src, out + "3"],
                    env={**os.environ, "QCOW2KIT_PROGRESS": "force"})
        T.check(not res.out, "-q must silence -p")
    R.defer("progress", progress)


def error_cases(R):
    def errors():
        d = case_dir("errors")
        src = q.create(os.path.join(d, "a.qcow2"), MiB)
        q.io(src, ["write -P 1 0 64k"])
        cases = [["-m", "17"], ["-m", "0"], ["-S", "1000"], ["-S", "100M"],
                 ["--target-is-zero"], ["-n", "-o", "cluster_size=4k"], ["-c"],
                 ["-C", "-c"], ["-C", "-S", "4k"], ["-C", "--salvage"],
                 ["-O", "qcow2", "-B", src], ["-O", "qcow2", "-o", "backing_file=" + src],
                 ["-O", "qcow2", "-o", "preallocation=full", "-c"],
                 ["-O", "qcow2", "-B", src, "-F", "qcow2", src], ["-n"],
                 ["-O", "qcow2", "-o", "cluster_size=3k"]]
        for args in cases:
            out = os.path.join(d, "out.img")
            ours = qk.run("convert", *args, src, out)
            theirs = T.run(["qemu-img", "convert", *args, src, out])
            T.expect_clean_error(ours, what=" ".join(args))
            if args != ["-O", "qcow2", "-o", "cluster_size=3k"] and args != ["-n"]:
                T.check_eq(T.strip_prog(ours.err), T.strip_prog(theirs.err), f"message for {' '.join(args)}")
            T.check(not os.path.exists(out) or args == ["-O", "qcow2", "-o",
                                                          "cluster_size=3k"] and False,
                    f"{' '.join(args)} left {out} behind")
            if os.path.exists(out):
                os.unlink(out)
    R.defer("refused-options", errors)

    def unreadable(salvage):
        d = case_dir(f"unreadable-{salvage}")
        src = compressed_source(d)
        # Damage the stream of the compressed cluster at guest 256k: decoding it fails.
        entry = T.peek(src, T.l2_entry_location(src, 256 * KiB), ">Q")
        host = entry & ((1 << 54) - 1)
        T.poke_bytes(src, host, b"\xff" * 64)
        extra = ["--salvage"] if salvage else []
        ours = os.path.join(d, "ours.qcow2")
        theirs = os.path.join(d, "theirs.qcow2")
        res = qk.run("convert", "-O", "qcow2", *extra, src, ours)
        ref = T.run(["qemu-img", "convert", "-O", "qcow2", *extra, src, theirs])
        if not salvage:
            T.expect_clean_error(res, keywords=["error while reading at byte 262144"])
            T.check(ref.rc == 1, "qemu-img convert did not fail: " + ref.describe())
            T.check(not os.path.exists(ours), "a failed convert left its target behind")
            return
        T.expect_ok(res, "convert --salvage")
        T.check("warning" in res.err and "262144" in res.err, "no warning: " + res.describe())
        check_clean(ours)
        r = q.img("compare", ours, theirs, ok=False)
        T.check(r.rc == 0, "salvaged target differs from qemu-img's:\n" + r.describe())
        q.io(ours, ["read -P 0 256k 64k"])
    R.defer("unreadable-source-fails", unreadable, False)
    R.defer("unreadable-source-salvage", unreadable, True)


def main():
    global qk, q, TMP
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_convert")
    qk = T.Qcow2kit(args.qcow2kit)
    q = T.QemuTools()
    TMP = R.tmp
    with R.case("help-lists-convert"):
        T.check("convert" in qk.ok("--help").text, "--help does not mention convert")
    matrix_cases(R)
    feature_cases(R)
    error_cases(R)
    R.run_deferred()
    R.finish()


if __name__ == "__main__":
    main()
