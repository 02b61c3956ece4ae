#!/usr/bin/env python3
"""Read benchmark: `qcow2kit bench` side by side with `qemu-img bench` on one image.

Both tools read the same fully allocated qcow2 image with direct I/O and io_uring, in
interleaved rounds (A B A B ...) so that drift of the machine affects both alike. Reports the
median IOPS / throughput of each job and the ratio qcow2kit / qemu-img. Ratios measured in one
run are what to compare; absolute numbers move between runs on shared machines.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

JOBS = [
    # name, bench options (count chosen so one run takes about a second)
    ("4k read QD1, far-apart step", ["-d", "1", "-s", "4k", "-S", "409600", "-c", "20000"]),
    ("4k read QD32, far-apart step", ["-d", "32", "-s", "4k", "-S", "409600", "-c", "100000"]),
    ("512k sequential read QD8", ["-d", "8", "-s", "512k", "-c", "4000"]),
]


def run_bench(tool, image, opts):
    cmd = tool + ["bench", "-f", "qcow2", "-t", "none", "-i", "io_uring"] + opts + [image]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        sys.exit(f"unexpected output from {' '.join(cmd)}:\n{out}")
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--qcow2kit", default="build/qcow2kit")
    ap.add_argument("--size", default="4G", help="virtual size of the test image")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to put the image (default: /var/tmp)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp") as d:
        image = os.path.join(d, "full.qcow2")
        # Fully allocated: every cluster has a host cluster whose data is written.
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full",
                        image, args.size], check=True)
        tools = {"qemu-img": ["qemu-img"], "qcow2kit": [args.qcow2kit]}
        results = {}
        for name, opts in JOBS:
            count = int(opts[opts.index("-c") + 1])
            size = opts[opts.index("-s") + 1]
            size_bytes = int(size[:-1]) * 1024
            times = {t: [] for t in tools}
            for _ in range(args.rounds):
                for t, cmd in tools.items():
                    times[t].append(run_bench(cmd, image, opts))
            med = {t: statistics.median(v) for t, v in times.items()}
            results[name] = (count, size_bytes, med)

        print(f"image: {args.size} fully allocated qcow2 (64 KiB clusters), -t none -i io_uring, "
              f"{args.rounds} interleaved rounds, medians")
        print(f"| job | qemu-img bench | qcow2kit bench | ratio |")
        print(f"|---|---|---|---|")
        for name, (count, size_bytes, med) in results.items():
            def fmt(t):
                iops = count / med[t]
                if size_bytes >= 65536:
                    return f"{iops * size_bytes / 1e6:.0f} MB/s"
                return f"{iops / 1000:.1f}k IOPS"
            ratio = med["qemu-img"] / med["qcow2kit"]
            print(f"| {name} | {fmt('qemu-img')} | {fmt('qcow2kit')} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
