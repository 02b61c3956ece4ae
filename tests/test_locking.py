#!/usr/bin/env python3
"""Image locking against QEMU's: while qemu-io holds an image, qcow2kit must fail (or succeed)
exactly where qemu-img would, with the same "Failed to get ... lock" reason; while qcow2kit
holds an image, qemu-img must fail where it fails against another QEMU. The lock bytes
qcow2kit takes (from /proc/locks) must be the ones QEMU takes for the same kind of open: image
files, backing files (qcow2 and raw) and external data files, read-only and read-write.
-U (force share) takes and checks no locks and is refused for writes, as QEMU refuses it.

Holders run in the background (qemu-io -c 'sleep ...', qcow2kit bench [-w] with a huge
count); each case waits until the holder's locks are visible in /proc/locks and kills it at
the end.

Run: python3 tests/test_locking.py --qcow2kit build/qcow2kit [--only SUBSTR]
"""

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qk_testlib as T  # noqa: E402
from qk_testlib import MiB  # noqa: E402

TIMEOUT = 30
HOLD_WAIT = 10  # seconds a holder may take to open its image
LOCK_PHRASE = re.compile(r'Failed to get (shared )?"[a-z ]+" lock')
FORCE_SHARE_RW = "force-share=on can only be used with read-only images"


def lock_bytes(path):
    """The QEMU lock bytes (100-104, 200-204) anybody holds on `path`, from /proc/locks."""
    ino = str(os.stat(path).st_ino)
    held = set()
    with open("/proc/locks") as f:
        for line in f:
            # "1: OFDLCK ADVISORY READ -1 08:01:1234 100 101"; waiters ("->") hold nothing.
            parts = line.split()
            if "->" in parts or len(parts) < 8 or parts[5].rsplit(":", 1)[-1] != ino:
                continue
            start = int(parts[6])
            end = 1 << 62 if parts[7] == "EOF" else int(parts[7])
            held |= {b for b in (*range(100, 105), *range(200, 205)) if start <= b <= end}
    return held


@contextlib.contextmanager
def holding(argv, wants, cwd=None):
    """Runs `argv` in the background until the block ends and kills it then. First waits until
    every file in `wants` ({path: lock bytes}) has at least its bytes locked, and the locks of
    those files have stopped changing (QEMU claims a chain's files one after the other, and a
    data file in two steps)."""
    argv = [str(a) for a in argv]
    p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + HOLD_WAIT
        last, stable = None, 0
        while stable < 5:  # the same locks seen over 5 polls (50 ms)
            if p.poll() is not None:
                T.fail(f"holder exited ({p.returncode}) before locking its files: "
                       f"{' '.join(argv)}\n{p.stderr.read().decode(errors='replace')}")
            now = {f: lock_bytes(os.path.join(cwd or "", f)) for f in wants}
            if time.monotonic() > deadline:
                T.fail(f"holder did not lock {wants} within {HOLD_WAIT}s (locked: {now}): "
                       f"{' '.join(argv)}")
            ready = all(want <= now[f] for f, want in wants.items())
            stable = stable + 1 if ready and now == last else 0
            last = now
            time.sleep(0.01)
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stderr.close()
        # A killed process's locks can outlive it briefly: requests it left in flight on an
        # io_uring keep its files open until the ring is torn down, after the exit.
        deadline = time.monotonic() + HOLD_WAIT
        while any(lock_bytes(os.path.join(cwd or "", f)) for f in wants) and \
                time.monotonic() < deadline:
            time.sleep(0.01)


def qemu_holder(path, writable, fmt="qcow2"):
    return ["qemu-io", "-f", fmt, *([] if writable else ["-r"]), "-c", "sleep 1000000", path]


def qk_holder(qk, path, writable):
    # -d 1: one request in flight is enough to keep the image open; the count never ends.
    return [qk.path, "bench", *(["-w"] if writable else []), "-c", "2000000000", "-d", "1",
            path]


def qemu(*argv, cwd=None):
    return T.run([str(a) for a in argv], timeout=TIMEOUT, cwd=cwd)


def phrase(res):
    m = LOCK_PHRASE.search(res.err)
    return m.group(0) if m else None


def expect_lock_error(res, want_phrase, locked_path, what):
    """Exit 1 with `want_phrase` and QEMU's hint naming `locked_path`."""
    T.expect_clean_error(res, (want_phrase,), what)
    hint = f"Is another process using the image [{locked_path}]?"
    T.check(hint in res.err, f"{what}: no {hint!r} in stderr:\n{res.describe()}")
    T.check_eq(phrase(res), want_phrase, f"{what}: lock failure")


def expect_agree(ours, theirs, what):
    """qcow2kit and QEMU both succeed, or both fail for the same lock reason."""
    T.expect_no_crash(ours, what)
    if (ours.rc == 0) != (theirs.rc == 0):
        T.fail(f"{what}: qcow2kit and QEMU disagree:\n{ours.describe()}\n{theirs.describe()}")
    if ours.rc != 0:
        T.check_eq(phrase(ours), phrase(theirs), f"{what}: lock failure reason")
        T.check(phrase(ours) is not None, f"{what}: not a lock failure:\n{ours.describe()}")


def without_prefix(text, program):
    return "\n".join(line[len(program) + 2:] if line.startswith(program + ": ") else line
                     for line in text.strip().splitlines())


def build_images(q, d):
    imgs = {}
    a = q.create(os.path.join(d, "a.qcow2"), 4 * MiB)
    q.io(a, ["write -P 0x11 0 256k", "write -P 0x22 1M 64k"])
    imgs["a"] = a
    imgs["base"] = q.create(os.path.join(d, "base.qcow2"), 4 * MiB)
    imgs["top"] = q.create(os.path.join(d, "top.qcow2"), backing="base.qcow2",
                           backing_fmt="qcow2", cwd=d)
    imgs["base.raw"] = q.create(os.path.join(d, "base.raw"), 4 * MiB, fmt="raw")
    imgs["top-raw"] = q.create(os.path.join(d, "top-raw.qcow2"), backing="base.raw",
                               backing_fmt="raw", cwd=d)
    imgs["d"] = q.create("d.qcow2", 4 * MiB, cwd=d, data_file="d.data")
    imgs["d"] = os.path.join(d, "d.qcow2")
    imgs["d.data"] = os.path.join(d, "d.data")
    # A second image on the same data file: its data file conflicts, not its image file.
    d2 = os.path.join(d, "d2.qcow2")
    with open(imgs["d"], "rb") as src, open(d2, "wb") as dst:
        dst.write(src.read())
    imgs["d2"] = d2
    return imgs


def main():
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_locking")
    qk = T.Qcow2kit(args.qcow2kit)
    q = T.QemuTools()
    if not qk.exists():
        with R.case("qcow2kit-binary-exists"):
            T.fail(f"{args.qcow2kit} does not exist or is not executable")
        R.finish()
    if not os.path.exists("/proc/locks"):
        with R.case("proc-locks"):
            T.fail("/proc/locks is needed to see when a holder has opened its image")
        R.finish()
    imgs = R.setup("images", build_images, q, R.tmp)
    if imgs is None:
        R.finish()
    a = imgs["a"]

    # ---- QEMU writes the image ------------------------------------------------------
    with R.case("qemu-writer/qcow2kit-readers-fail-like-qemu-img"):
        with holding(qemu_holder(a, True), {a: {101, 201}}):
            ours, theirs = qk.run("info", a), qemu("qemu-img", "info", a)
            expect_lock_error(ours, 'Failed to get shared "write" lock', a, "qcow2kit info")
            expect_lock_error(theirs, 'Failed to get shared "write" lock', a, "qemu-img info")
            T.check_eq(without_prefix(ours.err, "qcow2kit"), without_prefix(theirs.err, "qemu-img"),
                       "error message (program names aside)")
            expect_agree(qk.run("info", "--backing-chain", a),
                         qemu("qemu-img", "info", "--backing-chain", a), "info --backing-chain")
            expect_agree(qk.run("map", a), qemu("qemu-img", "map", a), "map")
            expect_agree(qk.run("read", "-l", "512", "--sha256", a),
                         qemu("qemu-io", "-r", "-c", "read 0 512", a), "read")
            expect_lock_error(qk.run("dump", "--header", a), 'Failed to get shared "write" lock',
                              a, "dump")

    with R.case("qemu-writer/qcow2kit-writer-fails-like-qemu-img"):
        with holding(qemu_holder(a, True), {a: {101, 201}}):
            ours = qk.run("bench", "-w", "-c", "1", a)
            expect_lock_error(ours, 'Failed to get "write" lock', a, "qcow2kit bench -w")
            expect_agree(ours, qemu("qemu-img", "bench", "-w", "-c", "1", a), "bench -w")

    with R.case("qemu-writer/force-share-reads"):
        with holding(qemu_holder(a, True), {a: {101, 201}}):
            T.expect_ok(qemu("qemu-img", "info", "-U", a), "qemu-img info -U")
            info = qk.json("info", "-U", "--output=json", a)
            T.check_eq(info.get("format"), "qcow2", "info -U format")
            res = qk.ok("read", "-U", "-l", "256k", "--sha256", a)
            T.check_eq(T.parse_sha256_output(res), hashlib.sha256(b"\x11" * 256 * 1024)
                       .hexdigest(), "read -U: data written before the holder started")
            qk.ok("map", "-U", a)

    with R.case("force-share-refused-for-writes"):
        ours = qk.run("bench", "-w", "-U", "-c", "1", a)
        theirs = qemu("qemu-img", "bench", "-w", "-U", "-c", "1", a)
        T.expect_clean_error(ours, (FORCE_SHARE_RW,), "qcow2kit bench -w -U")
        T.expect_clean_error(theirs, (FORCE_SHARE_RW,), "qemu-img bench -w -U")
        T.check_eq(without_prefix(ours.err, "qcow2kit"), without_prefix(theirs.err, "qemu-img"),
                   "error message (program names aside)")

    # ---- QEMU reads the image ---------------------------------------------------------
    with R.case("qemu-reader/qcow2kit-shares-reads-refuses-writes"):
        with holding(qemu_holder(a, False), {a: {100, 201}}):
            expect_agree(qk.run("info", a), qemu("qemu-img", "info", a), "info")
            expect_agree(qk.run("read", "-l", "512", "--sha256", a),
                         qemu("qemu-io", "-r", "-c", "read 0 512", a), "read")
            ours = qk.run("bench", "-w", "-c", "1", a)
            expect_lock_error(ours, 'Failed to get "write" lock', a, "qcow2kit bench -w")
            expect_agree(ours, qemu("qemu-img", "bench", "-w", "-c", "1", a), "bench -w")

    # ---- qcow2kit holds the image -----------------------------------------------------
    with R.case("qcow2kit-writer/qemu-fails"):
        with holding(qk_holder(qk, a, True), {a: {101, 201}}):
            expect_lock_error(qemu("qemu-img", "info", a), 'Failed to get shared "write" lock', a,
                              "qemu-img info")
            expect_lock_error(qemu("qemu-io", "-r", "-c", "read 0 512", a),
                              'Failed to get shared "write" lock', a, "qemu-io -r")
            expect_lock_error(qemu("qemu-io", "-c", "read 0 512", a),
                              'Failed to get "write" lock', a, "qemu-io (read-write)")
            T.expect_ok(qemu("qemu-img", "info", "-U", a), "qemu-img info -U")
            # Our own second open is refused the same way (OFD locks are per open file).
            expect_lock_error(qk.run("info", a), 'Failed to get shared "write" lock', a,
                              "qcow2kit info")
            qk.ok("info", "-U", a)
        T.check_eq(lock_bytes(a), set(), "lock bytes after the holder was killed")
        T.expect_ok(qemu("qemu-img", "info", a), "qemu-img info once qcow2kit has exited")

    with R.case("qcow2kit-reader/qemu-shares-reads-refuses-writes"):
        with holding(qk_holder(qk, a, False), {a: {100, 201}}):
            T.expect_ok(qemu("qemu-img", "info", a), "qemu-img info")
            T.expect_ok(qemu("qemu-io", "-r", "-c", "read 0 512", a), "qemu-io -r")
            expect_lock_error(qemu("qemu-io", "-c", "write 0 512", a),
                              'Failed to get "write" lock', a, "qemu-io write")
            expect_lock_error(qemu("qemu-img", "resize", a, "+1M"),
                              'Failed to get "write" lock', a, "qemu-img resize")

    # ---- the same lock bytes as QEMU, file by file --------------------------------------
    layouts = [  # (image, files whose locks are compared)
        ("a", ["a"]),
        ("top", ["top", "base"]),
        ("top-raw", ["top-raw", "base.raw"]),
        ("d", ["d", "d.data"]),
    ]
    for name, files in layouts:
        for writable in (True, False):
            mode = "rw" if writable else "ro"
            with R.case(f"same-lock-bytes/{name}/{mode}"):
                # Relative names from the images' directory: QEMU 7.2 opens a relative data
                # file name from its working directory, not from the image's.
                img = os.path.basename(imgs[name])
                wants = {os.path.basename(imgs[f]): {100} for f in files}
                seen = {}
                for who, argv in (("qemu-io", qemu_holder(img, writable)),
                                  ("qcow2kit", qk_holder(qk, img, writable))):
                    with holding(argv, wants, cwd=R.tmp):
                        seen[who] = {f: sorted(lock_bytes(imgs[f])) for f in files}
                T.check_eq(seen["qcow2kit"], seen["qemu-io"], "lock bytes per file")

    # ---- backing and data files -------------------------------------------------------
    base, top = imgs["base"], imgs["top"]
    with R.case("backing/qemu-holds-chain"):
        with holding(qemu_holder(top, True), {top: {101}, base: {100, 201}}):
            expect_agree(qk.run("info", base), qemu("qemu-img", "info", base), "info base")
            ours = qk.run("bench", "-w", "-c", "1", base)
            expect_lock_error(ours, 'Failed to get "write" lock', base, "bench -w base")
            expect_agree(ours, qemu("qemu-img", "bench", "-w", "-c", "1", base), "bench -w base")

    with R.case("backing/qcow2kit-holds-chain"):
        with holding(qk_holder(qk, top, True), {top: {101}, base: {100, 201}}):
            T.expect_ok(qemu("qemu-img", "info", base), "qemu-img info base")
            expect_lock_error(qemu("qemu-img", "bench", "-w", "-c", "1", base),
                              'Failed to get "write" lock', base, "qemu-img bench -w base")

    # Run from the images' directory with relative names (see same-lock-bytes above).
    d, d2, data, wd = "d.qcow2", "d2.qcow2", "d.data", R.tmp
    with R.case("data-file/qemu-holds-it"):
        with holding(qemu_holder(d, True), {d: {101}, data: {101, 203}}, cwd=wd):
            ours = qk.run("map", d2, cwd=wd)
            expect_lock_error(ours, 'Failed to get shared "resize" lock', data, "map d2")
            expect_agree(ours, qemu("qemu-img", "map", d2, cwd=wd), "map d2")
            ours = qk.run("bench", "-w", "-c", "1", d2, cwd=wd)
            expect_lock_error(ours, 'Failed to get shared "resize" lock', data, "bench -w d2")
            expect_agree(ours, qemu("qemu-img", "bench", "-w", "-c", "1", d2, cwd=wd),
                         "bench -w d2")
            expect_agree(qk.run("info", "-f", "raw", data, cwd=wd),
                         qemu("qemu-img", "info", "-f", "raw", data, cwd=wd),
                         "info of the data file")

    with R.case("data-file/qcow2kit-holds-it"):
        with holding(qk_holder(qk, d, True), {d: {101}, data: {101, 203}}, cwd=wd):
            expect_lock_error(qemu("qemu-img", "map", d2, cwd=wd),
                              'Failed to get shared "resize" lock', data, "qemu-img map d2")
            expect_lock_error(qemu("qemu-img", "resize", "-f", "raw", data, "+1M", cwd=wd),
                              'Failed to get "resize" lock', data, "qemu-img resize data file")

    R.finish()


if __name__ == "__main__":
    main()
