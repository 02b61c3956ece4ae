#!/usr/bin/env python3
"""Check benchmark: `qcow2kit check` side by side with `qemu-img check` on large images.

Images (made by bench/make_scattered_image.py: valid metadata, data clusters left as holes):
  - 1 TiB virtual, 64 KiB clusters, a million allocated clusters scattered in random order;
  - 16 GiB virtual, 512-byte clusters, a million allocated clusters;
  - 256 GiB virtual, 64 KiB clusters, 500000 clusters, with two internal snapshots (made by
    qemu-img snapshot -c).
Both tools check each image in interleaved rounds (A B A B ...); reported are the median
whole-process time, the median of the per-round time ratios, and the peak RSS (ru_maxrss).
Both must print the same report.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

IMAGES = [
    ("1 TiB, 64 KiB clusters, 1M scattered", ["--size", "1T", "--clusters", "1000000"], 0),
    ("16 GiB, 512 B clusters, 1M scattered",
     ["--size", "16G", "--cluster-size", "512", "--clusters", "1000000"], 0),
    ("256 GiB, 64 KiB clusters, 500k, 2 snapshots", ["--size", "256G", "--clusters", "500000"], 2),
]


def run_measured(argv):
    # ru_maxrss of the one child, from wait4.
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        out = os.open(os.path.join(os.environ["BENCH_OUT"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(devnull, 2)
        os.execvp(argv[0], argv)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(argv)} exited {os.waitstatus_to_exitcode(status)}")
    with open(os.environ["BENCH_OUT"]) as f:
        return elapsed, usage.ru_maxrss / 1024, f.read()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qcow2kit", default="build/qcow2kit")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    tools = {"qemu-img": ["qemu-img", "check"], "qcow2kit": [args.qcow2kit, "check"]}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        os.environ["BENCH_OUT"] = os.path.join(d, "out.txt")
        for name, gen, snapshots in IMAGES:
            image = os.path.join(d, "img.qcow2")
            subprocess.run([sys.executable, os.path.join(HERE, "make_scattered_image.py"), image,
                            *gen], check=True, stdout=subprocess.DEVNULL)
            for i in range(snapshots):
                subprocess.run(["qemu-img", "snapshot", "-c", f"s{i}", image], check=True)
            times = {t: [] for t in tools}
            rss = {t: 0.0 for t in tools}
            outputs = {}
            for _ in range(args.rounds):
                for t, cmd in tools.items():
                    sec, mib, out = run_measured(cmd + [image])
                    times[t].append(sec)
                    rss[t] = max(rss[t], mib)
                    outputs[t] = out
            if outputs["qemu-img"] != outputs["qcow2kit"]:
                sys.exit(f"{name}: reports differ:\n{outputs['qemu-img']}\n{outputs['qcow2kit']}")
            ratios = [q / k for q, k in zip(times["qemu-img"], times["qcow2kit"])]
            rows.append((name, statistics.median(times["qemu-img"]),
                         statistics.median(times["qcow2kit"]), statistics.median(ratios),
                         rss["qemu-img"], rss["qcow2kit"]))
            os.unlink(image)
    print(f"{args.rounds} interleaved rounds, medians; speed ratio = qemu-img time / qcow2kit "
          f"time per round")
    print("| image | qemu-img check | qcow2kit check | speed ratio | peak RSS qemu-img | "
          "peak RSS qcow2kit |")
    print("|---|---|---|---|---|---|")
    for name, q, k, r, rq, rk in rows:
        print(f"| {name} | {q:.2f} s | {k:.2f} s | {r:.1f}x | {rq:.0f} MiB | {rk:.0f} MiB |")


if __name__ == "__main__":
    main()
