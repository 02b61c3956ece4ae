#!/usr/bin/env python3
"""NBD benchmark: `qcow2kit serve` side by side with `qemu-nbd`, and `nbdkit null` as the ceiling.

fio's nbd engine (one connection, numjobs=1) drives three servers over unix sockets, one live
at a time, in interleaved rounds (qcow2kit, qemu-nbd, nbdkit null, qcow2kit, ...) per job and
image so that drift of the machine affects all alike:
  * qcow2kit serve -f qcow2 -k S -t --cache=none --aio=io_uring IMG
  * qemu-nbd -f qcow2 --cache=none --aio=io_uring -t -k S IMG
  * nbdkit -f -U S null size=SIZE   (a server doing no I/O: what the client can reach)
Images (64 KiB clusters): "full" (preallocation=full: every cluster mapped and written, made
once; both servers use the same file) and "empty" (made anew before every run on it, outside
the timing). Reads run on the full image; writes on both (in place / allocating). A time-based
sequential write on the empty image wraps around once it has filled it, so only its first
pass allocates. Every image a server wrote is checked with `qemu-img check` afterwards
(untimed); failures, crashes, hangs and unclean exits on SIGTERM are reported.

For each run it records IOPS / bandwidth (fio, after the ramp) and the server's CPU time
(utime+stime of all its threads, /proc/PID/stat, over fio's measured window), giving server
CPU µs per request. It reports per job the medians over rounds, the ratios qcow2kit / qemu-nbd
and qcow2kit / nbdkit-null, and the CPU per request of each server.

Ratios measured in one run are what to compare; absolute numbers move between runs on shared
machines. Run on an idle machine. `--quick` is a smoke test, not a measurement.
"""
import argparse
import ctypes
import fnmatch
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_write import make_image, sh  # noqa: E402  (shared with the write benchmark)

# key, description, fio rw, block size, queue depth, images it runs on
JOBS = [
    ("randread-4k-qd1", "4k randread QD1", "randread", "4k", 1, ("full",)),
    ("randread-4k-qd32", "4k randread QD32", "randread", "4k", 32, ("full",)),
    ("randwrite-4k-qd1", "4k randwrite QD1", "randwrite", "4k", 1, ("full", "empty")),
    ("randwrite-4k-qd32", "4k randwrite QD32", "randwrite", "4k", 32, ("full", "empty")),
    ("read-512k-qd8", "512k seq read QD8", "read", "512k", 8, ("full",)),
    ("write-512k-qd8", "512k seq write QD8", "write", "512k", 8, ("full", "empty")),
]
IMAGE_DESC = {"full": "full (in place)", "empty": "empty (allocating)"}
SERVERS = ("qcow2kit", "qemu-nbd", "null")          # order within a round
SERVER_NAMES = {"qcow2kit": "qcow2kit", "qemu-nbd": "qemu-nbd", "null": "nbdkit null"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.05          # how often the server's CPU time is sampled while fio runs
HANG_GRACE_S = 60        # fio taking this much longer than ramp+runtime counts as a hang


class BenchError(Exception):
    pass


def parse_size(s):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    return int(float(num) * units[unit])


_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent():
    """preexec_fn: SIGKILL the child if this script dies without cleaning up (kill -9)."""
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def proc_cpu_ticks(pid):
    """utime + stime of all threads of pid (clock ticks), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])   # fields 14 and 15 of stat(5)


def cpu_at(samples, t):
    """CPU seconds at time t, linearly interpolated between (time, ticks) samples."""
    if t <= samples[0][0]:
        return samples[0][1] / CLK_TCK
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if t <= t1:
            frac = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
            return (c0 + frac * (c1 - c0)) / CLK_TCK
    return samples[-1][1] / CLK_TCK


class Server:
    """One NBD server process in its own session, so Ctrl-C reaches only this script."""

    def __init__(self, kind, cmd, sock, log_path):
        self.kind, self.cmd, self.sock, self.log_path = kind, cmd, sock, log_path
        self.proc = None

    def start(self, timeout=30):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.log = open(self.log_path, "ab")
        self.log.write(f"\n=== {' '.join(self.cmd)}\n".encode())
        self.log.flush()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.kind} exited with status {self.proc.returncode} "
                                 f"before serving\n{self.log_tail()}")
            # Ready once it answers with the NBD greeting (we then hang up; all three servers
            # run with -t / keep serving, and take the next client).
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(2)
                    s.connect(self.sock)
                    if s.recv(8) == b"NBDMAGIC":
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{self.kind} did not start serving on {self.sock} within "
                                 f"{timeout} s\n{self.log_tail()}")
            time.sleep(0.05)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """SIGTERM, then SIGKILL after 10 s. Returns a problem description or None."""
        if self.proc is None:
            return None
        problem = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                problem = f"{self.kind} ignored SIGTERM for 10 s; killed"
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            else:
                # qemu-nbd and nbdkit exit 0 on SIGTERM; anything else is worth a look
                if self.proc.returncode not in (0, -signal.SIGTERM):
                    problem = f"{self.kind} exited with status {self.proc.returncode} on SIGTERM"
        try:  # stray children in its session (none expected)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None
        self.log.close()
        return problem

    def log_tail(self, n=20):
        self.log.flush()
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return ""
        return "\n".join(f"  | {line}" for line in lines[-n:])


def run_fio(server, rw, bs, qd, args, out_json, cwd):
    """One fio run against a live server; returns the measurements of that run."""
    cmd = ["fio", "--name=j", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={server.sock}",
           f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--numjobs=1", "--time_based",
           f"--runtime={args.runtime}", f"--ramp_time={args.ramp}", "--norandommap",
           "--randrepeat=0", "--output-format=json", f"--output={out_json}"]
    pid = server.proc.pid
    samples = [(time.time(), proc_cpu_ticks(pid))]
    if samples[0][1] is None:
        raise BenchError(f"{server.kind} is gone before the run\n{server.log_tail()}")
    # fio's stdout only says "connected to NBD server"; errors go to stderr
    err_path = out_json + ".stderr"
    with open(err_path, "w") as err:
        fio = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=err, preexec_fn=die_with_parent)
    deadline = time.monotonic() + args.ramp + args.runtime + HANG_GRACE_S
    try:
        while True:
            try:
                fio.wait(SAMPLE_S)
                break
            except subprocess.TimeoutExpired:
                pass
            c = proc_cpu_ticks(pid)
            if c is not None:
                samples.append((time.time(), c))
            if time.monotonic() > deadline:
                raise BenchError(
                    f"fio did not finish within {HANG_GRACE_S} s after its runtime against "
                    f"{server.kind} (server {'alive' if server.alive() else 'gone'}): hang?\n"
                    f"  {' '.join(cmd)}\n{server.log_tail()}")
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    t_exit = time.time()
    c = proc_cpu_ticks(pid)
    if c is not None:
        samples.append((t_exit, c))
    with open(err_path, errors="replace") as f:
        stderr = f.read()[-3000:]
    if not server.alive():
        raise BenchError(f"{server.kind} died during the run (status {server.proc.returncode})"
                         f"\n  {' '.join(cmd)}\n{server.log_tail()}\nfio stderr:\n{stderr}")
    try:
        with open(out_json) as f:
            res = json.load(f)
        job = res["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        res = job = None
    if fio.returncode != 0 or job is None or job.get("error"):
        raise BenchError(f"fio failed against {server.kind} (exit {fio.returncode}, error "
                         f"{job and job.get('error')})\n  {' '.join(cmd)}\nfio stderr:\n"
                         f"{stderr}\nserver log:\n{server.log_tail()}")
    d = job["read"] if rw in ("read", "randread") else job["write"]
    ios = d["total_ios"]
    if ios == 0:
        raise BenchError(f"fio completed no requests against {server.kind}\n  {' '.join(cmd)}")
    # The measured window is the last job_runtime ms before fio wrote its output; the ramp
    # and the connection set-up before it are left out of the CPU figure as well.
    t_end = min(res["timestamp_ms"] / 1000, t_exit)
    t_start = t_end - job["job_runtime"] / 1000
    cpu_s = cpu_at(samples, t_end) - cpu_at(samples, t_start)
    return {
        "iops": d["iops"],
        "bw_MBps": d["bw_bytes"] / 1e6,
        "ios": ios,
        "lat_us": d["lat_ns"]["mean"] / 1000,
        "clat_p99_us": d["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000,
        "lat_max_us": d["lat_ns"]["max"] / 1000,
        "server_cpu_s": cpu_s,
        "server_cpu_us_per_req": cpu_s * 1e6 / ios,
        "server_cores": cpu_s / (job["job_runtime"] / 1000),
        "server_cpu_s_whole_run": (samples[-1][1] - samples[0][1]) / CLK_TCK,
        "fio_cpu_pct": job["usr_cpu"] + job["sys_cpu"],
    }


def qemu_img_check(image):
    """None if `qemu-img check` finds the image consistent, else what it said."""
    res = subprocess.run(["qemu-img", "check", "-f", "qcow2", image], capture_output=True,
                         text=True)
    if res.returncode == 0:
        return None
    return f"qemu-img check exit {res.returncode}: " + (res.stdout + res.stderr).strip()[-600:]


def check_direct_io(d):
    probe = os.path.join(d, "odirect.probe")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
    except OSError as e:
        sys.exit(f"{d}: O_DIRECT does not work here ({e}); --cache=none needs a real disk "
                 f"filesystem (not tmpfs): pick another --dir, or --cache=writeback")
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def select_jobs(args):
    jobs = []
    pats = [p.strip() for p in args.jobs.split(",")] if args.jobs else None
    images = [i.strip() for i in args.images.split(",")]
    for bad in set(images) - {"full", "empty"}:
        sys.exit(f"--images: unknown image {bad!r} (full, empty)")
    for key, desc, rw, bs, qd, imgs in JOBS:
        if pats and not any(fnmatch.fnmatch(key, p) or p in key for p in pats):
            continue
        for img in imgs:
            if img in images:
                jobs.append((key, desc, rw, bs, qd, img))
    if not jobs:
        sys.exit(f"no job matches --jobs={args.jobs} --images={args.images}; jobs: "
                 + ", ".join(j[0] for j in JOBS))
    return jobs


def fmt_rate(bs, r):
    if parse_size(bs) >= 65536:
        return f"{r['bw_MBps']:.0f} MB/s"
    return f"{r['iops'] / 1000:.1f}k IOPS"


def median_run(runs):
    keys = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def ratio(a, b):
    return a / b if b else float("nan")


def summarize(results):
    rows = []
    for (key, desc, rw, bs, qd, img), runs in results.items():
        med = {s: median_run(v) for s, v in runs.items() if v}
        rate = "bw_MBps" if parse_size(bs) >= 65536 else "iops"
        qk = med.get("qcow2kit")
        row = {"key": key, "job": desc, "image": img, "bs": bs, "medians": med,
               "rounds": len(runs["qcow2kit"]), "runs": runs}
        if qk and "qemu-nbd" in med:
            row["qk_over_qemu"] = ratio(qk[rate], med["qemu-nbd"][rate])
            # per-round ratios (runs are interleaved, so round i of each is side by side)
            row["qk_over_qemu_rounds"] = [ratio(a[rate], b[rate]) for a, b in
                                          zip(runs["qcow2kit"], runs["qemu-nbd"])]
        if qk and "null" in med:
            row["qk_over_null"] = ratio(qk[rate], med["null"][rate])
        rows.append(row)
    return rows


def print_table(rows, markdown):
    head = ["job", "image", "qemu-nbd", "qcow2kit", "nbdkit null", "qcow2kit / qemu-nbd",
            "per round (median)", "qcow2kit / null", "server CPU µs/req: qemu-nbd / qcow2kit / null",
            "server cores: qemu-nbd / qcow2kit"]
    lines = []
    for r in rows:
        m = r["medians"]

        def cell(s, f):
            return f(m[s]) if s in m else "-"
        lines.append([
            r["job"], IMAGE_DESC[r["image"]],
            cell("qemu-nbd", lambda x: fmt_rate(r["bs"], x)),
            cell("qcow2kit", lambda x: fmt_rate(r["bs"], x)),
            cell("null", lambda x: fmt_rate(r["bs"], x)),
            f"{r['qk_over_qemu']:.2f}" if "qk_over_qemu" in r else "-",
            # Robust to a disk whose speed drifts between rounds: each round's pair ran
            # back to back.
            f"{statistics.median(r['qk_over_qemu_rounds']):.2f}"
            if r.get("qk_over_qemu_rounds") else "-",
            f"{r['qk_over_null']:.2f}" if "qk_over_null" in r else "-",
            " / ".join(cell(s, lambda x: f"{x['server_cpu_us_per_req']:.1f}")
                       for s in ("qemu-nbd", "qcow2kit", "null")),
            " / ".join(cell(s, lambda x: f"{x['server_cores']:.2f}")
                       for s in ("qemu-nbd", "qcow2kit")),
        ])
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        for ln in lines:
            print("  ".join(c.ljust(w) for c, w in zip(ln, widths)).rstrip())


def print_goals(rows):
    """The goals of docs/nbd-design.md §5, on the full image."""
    full = {r["key"]: r for r in rows if r["image"] == "full"}
    out = []
    r = full.get("randread-4k-qd32")
    if r and "qk_over_qemu" in r and "qk_over_null" in r:
        a, b = r["qk_over_qemu"], r["qk_over_null"]
        out.append(f"4k randread QD32: {a:.2f}x qemu-nbd (goal >= 1.5: "
                   f"{'met' if a >= 1.5 else 'NOT met'}), {b:.2f}x nbdkit null (goal >= 0.85: "
                   f"{'met' if b >= 0.85 else 'NOT met'})")
    slower = [f"{x['job']}, {IMAGE_DESC[x['image']]} ({x['qk_over_qemu']:.2f})" for x in rows
              if x.get("qk_over_qemu", 1) < 1.0]
    out.append("slower than qemu-nbd (goal: none): " + ("; ".join(slower) or "none"))
    for line in out:
        print("- " + line)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qcow2kit", required=True, help="the qcow2kit binary")
    ap.add_argument("--size", default="8G", help="virtual size of the images (default 8G)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=int, default=20, help="fio runtime per run, seconds")
    ap.add_argument("--ramp", type=int, default=2, help="fio ramp_time per run, seconds")
    ap.add_argument("--jobs", default=None,
                    help="comma-separated substrings or globs of job keys: "
                         + ", ".join(j[0] for j in JOBS))
    ap.add_argument("--images", default="full,empty",
                    help="which images to run on: full, empty or both (default)")
    ap.add_argument("--cache", default="none", help="--cache of both qcow2 servers")
    ap.add_argument("--aio", default="io_uring", help="--aio of both qcow2 servers")
    ap.add_argument("--no-null", action="store_true", help="skip the nbdkit null runs")
    ap.add_argument("--dir", default=None,
                    help="where to make the temporary directory for images and sockets "
                         "(default /var/tmp; must be a real disk for --cache=none)")
    ap.add_argument("--markdown", action="store_true",
                    help="print the table as markdown, with a heading, for BENCHMARKS.md")
    ap.add_argument("--json", metavar="FILE", help="also write every run's figures here")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1G images, 2 rounds, 3 s runs")
    args = ap.parse_args()
    if args.quick:
        args.size, args.rounds, args.runtime = "1G", 2, 3
    size = parse_size(args.size)
    for tool in ("fio", "qemu-nbd", "qemu-img") + (() if args.no_null else ("nbdkit",)):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found on PATH")
    qk_bin = os.path.abspath(args.qcow2kit)
    if not os.access(qk_bin, os.X_OK):
        sys.exit(f"{qk_bin}: not an executable")
    jobs = select_jobs(args)
    servers = [s for s in SERVERS if not (args.no_null and s == "null")]

    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally blocks stop the servers.
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    base = args.dir or "/var/tmp"
    need = size * (1 + any(j[5] == "empty" for j in jobs)) + (256 << 20)
    free = shutil.disk_usage(base).free
    if free < need:
        sys.exit(f"{base}: {free >> 20} MiB free, need about {need >> 20} MiB")
    problems = []
    results = {}
    t_begin = time.strftime("%Y-%m-%d %H:%M")
    try:
        with tempfile.TemporaryDirectory(dir=base, prefix="bench_nbd-") as d:
            if args.cache == "none":
                check_direct_io(d)
            # A private copy of the binary: a rebuild during the run cannot mix two builds.
            qk = os.path.join(d, "qcow2kit")
            shutil.copy2(qk_bin, qk)
            full = os.path.join(d, "full.qcow2")
            empty = os.path.join(d, "empty.qcow2")
            if any(j[5] == "full" for j in jobs):
                print(f"creating {args.size} fully allocated image in {d} ...", file=sys.stderr)
                make_image(full, str(size), full=True)
            logs = os.path.join(d, "logs")
            os.mkdir(logs)

            def server_for(kind, image):
                sock = os.path.join(d, f"{kind}.sock")
                cmd = {
                    "qcow2kit": [qk, "serve", "-f", "qcow2", "-k", sock, "-t",
                                 f"--cache={args.cache}", f"--aio={args.aio}", image],
                    "qemu-nbd": ["qemu-nbd", "-f", "qcow2", f"--cache={args.cache}",
                                 f"--aio={args.aio}", "-t", "-k", sock, image],
                    "null": ["nbdkit", "-f", "-U", sock, "null", f"size={size}"],
                }[kind]
                return Server(kind, cmd, sock, os.path.join(logs, f"{kind}.log"))

            live = None
            try:
                total = len(jobs) * args.rounds * len(servers)
                n = 0
                for key, desc, rw, bs, qd, img in jobs:
                    runs = {s: [] for s in servers}
                    results[(key, desc, rw, bs, qd, img)] = runs
                    for rnd in range(args.rounds):
                        for kind in servers:
                            n += 1
                            image = full
                            if img == "empty" and kind != "null":
                                if os.path.exists(empty):
                                    os.unlink(empty)
                                make_image(empty, str(size), full=False)
                                image = empty
                            live = server_for(kind, image)
                            live.start()
                            try:
                                r = run_fio(live, rw, bs, qd, args, os.path.join(d, "fio.json"), d)
                            finally:
                                p = live.stop()
                                live = None
                            if p:
                                problems.append(f"{desc}, {img}, round {rnd + 1}: {p}")
                            # the image the server wrote must still be consistent (untimed)
                            if img == "empty" and kind != "null":
                                c = qemu_img_check(image)
                                if c:
                                    problems.append(f"{desc}, {img}, round {rnd + 1}, after "
                                                    f"{SERVER_NAMES[kind]}: {c}")
                            runs[kind].append(r)
                            print(f"[{n}/{total}] {desc}, {IMAGE_DESC[img]}, round {rnd + 1}: "
                                  f"{SERVER_NAMES[kind]:11} {fmt_rate(bs, r):>14}, "
                                  f"{r['server_cpu_us_per_req']:6.1f} µs server CPU/req, "
                                  f"{r['server_cores']:.2f} cores", file=sys.stderr)
                if os.path.exists(empty):
                    os.unlink(empty)
                if os.path.exists(full):
                    c = qemu_img_check(full)
                    if c:
                        problems.append(f"full image at the end: {c}")
            finally:
                if live is not None:
                    live.stop()
    except BenchError as e:
        print(f"\nERROR: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped, images removed", file=sys.stderr)
        sys.exit(130)

    rows = summarize(results)
    quick = " -- QUICK SMOKE RUN: noise, not a measurement" if args.quick else ""
    versions = (sh(["qemu-nbd", "--version"]).stdout.splitlines()[0] + ", "
                + sh(["fio", "--version"]).stdout.strip())
    if not args.no_null:
        versions += ", " + sh(["nbdkit", "--version"]).stdout.strip()
    heading = (f"{t_begin}, {os.cpu_count()} CPUs. fio nbd engine over unix sockets (numjobs=1, "
               f"time_based {args.runtime} s after a {args.ramp} s ramp, norandommap); "
               f"{args.size} qcow2 images with 64 KiB clusters; qcow2kit serve and qemu-nbd "
               f"with `--cache={args.cache} --aio={args.aio} -t`; {args.rounds} interleaved "
               f"round(s), medians; server CPU = utime+stime over fio's measured window. "
               f"{versions}.{quick}")
    if args.markdown:
        print(heading)
        print()
        print_table(rows, markdown=True)
        print()
    else:
        print(heading)
        print_table(rows, markdown=False)
    print_goals(rows)
    for p in problems:
        print(f"- server problem: {p}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"heading": heading, "args": vars(args), "problems": problems,
                       "jobs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
