"""Shared helpers for the qcow2kit integration tests (Python standard library only).

Every tests/test_*.py script is run as

    python3 tests/test_X.py --qcow2kit /path/to/qcow2kit [--long]

and prints a last line ``N passed, N failed``. Its exit status is 1 if a case failed, else 77
(ctest's SKIP_RETURN_CODE) if a case called ``skip()``, else 0. With QCOW2KIT_NO_SKIP=1 in the
environment (``make test`` sets it) a skipped case fails instead: on the project's own machine
kind everything a case needs is installed, so nothing may be skipped there.

What lives here:
  * argument parsing (``parse_args``) and the case runner (``Runner``),
  * ``run`` - run a command with a timeout, capture its output and flag crashes
    (death by signal, timeout, any sanitizer report on stderr),
  * ``QemuTools`` - make and inspect images with qemu-img / qemu-io (the oracle),
  * ``Qcow2kit`` - run the program under test,
  * JSON / file comparison helpers and a tiny qcow2 header parser for byte-poking.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback

SANITIZER_MARKERS = ("AddressSanitizer", "runtime error:", "LeakSanitizer",
                     "UndefinedBehaviorSanitizer", "ThreadSanitizer")

MiB = 1 << 20
KiB = 1 << 10


# --------------------------------------------------------------------------------------
# Arguments and the case runner
# --------------------------------------------------------------------------------------

def parse_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--qcow2kit", required=True, help="path of the qcow2kit binary under test")
    p.add_argument("--long", action="store_true", help="run the long (soak/fuzz) variants")
    p.add_argument("--only", default=None,
                   help="run only the cases whose name contains this substring")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (its path is printed)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every command run")
    p.add_argument("-j", "--jobs", type=int, default=3,
                   help="cases run concurrently by run_deferred() (default 3: most of the "
                        "time of a sanitizer build is start-up, not CPU)")
    # tests/CMakeLists.txt passes an empty argument when QCOW2KIT_LONG_TESTS is off.
    args = p.parse_args([a for a in sys.argv[1:] if a != ""])
    args.qcow2kit = os.path.abspath(args.qcow2kit)
    return args


class Skipped(Exception):
    """Raised by skip(): the case cannot run here (a tool or device is missing)."""


def skip(why):
    raise Skipped(why)


class Failure(Exception):
    """A failed expectation inside a case; the message is the detail printed."""


def fail(msg):
    raise Failure(msg)


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def check_eq(actual, expected, what):
    if actual != expected:
        raise Failure(f"{what}: expected {expected!r}, got {actual!r}")


class Runner:
    """Records one result per named case and prints the summary line at the end."""

    def __init__(self, args, title):
        self.args = args
        self.title = title
        self.passed = 0
        self.failed = []
        self.skipped = []
        self._seen = set()
        self._queue = []
        self.start = time.monotonic()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"qk-{title}-")
        self.tmp = self._tmp.name
        if args.keep:
            self._tmp._finalizer.detach()  # keep the directory after exit
            print(f"# temporary directory: {self.tmp}")
        global VERBOSE
        VERBOSE = args.verbose

    def wanted(self, name):
        return self.args.only is None or self.args.only in name

    @contextlib.contextmanager
    def case(self, name):
        """``with runner.case("name"):`` - a Failure/exception inside marks the case failed.

        Cases filtered out by --only are still executed (later cases may depend on their
        side effects, e.g. images) but are not counted."""
        counted = self.wanted(name)
        if counted and name in self._seen:
            self._record_fail(name, "duplicate case name (a bug in the test script)")
        self._seen.add(name)
        t0 = time.monotonic()
        try:
            yield
        except Skipped as e:
            if counted:
                self._record_skip(name, str(e))
            return
        except Failure as e:
            if counted:
                self._record_fail(name, str(e))
            return
        except Exception:  # a bug in the test or an unexpected tool behaviour
            if counted:
                self._record_fail(name, "unexpected exception:\n" + traceback.format_exc())
            return
        if counted:
            self.passed += 1
            if self.args.verbose:
                print(f"ok   {name} ({time.monotonic() - t0:.2f}s)")

    def defer(self, name, fn, *a, **kw):
        """Queue a case; run_deferred() runs the queue concurrently and records the results
        in queue order. fn must not depend on other queued cases."""
        if self.wanted(name):
            self._queue.append((name, fn, a, kw))

    def run_deferred(self):
        queue, self._queue = self._queue, []

        def call(fn, a, kw):
            t0 = time.monotonic()
            try:
                fn(*a, **kw)
                return None, time.monotonic() - t0
            except Skipped as e:
                return Skipped(str(e)), time.monotonic() - t0
            except Failure as e:
                return str(e), time.monotonic() - t0
            except Exception:
                return "unexpected exception:\n" + traceback.format_exc(), time.monotonic() - t0

        with concurrent.futures.ThreadPoolExecutor(max(1, self.args.jobs)) as ex:
            futs = [(name, ex.submit(call, fn, a, kw)) for name, fn, a, kw in queue]
            for name, fut in futs:
                err, secs = fut.result()
                if not self.wanted(name):
                    continue
                if name in self._seen:
                    self._record_fail(name, "duplicate case name (a bug in the test script)")
                self._seen.add(name)
                if isinstance(err, Skipped):
                    self._record_skip(name, str(err))
                elif err is None:
                    self.passed += 1
                    if self.args.verbose:
                        print(f"ok   {name} ({secs:.2f}s)")
                else:
                    self._record_fail(name, err)

    def _record_skip(self, name, why):
        if os.environ.get("QCOW2KIT_NO_SKIP"):
            self._record_fail(name, f"skipped ({why}), and QCOW2KIT_NO_SKIP forbids skips")
            return
        self.skipped.append(name)
        print(f"SKIP {name}: {why}")
        sys.stdout.flush()

    def _record_fail(self, name, detail):
        self.failed.append(name)
        print(f"FAIL {name}")
        for line in detail.rstrip().splitlines():
            print(f"     {line}")
        sys.stdout.flush()

    def setup(self, what, fn, *a, **kw):
        """Run a setup step (image generation); if it throws, report it as a failed case
        named ``setup/<what>`` and return None."""
        try:
            return fn(*a, **kw)
        except Failure as e:
            self._record_fail(f"setup/{what}", str(e))
        except Exception:
            self._record_fail(f"setup/{what}", "unexpected exception:\n" + traceback.format_exc())
        return None

    def finish(self):
        elapsed = time.monotonic() - self.start
        if self.failed:
            print(f"# failed cases ({len(self.failed)}):")
            for n in self.failed:
                print(f"#   {n}")
        print(f"# {self.title}: {elapsed:.1f}s")
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        print(f"{self.passed} passed, {len(self.failed)} failed{skipped}")
        sys.stdout.flush()
        if not self.args.keep:
            self._tmp.cleanup()
        sys.exit(1 if self.failed else 77 if self.skipped else 0)


# --------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------

VERBOSE = False


@dataclasses.dataclass
class Result:
    argv: list
    rc: int            # exit status; negative = killed by that signal; None = timed out
    out: bytes
    err: str
    timed_out: bool
    seconds: float

    @property
    def text(self):
        return self.out.decode("utf-8", "replace")

    @property
    def signal(self):
        return -self.rc if (self.rc is not None and self.rc < 0) else None

    @property
    def sanitizer(self):
        return any(m in self.err for m in SANITIZER_MARKERS)

    @property
    def crashed(self):
        """Death by signal, a timeout or a sanitizer report: never acceptable."""
        return self.timed_out or self.signal is not None or self.sanitizer or \
            (self.rc is not None and self.rc >= 128)

    def cmdline(self):
        return " ".join(shlex.quote(str(a)) for a in self.argv)

    def describe(self, max_out=1500):
        if self.timed_out:
            status = "TIMED OUT"
        elif self.signal is not None:
            try:
                status = f"killed by signal {self.signal} ({signal.Signals(self.signal).name})"
            except ValueError:
                status = f"killed by signal {self.signal}"
        else:
            status = f"exit {self.rc}"
        if self.sanitizer:
            status += " + SANITIZER REPORT"
        out = self.text
        if len(out) > max_out:
            out = out[:max_out] + f"... [{len(self.out)} bytes]"
        err = self.err
        if len(err) > 3000:
            err = err[:3000] + f"... [{len(self.err)} chars]"
        s = f"$ {self.cmdline()}\n  -> {status} ({self.seconds:.2f}s)"
        if out.strip():
            s += "\n  stdout: " + out.rstrip().replace("\n", "\n          ")
        if err.strip():
            s += "\n  stderr: " + err.rstrip().replace("\n", "\n          ")
        return s


def run(argv, timeout=60, cwd=None, input=None, env=None):
    argv = [str(a) for a in argv]
    if VERBOSE:
        print("  $ " + " ".join(shlex.quote(a) for a in argv))
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE if input is not None
                         else subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    timed_out = False
    try:
        out, err = p.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    return Result(argv, None if timed_out else p.returncode, out,
                  err.decode("utf-8", "replace"), timed_out, time.monotonic() - t0)


def expect_ok(res, what=None):
    """The command must exit 0 without any sign of a crash."""
    if res.crashed or res.rc != 0:
        fail((what + "\n" if what else "") + "command did not succeed:\n" + res.describe())
    return res


def expect_clean_error(res, keywords=(), what=None, rc=1):
    """The command must fail with exit status ``rc`` (default 1), write a non-empty
    message to stderr containing at least one of ``keywords`` (case-insensitive), and
    not crash."""
    head = (what + "\n") if what else ""
    if res.crashed:
        fail(head + "command crashed:\n" + res.describe())
    if res.rc != rc:
        fail(head + f"expected exit status {rc}:\n" + res.describe())
    if not res.err.strip():
        fail(head + "expected an error message on stderr:\n" + res.describe())
    if keywords:
        low = res.err.lower()
        if not any(k.lower() in low for k in keywords):
            fail(head + f"stderr mentions none of {list(keywords)}:\n" + res.describe())
    return res


def expect_no_crash(res, what=None, allowed_rc=(0, 1)):
    if res.crashed or res.rc not in allowed_rc:
        fail(((what + "\n") if what else "") +
             f"expected exit status in {list(allowed_rc)} and no crash:\n" + res.describe())
    return res


# --------------------------------------------------------------------------------------
# The program under test
# --------------------------------------------------------------------------------------

class Qcow2kit:
    def __init__(self, path):
        self.path = path

    def run(self, *args, engine=None, timeout=120, cwd=None, input=None):
        argv = [self.path]
        if engine:
            argv.append(f"--engine={engine}")
        argv += [str(a) for a in args]
        return run(argv, timeout=timeout, cwd=cwd, input=input)

    def ok(self, *args, **kw):
        return expect_ok(self.run(*args, **kw))

    def json(self, *args, **kw):
        res = self.ok(*args, **kw)
        try:
            return json.loads(res.out)
        except ValueError as e:
            fail(f"output is not JSON ({e}):\n" + res.describe())

    def exists(self):
        return os.path.isfile(self.path) and os.access(self.path, os.X_OK)


# --------------------------------------------------------------------------------------
# QEMU tools (the oracle)
# --------------------------------------------------------------------------------------

class QemuTools:
    def __init__(self, timeout=300):
        self.timeout = timeout

    def img(self, *args, cwd=None, ok=True):
        res = run(["qemu-img", *args], timeout=self.timeout, cwd=cwd)
        if ok:
            expect_ok(res, "qemu-img failed")
        return res

    def create(self, path, size=None, cwd=None, backing=None, backing_fmt=None, unsafe=False,
               fmt="qcow2", **opts):
        """qemu-img create; keyword options become -o key=value (underscores kept)."""
        argv = ["create", "-q", "-f", fmt]
        if opts:
            argv += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
        if backing is not None:
            argv += ["-b", backing]
            if backing_fmt:
                argv += ["-F", backing_fmt]
        if unsafe:
            argv.append("-u")
        argv.append(path)
        if size is not None:
            argv.append(str(size))
        self.img(*argv, cwd=cwd)
        return path

    def io(self, path, cmds, fmt="qcow2", cwd=None, ok=True, extra=()):
        """Run qemu-io with one -c per command. Any failed command is an error."""
        argv = ["qemu-io", "-f", fmt, *extra]
        for c in cmds:
            argv += ["-c", c]
        argv.append(path)
        res = run(argv, timeout=self.timeout, cwd=cwd)
        if ok and (res.rc != 0 or "failed" in res.text or "failed" in res.err):
            fail("qemu-io failed:\n" + res.describe())
        return res

    def to_raw(self, path, out, cwd=None, fmt=None):
        argv = ["convert", "-O", "raw"]
        if fmt:
            argv += ["-f", fmt]
        self.img(*argv, path, out, cwd=cwd)
        return out

    def info(self, path, chain=False, cwd=None, extra=()):
        argv = ["info", "--output=json", *extra]
        if chain:
            argv.append("--backing-chain")
        return json.loads(self.img(*argv, path, cwd=cwd).out)

    def map(self, path, cwd=None, extra=()):
        return json.loads(self.img("map", "--output=json", *extra, path, cwd=cwd).out)


# --------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------

def strip_keys(obj, keys):
    """Return a copy of a list of dicts (or a dict) without the given keys."""
    if isinstance(obj, list):
        return [strip_keys(o, keys) for o in obj]
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if k not in keys}
    return obj


def json_diff(a, b, path="$", out=None, limit=20):
    """List of human-readable differences between two JSON values (a = actual, b = expected)."""
    if out is None:
        out = []
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                out.append(f"{path}.{k}: missing (expected {b[k]!r})")
            elif k not in b:
                out.append(f"{path}.{k}: unexpected key (value {a[k]!r})")
            else:
                json_diff(a[k], b[k], f"{path}.{k}", out, limit)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)}, expected {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            json_diff(x, y, f"{path}[{i}]", out, limit)
            if len(out) >= limit:
                break
    elif type(a) != type(b) or a != b:  # noqa: E721  (True != 1 for our purposes)
        out.append(f"{path}: {a!r}, expected {b!r}")
    return out


def strip_prog(text):
    """Message lines without the `qemu-img: ` / `qcow2kit: ` prefix (blank lines dropped)."""
    return [re.sub(r"^(qemu-img|qcow2kit): ", "", line.rstrip())
            for line in text.splitlines() if line.strip()]


def check_json_eq(actual, expected, what):
    d = json_diff(actual, expected)
    if d:
        def short(v):
            s = json.dumps(v)
            return s if len(s) < 2500 else s[:2500] + "..."
        fail(f"{what} differs:\n  " + "\n  ".join(d) +
             f"\n  actual:   {short(actual)}\n  expected: {short(expected)}")


def first_difference(a: bytes, b: bytes):
    """Offset of the first differing byte (or of the shorter end), None if equal."""
    if a == b:
        return None
    n = min(len(a), len(b))
    lo = 0
    # Narrow down by chunks for speed, then bytewise.
    step = 1 << 16
    while lo < n and a[lo:lo + step] == b[lo:lo + step]:
        lo += step
    for i in range(lo, min(lo + step, n)):
        if a[i] != b[i]:
            return i
    return n


def compare_files(actual_path, expected_path, base=0):
    """Fail with the first differing offset if two files differ."""
    sa = os.path.getsize(actual_path)
    se = os.path.getsize(expected_path)
    with open(actual_path, "rb") as fa, open(expected_path, "rb") as fe:
        off = 0
        while True:
            ca = fa.read(4 * MiB)
            ce = fe.read(4 * MiB)
            if ca != ce:
                d = first_difference(ca, ce)
                o = off + d
                fail(f"content differs at guest offset {base + o} (0x{base + o:x}): "
                     f"got {ca[d:d + 16].hex()} expected {ce[d:d + 16].hex()} "
                     f"(sizes {sa} vs {se})")
            if not ca:
                break
            off += len(ca)


def sha256_file(path, offset=0, length=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            chunk = f.read(4 * MiB if left is None else min(4 * MiB, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def read_range(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def parse_sha256_output(res):
    """Accept a bare hex digest, or `sha256sum`-style `<hex>  <name>`."""
    words = res.text.split()
    if not words:
        fail("--sha256 printed nothing:\n" + res.describe())
    d = words[0].lower()
    if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
        fail("--sha256 did not print a hex digest first:\n" + res.describe())
    return d


# --------------------------------------------------------------------------------------
# qcow2 structures for byte poking (big-endian; see reference §1.1)
# --------------------------------------------------------------------------------------

QCOW2_MAGIC = 0x514649FB

HEADER_FIELDS = [  # name, offset, struct format
    ("magic", 0, ">I"), ("version", 4, ">I"), ("backing_file_offset", 8, ">Q"),
    ("backing_file_size", 16, ">I"), ("cluster_bits", 20, ">I"), ("size", 24, ">Q"),
    ("crypt_method", 32, ">I"), ("l1_size", 36, ">I"), ("l1_table_offset", 40, ">Q"),
    ("refcount_table_offset", 48, ">Q"), ("refcount_table_clusters", 56, ">I"),
    ("nb_snapshots", 60, ">I"), ("snapshots_offset", 64, ">Q"),
    ("incompatible_features", 72, ">Q"), ("compatible_features", 80, ">Q"),
    ("autoclear_features", 88, ">Q"), ("refcount_order", 96, ">I"),
    ("header_length", 100, ">I"),
]
HEADER_FMT = {n: (o, f) for n, o, f in HEADER_FIELDS}

EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441


def peek(path, off, fmt):
    size = struct.calcsize(fmt)
    with open(path, "rb") as f:
        f.seek(off)
        data = f.read(size)
    if len(data) != size:
        fail(f"peek past the end of {path} at {off}")
    return struct.unpack(fmt, data)[0]


def poke(path, off, fmt, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


def poke_bytes(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def read_header(path):
    with open(path, "rb") as f:
        data = f.read(112)
    h = {}
    for name, off, fmt in HEADER_FIELDS:
        if off + struct.calcsize(fmt) <= len(data):
            h[name] = struct.unpack_from(fmt, data, off)[0]
    if h.get("version") == 2:
        h.update(incompatible_features=0, compatible_features=0, autoclear_features=0,
                 refcount_order=4, header_length=72)
    h["cluster_size"] = 1 << h["cluster_bits"]
    h["compression_type"] = data[104] if h["header_length"] > 104 and len(data) > 104 else 0
    return h


def set_header(path, **fields):
    for name, value in fields.items():
        off, fmt = HEADER_FMT[name]
        poke(path, off, fmt, value)


def read_extensions(path):
    """[(type, data_offset, length)] of the header extensions of an image."""
    h = read_header(path)
    cs = h["cluster_size"]
    end = h["backing_file_offset"] if h["backing_file_offset"] else cs
    exts = []
    off = h["header_length"]
    with open(path, "rb") as f:
        while off + 8 <= end:
            f.seek(off)
            t, ln = struct.unpack(">II", f.read(8))
            if t == 0:
                break
            exts.append((t, off + 8, ln))
            off += 8 + ((ln + 7) & ~7)
    return exts


def ext_header_offset(path, ext_type):
    """File offset of the 8-byte (type, length) header of the first extension of a type."""
    for t, data_off, _ln in read_extensions(path):
        if t == ext_type:
            return data_off - 8
    return None


def l1_entries(path):
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(h["l1_table_offset"])
        raw = f.read(8 * h["l1_size"])
    return list(struct.unpack(f">{len(raw) // 8}Q", raw))


L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def l2_entry_location(path, guest_off):
    """File offset of the L2 entry describing a guest offset (the L2 table must exist)."""
    h = read_header(path)
    cb = h["cluster_bits"]
    ext = bool(h["incompatible_features"] & (1 << 4))
    esize = 16 if ext else 8
    l2_entries = h["cluster_size"] // esize
    cl = guest_off >> cb
    l1i, l2i = cl // l2_entries, cl % l2_entries
    l1 = l1_entries(path)[l1i]
    l2_off = l1 & L1_OFFSET_MASK
    if not l2_off:
        fail(f"{path}: no L2 table for guest offset {guest_off}")
    return l2_off + l2i * esize


def hexdigest(data):
    return hashlib.sha256(data).hexdigest()


def metadata_ranges(path):
    """[(offset, length)] of the metadata of a (valid) image: the used part of cluster 0,
    the active L1 table, every L2 table it points to, the refcount table, the refcount
    blocks it points to and the snapshot table (one cluster at most). For fuzzing."""
    h = read_header(path)
    cs = h["cluster_size"]
    size = os.path.getsize(path)
    ranges = []
    hdr_end = h["header_length"]
    for _t, data_off, ln in read_extensions(path):
        hdr_end = max(hdr_end, data_off + ((ln + 7) & ~7) + 8)
    if h["backing_file_offset"]:
        hdr_end = max(hdr_end, h["backing_file_offset"] + h["backing_file_size"])
    ranges.append((0, hdr_end))
    ranges.append((h["l1_table_offset"], 8 * h["l1_size"]))
    for e in l1_entries(path):
        if e & L1_OFFSET_MASK:
            ranges.append((e & L1_OFFSET_MASK, cs))
    rt = h["refcount_table_offset"]
    with open(path, "rb") as f:
        f.seek(rt)
        raw = f.read(min(cs * h["refcount_table_clusters"], size - rt))
    used = [struct.unpack_from(">Q", raw, i)[0] for i in range(0, len(raw) - 7, 8)]
    n_used = max([i + 1 for i, e in enumerate(used) if e] or [1])
    ranges.append((rt, 8 * n_used))
    bits = 1 << h["refcount_order"]
    file_clusters = (size + cs - 1) // cs
    for e in used[:n_used]:
        if e:
            ranges.append((e & ~0x1FF, min(cs, max(1, file_clusters * bits // 8))))
    if h["nb_snapshots"]:
        ranges.append((h["snapshots_offset"], min(cs, size - h["snapshots_offset"])))
    return [(o, ln) for o, ln in ranges if 0 <= o < size and ln > 0]


def as_qemu72_map(entries):
    """Our map JSON as qemu-img 7.2 prints it: QEMU 8.2 added a "compressed" key to each
    entry, which we print and 7.2 does not."""
    return strip_keys(entries, {"compressed"})
