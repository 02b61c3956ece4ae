#!/usr/bin/env python3
"""`qcow2kit write` and `qcow2kit resize`, with qemu-io / qemu-img as the judge.

write: every case runs qcow2kit on one image and the equivalent qemu-io command on a twin
copy, then requires the same guest contents (`qemu-img compare`), the same allocation
(`qemu-img map`, host offsets aside) and a clean `qemu-img check`; images with backing
files, compressed clusters, extended L2, v2 and raw images; errors and exit codes.

resize: qcow2kit resize on one image and `qemu-img resize` on a twin: the same virtual
size, a clean check, zeros in the grown range (also over a longer backing file and after a
shrink), roughly the same disk usage per preallocation mode and file length after a shrink,
and the same messages and exit codes for every error qemu-img reports.

Run: python3 tests/test_write_cli.py --qcow2kit build/qcow2kit [--only SUBSTR]
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qk_testlib as T  # noqa: E402
from qk_testlib import KiB, MiB  # noqa: E402

GiB = 1 << 30
TiB = 1 << 40

qk = None
q = None
TMP = None


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def case_dir(name):
    d = os.path.join(TMP, re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
    os.makedirs(d, exist_ok=True)
    return d


def twin(d, size, setup=(), fmt="qcow2", name="img", **opts):
    """Two identical images made by qemu-img (+ qemu-io commands): (ours, theirs)."""
    ours = os.path.join(d, f"{name}-qk.{fmt}")
    theirs = os.path.join(d, f"{name}-qemu.{fmt}")
    q.create(ours, size, fmt=fmt, **opts)
    if setup:
        q.io(ours, setup, fmt=fmt)
    shutil.copyfile(ours, theirs)
    return ours, theirs


def check_clean(path):
    res = q.img("check", path, ok=False)
    T.check(res.rc == 0 and "No errors were found" in res.text,
            f"qemu-img check {os.path.basename(path)} is not clean:\n" + res.describe())


def same_content(ours, theirs, fmt="qcow2"):
    res = q.img("compare", "-f", fmt, "-F", fmt, ours, theirs, ok=False)
    T.check(res.rc == 0, "guest contents differ from qemu's:\n" + res.describe())


def norm_map(path, fmt="qcow2"):
    """qemu-img map with host offsets reduced to whether there is one (the offsets depend on
    allocation order), adjacent runs with equal attributes merged (qemu-img splits them
    where host offsets jump). Allocated
    data that reads as zeros because the host file has a hole there (qcow2kit does not write
    the zero head and tail of a fresh cluster past the end of the file; qemu-img map probes
    the file) counts as plain data: contents are compared separately."""
    out = []
    raw = q.map(path, extra=("-f", fmt))
    for e, r in zip(T.strip_keys(raw, {"offset", "compressed"}), raw):
        # Whether a host cluster backs the range: an allocated zero cluster (--zeroes) and an
        # unmapped one (--unmap) read alike but differ here.
        e["mapped"] = "offset" in r
        if e.get("data"):
            e["zero"] = False
        prev = out[-1] if out else None
        if prev and prev["start"] + prev["length"] == e["start"] and \
                {k: v for k, v in prev.items() if k not in ("start", "length")} == \
                {k: v for k, v in e.items() if k not in ("start", "length")}:
            prev["length"] += e["length"]
        else:
            out.append(dict(e))
    return out


def same_map(ours, theirs, fmt="qcow2"):
    T.check_json_eq(norm_map(ours, fmt), norm_map(theirs, fmt), "qemu-img map (offsets aside)")


def same_as_qemu(ours, theirs, fmt="qcow2", check_map=True):
    same_content(ours, theirs, fmt)
    if check_map:
        same_map(ours, theirs, fmt)
    if fmt == "qcow2":
        check_clean(ours)


def reads(path, cmds, fmt="qcow2"):
    """qemu-io read checks (e.g. 'read -P 0xab 1M 300k') that must all succeed."""
    q.io(path, cmds, fmt=fmt)


def virtual_size(path):
    return q.info(path)["virtual-size"]


def actual_size(path):
    return q.info(path)["actual-size"]


def messages_like_qemu(res, want):
    T.expect_clean_error(res)
    T.check_eq(res.rc, want.rc, "exit status")
    T.check_eq(T.strip_prog(res.err), T.strip_prog(want.err), "error message (prefix aside)")


def random_file(path, n, seed):
    data = random.Random(seed).randbytes(n)
    with open(path, "wb") as f:
        f.write(data)
    return data


def file_sha(path):
    return T.sha256_file(path)


# --------------------------------------------------------------------------------------
# write
# --------------------------------------------------------------------------------------

def write_cases(R):
    def pattern_basic():
        d = case_dir("w-pattern")
        ours, theirs = twin(d, 4 * MiB)
        res = qk.ok("write", "--pattern", "0xab", "-o", "1M", "-l", "300k", ours)
        T.check_eq(res.out, b"", "stdout without -v")
        reads(ours, ["read -P 0xab 1M 300k", "read -P 0 0 1M", "read -P 0 1324k 2772k"])
        q.io(theirs, ["write -P 0xab 1M 300k"])
        same_as_qemu(ours, theirs)
    R.defer("write/pattern-0xab-1M-300k", pattern_basic)

    def pattern_unaligned():
        d = case_dir("w-unaligned")
        ours, theirs = twin(d, 4 * MiB, ["write -P 0x11 0 4M"])
        for off, ln, pat in [(1000, 5000, 171), (65535, 2, 1), (3 * MiB - 7, 70001, 0o17)]:
            qk.ok("write", "-P", str(pat) if pat != 0o17 else "017", "-o", off, "-l", ln, ours)
            q.io(theirs, [f"write -P {pat} {off} {ln}"])
        same_as_qemu(ours, theirs)
    R.defer("write/pattern-unaligned-decimal-octal", pattern_unaligned)

    def pattern_default_length():
        d = case_dir("w-deflen")
        ours, theirs = twin(d, 4 * MiB)
        qk.ok("write", "-P", "0x5a", "-o", "3M", ours)
        q.io(theirs, ["write -P 0x5a 3M 1M"])
        same_as_qemu(ours, theirs)
        qk.ok("write", "-P", "0x5b", ours)  # whole image
        reads(ours, ["read -P 0x5b 0 4M"])
        check_clean(ours)
    R.defer("write/pattern-default-length-to-end", pattern_default_length)

    def large_chunked(cluster_size):
        d = case_dir(f"w-large-{cluster_size}")
        ours, theirs = twin(d, 40 * MiB, cluster_size=cluster_size)
        qk.ok("write", "-P", "0x77", "-o", "12345", "-l", "33M", ours)
        q.io(theirs, ["write -P 0x77 12345 33M"])
        qk.ok("write", "-z", "-o", "5M", "-l", "20M", ours)
        q.io(theirs, ["write -z 5M 20M"])
        same_as_qemu(ours, theirs)
    R.defer("write/large-range-in-chunks-4k-clusters", large_chunked, 4096)
    R.defer("write/large-range-in-chunks-2M-clusters", large_chunked, 2 * MiB)

    def verbose_summary():
        d = case_dir("w-verbose")
        ours, theirs = twin(d, 4 * MiB)
        res = qk.ok("write", "-v", "-P", "1", "-o", "1M", "-l", "300k", ours)
        want = q.io(theirs, ["write -P 1 1M 300k"]).text.splitlines()[0]
        got = res.text.splitlines()
        T.check(got and got[0] == want, f"first -v line {got[:1]!r}, qemu-io says {want!r}")
        res = qk.ok("write", "-v", "-q", "-P", "1", "-l", "4k", ours)
        T.check_eq(res.out, b"", "stdout with -q -v")
    R.defer("write/verbose-summary-like-qemu-io", verbose_summary)

    def input_random():
        d = case_dir("w-input")
        ours, theirs = twin(d, 8 * MiB, ["write -P 0x33 0 8M"])
        src = os.path.join(d, "data.bin")
        n = 3 * MiB + 12345
        data = random_file(src, n, 1)
        qk.ok("write", "--input", src, "-o", "512k", ours)
        # the oracle: the twin converted to raw, with the data spliced in by hand, back to qcow2
        raw = q.to_raw(theirs, os.path.join(d, "expect.raw"))
        with open(raw, "r+b") as f:
            f.seek(512 * KiB)
            f.write(data)
        res = q.img("compare", "-f", "qcow2", "-F", "raw", ours, raw, ok=False)
        T.check(res.rc == 0, "contents differ from the expected raw image:\n" + res.describe())
        check_clean(ours)
        got = qk.ok("read", "-o", "512k", "-l", n, ours).out
        T.check(got == data, "qcow2kit read does not give the written data back")
    R.defer("write/input-random-file", input_random)

    def input_stdin_and_length():
        d = case_dir("w-stdin")
        ours, _ = twin(d, 4 * MiB)
        data = random.Random(2).randbytes(2 * MiB + 77)
        qk.ok("write", "--input", "-", "-o", "1000", ours, input=data)
        raw = os.path.join(d, "expect.raw")
        with open(raw, "wb") as f:
            f.truncate(4 * MiB)
            f.seek(1000)
            f.write(data)
        # -l shorter than the input: only its first bytes
        qk.ok("write", "--input", "-", "-o", "3M", "-l", "100k", ours, input=data)
        with open(raw, "r+b") as f:
            f.seek(3 * MiB)
            f.write(data[:100 * KiB])
        res = q.img("compare", "-f", "qcow2", "-F", "raw", ours, raw, ok=False)
        T.check(res.rc == 0, "contents differ from the expected raw image:\n" + res.describe())
        check_clean(ours)
        # an empty input writes nothing
        qk.ok("write", "--input", "-", ours, input=b"")
        res = q.img("compare", "-f", "qcow2", "-F", "raw", ours, raw, ok=False)
        T.check(res.rc == 0, "an empty input changed the image:\n" + res.describe())
    R.defer("write/input-stdin-and-length", input_stdin_and_length)

    def zeroes(unmap):
        d = case_dir(f"w-zeroes-{unmap}")
        ours, theirs = twin(d, 4 * MiB, ["write -P 0x44 0 4M"])
        extra = ["--unmap"] if unmap else []
        u = " -u" if unmap else ""
        for off, ln in [(64 * KiB, 128 * KiB), (1 * MiB + 100, 200 * KiB), (3 * MiB, 1 * MiB)]:
            qk.ok("write", "--zeroes", *extra, "-o", off, "-l", ln, ours)
            q.io(theirs, [f"write -z{u} {off} {ln}"])
        reads(ours, ["read -P 0 64k 128k", "read -P 0x44 0 64k", "read -P 0 3M 1M"])
        same_as_qemu(ours, theirs)
    R.defer("write/zeroes", zeroes, False)
    R.defer("write/zeroes-unmap", zeroes, True)

    def zeroes_whole_image():
        d = case_dir("w-zeroes-all")
        ours, theirs = twin(d, 4 * MiB, ["write -P 0x45 0 4M"])
        qk.ok("write", "-z", "-u", ours)
        q.io(theirs, ["write -z -u 0 4M"])
        reads(ours, ["read -P 0 0 4M"])
        same_as_qemu(ours, theirs)
    R.defer("write/zeroes-unmap-whole-image-default-length", zeroes_whole_image)

    def discard(compat):
        d = case_dir(f"w-discard-{compat}")
        ours, theirs = twin(d, 4 * MiB, ["write -P 0x55 0 4M"], compat=compat)
        for off, ln in [(0, 128 * KiB), (1 * MiB + 100, 200 * KiB), (3 * MiB, 1 * MiB)]:
            qk.ok("write", "--discard", "-o", off, "-l", ln, ours)
            q.io(theirs, [f"discard {off} {ln}"])
        reads(ours, ["read -P 0 0 128k", "read -P 0x55 128k 64k", "read -P 0 3M 1M"])
        same_as_qemu(ours, theirs)
    R.defer("write/discard-v3", discard, "1.1")
    R.defer("write/discard-v2", discard, "0.10")

    def backing():
        d = case_dir("w-backing")
        base = os.path.join(d, "base.qcow2")
        q.create(base, 4 * MiB)
        q.io(base, ["write -P 0x66 0 4M"])
        base_sha = file_sha(base)
        ours = q.create(os.path.join(d, "ov-qk.qcow2"), 4 * MiB, backing="base.qcow2",
                        backing_fmt="qcow2", cwd=d)
        theirs = q.create(os.path.join(d, "ov-qemu.qcow2"), 4 * MiB, backing="base.qcow2",
                          backing_fmt="qcow2", cwd=d)
        ops = [(["-P", "0x67", "-o", "1000", "-l", "3000"], "write -P 0x67 1000 3000"),
               (["-P", "0x68", "-o", "100k", "-l", "200k"], "write -P 0x68 100k 200k"),
               (["--zeroes", "-o", "1M", "-l", "64k"], "write -z 1M 64k"),
               (["--zeroes", "--unmap", "-o", "2M", "-l", "128k"], "write -z -u 2M 128k"),
               (["--discard", "-o", "3M", "-l", "256k"], "discard 3M 256k")]
        for argv, cmd in ops:
            qk.ok("write", *argv, ours)
            q.io(theirs, [cmd])
        reads(ours, ["read -P 0x66 0 1000", "read -P 0x67 1000 3000", "read -P 0x66 4000 60k",
                     "read -P 0 1M 64k", "read -P 0 2M 128k", "read -P 0 3M 256k"])
        same_as_qemu(ours, theirs)
        T.check_eq(file_sha(base), base_sha, "backing file sha256 (it must not be written)")
    R.defer("write/overlay-with-backing-file", backing)

    def compressed():
        d = case_dir("w-compressed")
        ours, theirs = twin(d, 2 * MiB, ["write -c -P 0x71 0 64k", "write -c -P 0x72 64k 64k",
                                         "write -c -P 0x73 128k 64k", "write -P 0x74 192k 64k"])
        for argv, cmd in [(["-P", "0x75", "-o", "1000", "-l", "100"], "write -P 0x75 1000 100"),
                          (["-z", "-o", "64k", "-l", "4k"], "write -z 64k 4k"),
                          (["--discard", "-o", "128k", "-l", "64k"], "discard 128k 64k")]:
            qk.ok("write", *argv, ours)
            q.io(theirs, [cmd])
        reads(ours, ["read -P 0x71 0 1000", "read -P 0x75 1000 100", "read -P 0x71 1100 63436",
                     "read -P 0 64k 4k", "read -P 0x72 68k 60k", "read -P 0 128k 64k"])
        same_as_qemu(ours, theirs)
    R.defer("write/into-compressed-clusters", compressed)

    def extended_l2():
        d = case_dir("w-extl2")
        ours, theirs = twin(d, 4 * MiB, ["write -P 0x81 0 64k", "write -P 0x82 1M 8k"],
                            extended_l2="on", cluster_size=65536)
        for argv, cmd in [(["-P", "0x83", "-o", "4k", "-l", "4k"], "write -P 0x83 4k 4k"),
                          (["-P", "0x84", "-o", "70000", "-l", "3000"], "write -P 0x84 70000 3000"),
                          (["-P", "0x85", "-o", "2M", "-l", "2k"], "write -P 0x85 2M 2k"),
                          (["-z", "-o", "1M", "-l", "4k"], "write -z 1M 4k"),
                          (["-z", "-u", "-o", "8k", "-l", "8k"], "write -z -u 8k 8k"),
                          (["--discard", "-o", "3M", "-l", "1M"], "discard 3M 1M")]:
            qk.ok("write", *argv, ours)
            q.io(theirs, [cmd])
        same_as_qemu(ours, theirs)
    R.defer("write/extended-l2-subclusters", extended_l2)

    def raw_image():
        d = case_dir("w-raw")
        ours, theirs = twin(d, 4 * MiB, ["write -P 0x91 0 4M"], fmt="raw")
        for argv, cmd in [(["-P", "0x92", "-o", "1000", "-l", "5000"], "write -P 0x92 1000 5000"),
                          (["-z", "-o", "1M", "-l", "1M"], "write -z 1M 1M"),
                          (["-z", "-u", "-o", "2M", "-l", "64k"], "write -z -u 2M 64k")]:
            qk.ok("write", "-f", "raw", *argv, ours)
            q.io(theirs, [cmd], fmt="raw")
        same_as_qemu(ours, theirs, fmt="raw", check_map=False)
        T.check_eq(os.path.getsize(ours), 4 * MiB, "raw file length")
    R.defer("write/raw-image", raw_image)

    def cache_and_engines():
        d = case_dir("w-engines")
        ours, theirs = twin(d, 4 * MiB)
        for i, argv in enumerate([["-t", "none"], ["-t", "writeback"], ["--engine", "sync"],
                                  ["--engine", "io_uring", "-t", "none"]]):
            qk.ok("write", *argv, "-P", str(i + 1), "-o", f"{i}M", "-l", "700k", ours)
            q.io(theirs, [f"write -P {i + 1} {i}M 700k"])
        same_as_qemu(ours, theirs)
    R.defer("write/cache-modes-and-engines", cache_and_engines)

    def lazy_refcounts_clean():
        d = case_dir("w-lazy")
        ours, theirs = twin(d, 4 * MiB, lazy_refcounts="on")
        qk.ok("write", "-P", "0x21", "-o", "64k", "-l", "1M", ours)
        q.io(theirs, ["write -P 0x21 64k 1M"])
        T.check_eq(q.info(ours)["dirty-flag"], False, "dirty flag after write")
        same_as_qemu(ours, theirs)
    R.defer("write/lazy-refcounts-image-closed-clean", lazy_refcounts_clean)

    # ---- errors ----
    def errors():
        d = case_dir("w-errors")
        img = q.create(os.path.join(d, "e.qcow2"), 4 * MiB)
        q.io(img, ["write -P 0x10 0 1M"])
        sha = file_sha(img)
        src = os.path.join(d, "five-megs.bin")
        random_file(src, 5 * MiB, 3)
        small = os.path.join(d, "small.bin")
        random_file(small, 1000, 4)
        missing = os.path.join(d, "no-such-image.qcow2")
        cases = [
            (["-P", "1", missing], ("no-such-image.qcow2",)),
            ([img], ("--pattern", "--zeroes")),
            (["-P", "1", "--zeroes", img], ("only one", "--zeroes")),
            (["--input", src, "--discard", img], ("only one", "--discard")),
            (["-P", "1", "--unmap", img], ("--unmap",)),
            (["-P", "1", "-o", "4M", "-l", "1", img], ("past the end",)),
            (["-P", "1", "-o", "5M", img], ("past the end",)),
            (["-P", "1", "-o", "3M", "-l", "2M", img], ("past the end",)),
            (["-z", "-o", "1", "-l", "4M", img], ("past the end",)),
            (["--input", src, img], ("past the end",)),
            (["--input", small, "-l", "2000", img], ("small.bin", "fewer")),
            (["--input", os.path.join(d, "nope.bin"), img], ("nope.bin",)),
            (["-P", "300", img], ("pattern",)),
            (["-P", "abc", img], ("pattern",)),
            (["-P", "1", "-o", "12Q", img], ("offset",)),
            (["-P", "1", "-l", "-1", img], ("length", "-1")),
            (["-P", "1", "-U", img], ("force-share", "read-only")),
            (["-P", "1", "-f", "vmdk", img], ("vmdk",)),
            (["-P", "1", "-t", "bogus", img], ("bogus",)),
        ]
        failures = []
        for argv, kws in cases:
            try:
                T.expect_clean_error(qk.run("write", *argv), kws)
            except T.Failure as e:
                failures.append(str(e))
        T.check(not failures, "\n".join(failures))
        T.check_eq(file_sha(img), sha, "image sha256 after the failed writes")
        # input longer than the image from standard input (length unknown in advance)
        res = qk.run("write", "--input", "-", "-o", "3M", img, input=b"\x01" * (2 * MiB))
        T.expect_clean_error(res, ("longer", "past the end"))
        check_clean(img)
    R.defer("write/errors", errors)

    def read_only_file():
        if os.geteuid() != 0:
            d = case_dir("w-ro")
            img = q.create(os.path.join(d, "ro.qcow2"), 1 * MiB)
            os.chmod(img, 0o444)
            T.expect_clean_error(qk.run("write", "-P", "1", img), ("permission", "read-only"))
            return
        # As root permissions do not apply: run as nobody on a world-readable file.
        d = case_dir("w-ro")
        os.chmod(TMP, 0o755)
        os.chmod(d, 0o755)
        img = q.create(os.path.join(d, "ro.qcow2"), 1 * MiB)
        os.chmod(img, 0o644)
        sha = file_sha(img)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = T.run(nobody + [qk.path, "--version"])
        if probe.rc != 0:
            return  # the binary is not reachable for nobody: nothing to test here
        for argv in (["write", "-P", "1", "-l", "4k", img], ["resize", img, "2M"]):
            res = T.run(nobody + [qk.path, *argv])
            T.expect_clean_error(res, ("permission denied",))
            T.check(res.err.startswith("qcow2kit: "), "message prefix:\n" + res.describe())
        T.check_eq(file_sha(img), sha, "image sha256")
    R.defer("write/read-only-image-file", read_only_file)


# --------------------------------------------------------------------------------------
# resize
# --------------------------------------------------------------------------------------

def resize_both(ours, theirs, *argv, fmt=None):
    """qcow2kit resize on `ours`, qemu-img resize on `theirs`; both must agree on success."""
    f = ["-f", fmt] if fmt else []
    want = q.img("resize", *f, *argv[:-1], theirs, argv[-1], ok=False)
    size_arg = argv[-1]
    opts = list(argv[:-1])
    got = qk.run("resize", *f, *opts, ours, size_arg)
    if want.rc == 0:
        T.expect_ok(got, "qemu-img resize succeeded, qcow2kit resize did not")
        T.check_eq(got.text, want.text, "stdout")
    else:
        messages_like_qemu(got, want)
    return got, want


def near(actual, expected, what, rel=0.25, slack=2 * MiB):
    T.check(abs(actual - expected) <= expected * rel + slack,
            f"{what}: {actual}, qemu's {expected} (tolerance {rel:.0%} + {slack})")


def resize_cases(R):
    def grow(prealloc, size_arg, start=64 * MiB, end=128 * MiB):
        d = case_dir(f"r-grow-{prealloc}-{size_arg}")
        ours, theirs = twin(d, start, ["write -P 0x12 0 1M", f"write -P 0x13 {start - 4096} 4k"])
        extra = [f"--preallocation={prealloc}"] if prealloc else []
        resize_both(ours, theirs, *extra, size_arg)
        T.check_eq(virtual_size(ours), end, "virtual size")
        T.check_eq(virtual_size(ours), virtual_size(theirs), "virtual size vs qemu's")
        reads(ours, [f"read -P 0 {start} {end - start}", "read -P 0x12 0 1M",
                     f"read -P 0x13 {start - 4096} 4k"])
        same_content(ours, theirs)
        check_clean(ours)
        if prealloc in ("falloc", "full"):
            near(actual_size(ours), actual_size(theirs), f"disk usage with {prealloc}")
            T.check(actual_size(ours) >= end - start, "the grown range was not allocated")
        else:
            T.check(actual_size(ours) < 16 * MiB, f"disk usage {actual_size(ours)} with "
                                                  f"preallocation={prealloc or 'off'}")
        if prealloc == "metadata":
            same_map(ours, theirs)
    R.defer("resize/grow-relative", grow, None, "+64M")
    R.defer("resize/grow-absolute", grow, None, "128M")
    R.defer("resize/grow-hex-size", grow, None, "0x8000000")
    R.defer("resize/grow-fractional-size", grow, None, "0.125G")
    for mode in ("off", "metadata", "falloc", "full"):
        R.defer(f"resize/grow-preallocation-{mode}", grow, mode, "128M")

    def grow_unaligned_start():
        # an old size that is not a cluster multiple: the old tail cluster's rest must read 0
        d = case_dir("r-grow-unaligned")
        ours, theirs = twin(d, 1 * MiB + 512, ["write -P 0x14 0 1049088"])
        resize_both(ours, theirs, "+3M")
        reads(ours, ["read -P 0x14 0 1049088", "read -P 0 1049088 3M"])
        same_as_qemu(ours, theirs)
    R.defer("resize/grow-from-unaligned-size", grow_unaligned_start)

    def shrink():
        d = case_dir("r-shrink")
        ours, theirs = twin(d, 64 * MiB, ["write -P 0x31 0 64M"])
        resize_both(ours, theirs, "--shrink", "16M")
        T.check_eq(virtual_size(ours), 16 * MiB, "virtual size")
        reads(ours, ["read -P 0x31 0 16M"])
        same_as_qemu(ours, theirs)
        near(os.path.getsize(ours), os.path.getsize(theirs), "file length after the shrink",
             rel=0.1, slack=512 * KiB)
        near(actual_size(ours), actual_size(theirs), "disk usage after the shrink",
             rel=0.1, slack=512 * KiB)
        # relative shrink
        resize_both(ours, theirs, "--shrink", "-8M")
        T.check_eq(virtual_size(ours), 8 * MiB, "virtual size after -8M")
        same_as_qemu(ours, theirs)
    R.defer("resize/shrink", shrink)

    def shrink_then_grow():
        # data past the new end must not come back when the image grows again
        d = case_dir("r-shrink-grow")
        ours, theirs = twin(d, 4 * MiB, ["write -P 0x32 0 4M"])
        resize_both(ours, theirs, "--shrink", str(MiB + 1536))
        resize_both(ours, theirs, "4M")
        reads(ours, [f"read -P 0x32 0 {MiB + 1536}", f"read -P 0 {MiB + 1536} {3 * MiB - 1536}"])
        # qemu-img 7.2 lets the old bytes of the cut cluster's tail show again (from 1M+1536
        # to 1M+64k); we do not. Everything else must be the same.
        q.io(theirs, [f"write -z {MiB + 1536} {64 * KiB - 1536}"])
        same_content(ours, theirs)
        check_clean(ours)
    R.defer("resize/shrink-then-grow-reads-zeros", shrink_then_grow)

    def shrink_needs_flag():
        d = case_dir("r-noshrink")
        ours, theirs = twin(d, 64 * MiB, ["write -P 0x33 0 1M"])
        sha = file_sha(ours)
        for argv in (["16M"], ["--", "-1M"], ["-1M"], ["1000"], ["0x100000"]):
            resize_both(ours, theirs, *argv)
        T.check_eq(virtual_size(ours), 64 * MiB, "virtual size")
        T.check_eq(file_sha(ours), sha, "image sha256")
    R.defer("resize/shrink-without-flag-fails", shrink_needs_flag)

    def errors():
        d = case_dir("r-errors")
        ours, theirs = twin(d, 64 * MiB, ["write -P 0x34 0 1M"])
        sha = file_sha(ours)
        for argv in (["abc"], ["1Q"], ["+"], ["20E"], ["9E"], ["8E"], ["--", "-128M"],
                     ["-64M"], ["--shrink", "-64M"], ["--shrink", "0"],
                     ["--shrink", "--preallocation=full", "16M"],
                     ["--preallocation=falloc", "64M"], ["--preallocation=full", "+0"],
                     ["--preallocation=bogus", "128M"], ["--shrink", "1000"], ["+1"],
                     ["-abc"]):
            resize_both(ours, theirs, *argv)
        T.check_eq(file_sha(ours), sha, "image sha256 after the failed resizes")
        missing = os.path.join(d, "no-such.qcow2")
        want = q.img("resize", missing, "1G", ok=False)
        got = qk.run("resize", missing, "1G")
        T.expect_clean_error(got, ("no-such.qcow2",))
        T.check_eq(got.rc, want.rc, "exit status for a missing image")
        for argv in ([], [ours]):
            T.expect_clean_error(qk.run("resize", *argv), ("Not enough arguments",))
    R.defer("resize/errors-like-qemu-img", errors)

    def noop_and_quiet():
        d = case_dir("r-noop")
        ours, theirs = twin(d, 64 * MiB)
        for argv in (["+0"], ["-0"], ["64M"], ["--shrink", "64M"]):
            resize_both(ours, theirs, *argv)
        got, _ = resize_both(ours, theirs, "-q", "+1M")
        T.check_eq(got.out, b"", "stdout with -q")
        got, _ = resize_both(ours, theirs, "--shrink", "-q", "--", "-1M")
        T.check_eq(virtual_size(ours), 64 * MiB, "virtual size")
        same_as_qemu(ours, theirs)
    R.defer("resize/no-op-sizes-and-quiet", noop_and_quiet)

    def past_l1_reach():
        d = case_dir("r-l1")
        ours, theirs = twin(d, 1 * GiB, ["write -P 0x41 0 64k", "write -P 0x42 1023M 1M"])
        resize_both(ours, theirs, "2T")
        T.check_eq(virtual_size(ours), 2 * TiB, "virtual size")
        check_clean(ours)
        qk.ok("write", "-P", "0x43", "-o", str(2 * TiB - 64 * KiB), "-l", "64k", ours)
        qk.ok("write", "-P", "0x44", "-o", "1T", "-l", "4k", ours)
        reads(ours, ["read -P 0x41 0 64k", "read -P 0x42 1023M 1M", "read -P 0 1G 1M",
                     f"read -P 0x43 {2 * TiB - 64 * KiB} 64k", "read -P 0x44 1T 4k",
                     "read -P 0 1099511631872 1M"])
        check_clean(ours)
        q.io(theirs, [f"write -P 0x43 {2 * TiB - 64 * KiB} 64k", "write -P 0x44 1T 4k"])
        same_map(ours, theirs)
        # and back: a shrink that frees the far L2 tables
        resize_both(ours, theirs, "--shrink", "1G")
        same_as_qemu(ours, theirs)
    R.defer("resize/grow-past-l1-reach-64k-clusters-1G-to-2T", past_l1_reach)

    def backing(base_size, old, new):
        d = case_dir(f"r-backing-{base_size}-{old}-{new}")
        base = os.path.join(d, "base.qcow2")
        q.create(base, base_size)
        q.io(base, [f"write -P 0x51 0 {base_size}"])
        ours = q.create(os.path.join(d, "ov-qk.qcow2"), old, backing="base.qcow2",
                        backing_fmt="qcow2", cwd=d)
        theirs = q.create(os.path.join(d, "ov-qemu.qcow2"), old, backing="base.qcow2",
                          backing_fmt="qcow2", cwd=d)
        resize_both(ours, theirs, str(new))
        T.check_eq(virtual_size(ours), new, "virtual size")
        shown = min(base_size, old)
        reads(ours, [f"read -P 0x51 0 {shown}", f"read -P 0 {shown} {new - shown}"])
        same_as_qemu(ours, theirs)
    R.defer("resize/backing-longer-than-new-size", backing, 8 * MiB, 1 * MiB, 4 * MiB)
    R.defer("resize/backing-longer-than-old-size", backing, 4 * MiB, 1 * MiB, 8 * MiB)
    R.defer("resize/backing-shorter", backing, 1 * MiB, 2 * MiB, 8 * MiB)

    def v2_image():
        d = case_dir("r-v2")
        ours, theirs = twin(d, 16 * MiB, ["write -P 0x61 0 16M"], compat="0.10")
        resize_both(ours, theirs, "+16M")
        reads(ours, ["read -P 0x61 0 16M", "read -P 0 16M 16M"])
        same_as_qemu(ours, theirs)
        resize_both(ours, theirs, "--shrink", "4M")
        same_as_qemu(ours, theirs)
        T.check_eq(T.read_header(ours)["version"], 2, "header version")
    R.defer("resize/v2-image", v2_image)

    def snapshots(compat, shrink):
        d = case_dir(f"r-snap-{compat}-{shrink}")
        ours, theirs = twin(d, 16 * MiB, ["write -P 0x62 0 16M"], compat=compat)
        for p in (ours, theirs):
            q.img("snapshot", "-c", "s1", p)
        argv = ["--shrink", "8M"] if shrink else ["32M"]
        got, want = resize_both(ours, theirs, *argv)
        if want.rc == 0:
            same_as_qemu(ours, theirs)
            T.check_eq(len(q.info(ours).get("snapshots", [])), 1, "snapshots kept")
    R.defer("resize/v3-with-snapshot-grow", snapshots, "1.1", False)
    R.defer("resize/v3-with-snapshot-shrink", snapshots, "1.1", True)
    R.defer("resize/v2-with-snapshot-refused", snapshots, "0.10", False)

    def raw():
        d = case_dir("r-raw")
        ours, theirs = twin(d, 1 * MiB, ["write -P 0x71 0 1M"], fmt="raw")
        steps = [["+1"], ["1049000"], ["--shrink", "1000"], ["--preallocation=full", "2M"],
                 ["--preallocation=metadata", "3M"], ["--preallocation=falloc", "4M"],
                 ["--preallocation=falloc", "4M"], ["+1M"], ["--shrink", "--", "-3M"],
                 ["--shrink", "--", "-5M"]]
        for argv in steps:
            resize_both(ours, theirs, *argv, fmt="raw")
            T.check_eq(os.path.getsize(ours), os.path.getsize(theirs),
                       f"raw file length after resize {' '.join(argv)}")
            near(os.stat(ours).st_blocks * 512, os.stat(theirs).st_blocks * 512,
                 f"raw disk usage after resize {' '.join(argv)}", rel=0.1, slack=64 * KiB)
        same_content(ours, theirs, fmt="raw")
    R.defer("resize/raw-image", raw)


# --------------------------------------------------------------------------------------

def main():
    global qk, q, TMP
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_write_cli")
    qk = T.Qcow2kit(args.qcow2kit)
    q = T.QemuTools()
    TMP = R.tmp
    if not qk.exists():
        with R.case("qcow2kit-binary-exists"):
            T.fail(f"{args.qcow2kit} does not exist or is not executable")
        R.finish()
    with R.case("help-lists-write-and-resize"):
        res = qk.ok("--help")
        for sub in ("write", "resize"):
            T.check(sub in res.text, f"--help does not mention `{sub}`")
        for sub in ("write", "resize"):
            T.check(re.search(r"usage", qk.ok(sub, "--help").text, re.I), f"{sub} --help")
    write_cases(R)
    resize_cases(R)
    R.run_deferred()
    R.finish()


if __name__ == "__main__":
    main()
