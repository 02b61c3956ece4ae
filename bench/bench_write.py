#!/usr/bin/env python3
"""Write benchmark: `qcow2kit bench -w` side by side with `qemu-img bench -w` on twin images.

Two kinds of 4 KiB writes, each at queue depth 1 and 32:
  * in place: into a fully allocated image (`preallocation=full`: every cluster mapped and
    written), requests far apart, so no metadata changes;
  * allocating: into a fresh empty image (made anew for every run, outside the timing), one
    request per 64 KiB cluster, so every request allocates a cluster.
Both tools run in interleaved rounds (qcow2kit, qemu-img, qcow2kit, ...) so that drift of the
machine affects both alike; the table shows the median ops/s of each and the ratio qcow2kit /
qemu-img. Direct I/O (-t none) with io_uring is used when the filesystem and both tools
support it, else writeback (and/or the thread pool): the heading line says which.

Ratios measured in one run are what to compare; absolute numbers move between runs on shared
machines. `--quick` is a smoke test (one small round), not a measurement.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

CLUSTER = 64 * 1024

# name, kind, bench options, requests (full run; --quick divides by QUICK_DIV)
JOBS = [
    ("4k write QD1, allocated image, far-apart step", "allocated",
     ["-d", "1", "-s", "4k", "-S", "409600"], 4000),
    ("4k write QD32, allocated image, far-apart step", "allocated",
     ["-d", "32", "-s", "4k", "-S", "409600"], 20000),
    ("4k allocating write QD1, empty image, one per cluster", "empty",
     ["-d", "1", "-s", "4k", "-S", str(CLUSTER)], 3000),
    ("4k allocating write QD32, empty image, one per cluster", "empty",
     ["-d", "32", "-s", "4k", "-S", str(CLUSTER)], 12000),
]
QUICK_DIV = 10


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def run_bench(tool, image, opts, io_opts):
    cmd = tool + ["bench", "-w", "-f", "qcow2", *io_opts, *opts, image]
    res = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", res.stdout)
    if res.returncode != 0 or not m:
        sys.exit(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
    return float(m.group(1))


def works(cmd):
    return subprocess.run(cmd, capture_output=True).returncode == 0


def choose_io(tools, d):
    """-t none if O_DIRECT works here and both tools accept it; -i io_uring if both can."""
    probe = os.path.join(d, "probe.qcow2")
    sh(["qemu-img", "create", "-q", "-f", "qcow2", probe, "1M"])
    direct = True
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
    except OSError:
        direct = False
    for cache in (["none"] if direct else []) + ["writeback"]:
        for aio in ("io_uring", "threads"):
            opts = ["-t", cache, "-i", aio]
            if all(works(t + ["bench", "-w", "-c", "1", "-d", "1", "-f", "qcow2", *opts, probe])
                   for t in tools.values()):
                return opts
    sys.exit("neither tool could run a write benchmark here")


def make_image(path, size, full):
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
           f"cluster_size={CLUSTER}" + (",preallocation=full" if full else ""), path, size]
    sh(cmd)
    # preallocation=full leaves hundreds of MiB of dirty page cache: written back during the
    # first timed run it would slow whichever tool comes first.
    os.sync()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qcow2kit", default="build/qcow2kit")
    ap.add_argument("--size", default="1G",
                    help="virtual size of the allocated test image (default 1G)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to put the images (default: /var/tmp)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: one round, a tenth of the requests, a 256M image")
    ap.add_argument("--baseline", default=None,
                    help="another qcow2kit binary to compare with instead of qemu-img (to "
                         "see what a change costs)")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
        args.size = "256M"
    # The peer keeps the key "qemu-img"; its label says what it is.
    peer = ["qemu-img"] if not args.baseline else [os.path.abspath(args.baseline)]
    peer_label = "qemu-img bench -w" if not args.baseline else "baseline qcow2kit bench -w"
    tools = {"qcow2kit": [os.path.abspath(args.qcow2kit)], "qemu-img": peer}

    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp") as d:
        io_opts = choose_io(tools, d)
        # Twin fully allocated images, one per tool (in-place writes leave them as they are).
        full = {}
        for t in tools:
            full[t] = os.path.join(d, f"full-{t}.qcow2")
            make_image(full[t], args.size, full=True)

        results = {}
        for name, kind, opts, count in JOBS:
            if args.quick:
                count //= QUICK_DIV
            step = int(opts[opts.index("-S") + 1])
            job_opts = ["-c", str(count), *opts]
            times = {t: [] for t in tools}
            for _ in range(args.rounds):
                for t, cmd in tools.items():
                    if kind == "allocated":
                        image = full[t]
                    else:
                        image = os.path.join(d, f"empty-{t}.qcow2")
                        # every request in a cluster of its own, never wrapping
                        make_image(image, str(max(count * step, CLUSTER)), full=False)
                    times[t].append(run_bench(cmd, image, job_opts, io_opts))
                    if kind == "empty":
                        os.unlink(image)
            med = {t: statistics.median(v) for t, v in times.items()}
            results[name] = (count, med)

        cache = io_opts[io_opts.index("-t") + 1]
        aio = io_opts[io_opts.index("-i") + 1]
        print(f"qcow2 images with 64 KiB clusters ({args.size} fully allocated for the in-place "
              f"jobs, fresh empty ones for the allocating jobs), both tools with "
              f"`-t {cache} -i {aio}`{' (O_DIRECT)' if cache == 'none' else ' (page cache)'}, "
              f"{args.rounds} interleaved round(s), medians"
              f"{' -- QUICK SMOKE RUN, not a measurement' if args.quick else ''}")
        print(f"| job | {peer_label} | qcow2kit bench -w | ratio (qcow2kit / peer) |")
        print("|---|---|---|---|")
        for name, (count, med) in results.items():
            def fmt(t):
                return f"{count / med[t] / 1000:.1f}k IOPS"
            ratio = med["qemu-img"] / med["qcow2kit"]  # = ops/s ours / ops/s theirs
            print(f"| {name} | {fmt('qemu-img')} | {fmt('qcow2kit')} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
