#!/usr/bin/env python3
"""Convert benchmark: `qcow2kit convert` side by side with `qemu-img convert`.

The source is a 2 GiB image, in 8 MiB stripes of 4 MiB random data, 2 MiB of zeros and
2 MiB of text (half random, a quarter zeros, a quarter text), as a raw file and as a qcow2
image. Cases: qcow2 -> qcow2, qcow2 -> raw, raw -> qcow2, and qcow2 -> compressed qcow2
with zlib and with zstd. Each case runs qcow2kit, qemu-img with its defaults and qemu-img
with -W -m 16 (its fastest) in interleaved rounds; reported are median whole-process times
and the medians of the per-round ratios (qemu-img time / qcow2kit time), and for -c the
target sizes. Every qcow2kit target is compared with the source (qemu-img compare).
"""
import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
GiB = 1 << 30


def make_source(path, size):
    rng = random.Random(7)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(4000)]
    with open(path, "wb") as f:
        f.truncate(size)
        for stripe in range(0, size, 8 * MiB):
            f.seek(stripe)
            f.write(os.urandom(4 * MiB))
            f.seek(stripe + 6 * MiB)
            text = bytearray()
            n = 0
            while len(text) < 2 * MiB:
                text += b" ".join(rng.choice(words) for _ in range(12)) + f" {n}\n".encode()
                n += 1
            f.write(text[:2 * MiB])


def timed(argv):
    # Dirty pages of the previous run are written back first: otherwise whichever run hits
    # the kernel's dirty limit is throttled, and the times measure writeback, not the tools.
    os.sync()
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qcow2kit", default="build/qcow2kit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=2 * GiB)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--only", default=None, help="run the cases whose name contains this")
    ap.add_argument("--skip", default=None, help="skip the cases whose name contains this")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        raw = os.path.join(d, "src.raw")
        qcow2 = os.path.join(d, "src.qcow2")
        make_source(raw, args.size)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2],
                       check=True)
        cases = [
            ("qcow2 -> qcow2", qcow2, ["-O", "qcow2"]),
            ("qcow2 -> raw", qcow2, ["-O", "raw"]),
            ("raw -> qcow2", raw, ["-O", "qcow2"]),
            ("qcow2 -> qcow2 -c zlib", qcow2, ["-O", "qcow2", "-c"]),
            ("qcow2 -> qcow2 -c zstd", qcow2, ["-O", "qcow2", "-c", "-o",
                                                "compression_type=zstd"]),
        ]
        out = os.path.join(d, "out.img")
        for name, src, opts in cases:
            if (args.only and args.only not in name) or (args.skip and args.skip in name):
                continue
            tools = {
                "qcow2kit": [args.qcow2kit, "convert", *opts, src, out],
                "qemu-img": ["qemu-img", "convert", *opts, src, out],
                "qemu-img -W -m 16": ["qemu-img", "convert", "-W", "-m", "16", *opts, src, out],
            }
            times = {t: [] for t in tools}
            sizes = {}
            for _ in range(args.rounds):
                for t, argv in tools.items():
                    if os.path.exists(out):
                        os.unlink(out)
                    times[t].append(timed(argv))
                    sizes[t] = os.path.getsize(out)
                    if t == "qcow2kit":
                        subprocess.run(["qemu-img", "compare", "-q", src, out], check=True)
            os.unlink(out)
            k = times["qcow2kit"]
            rows.append((name, statistics.median(k),
                         statistics.median(times["qemu-img"]),
                         statistics.median([q / o for q, o in zip(times["qemu-img"], k)]),
                         statistics.median(times["qemu-img -W -m 16"]),
                         statistics.median([q / o for q, o in zip(times["qemu-img -W -m 16"], k)]),
                         sizes))
    print(f"{args.size >> 20} MiB source, {args.rounds} interleaved rounds, medians; ratio = "
          "qemu-img time / qcow2kit time in the same round")
    print("| case | qcow2kit | qemu-img | ratio | qemu-img -W -m 16 | ratio | target size "
          "qcow2kit / qemu-img |")
    print("|---|---|---|---|---|---|---|")
    for name, k, q, rq, w, rw, sizes in rows:
        print(f"| {name} | {k:.2f} s | {q:.2f} s | {rq:.2f}x | {w:.2f} s | {rw:.2f}x | "
              f"{sizes['qcow2kit'] / sizes['qemu-img']:.4f} |")


if __name__ == "__main__":
    main()
