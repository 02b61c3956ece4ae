#!/usr/bin/env python3
"""ublk benchmark: `qcow2kit ublk` against qemu-nbd through the kernel's NBD client, and a loop
device over a raw file (the ceiling: no image format), in one guest.

The guest is Debian's 6.12 kernel under qemu-system-x86_64 (tests/qk_vm.py; TCG, 2 vCPUs), so
absolute numbers mean nothing; the ratios within one run do. In the guest, on tmpfs:
  * img.qcow2, 512 MiB, preallocation=full (every cluster mapped: in-place I/O), made by
    qcow2kit create; raw.img, 512 MiB of zeros written by dd;
  * targets, one live at a time, in interleaved rounds (ublk, nbd, loop, ublk, ...):
      ublk1 qcow2kit ublk add --foreground -q 1 img.qcow2 (direct I/O, depth 128)
      ublk2 the same with -q 2 (a thread and io_uring per queue)
      nbd   qemu-nbd -f qcow2 --cache=none --aio=io_uring -c /dev/nbd0 img.qcow2
      loop  losetup --direct-io=on over raw.img
  * fio (io_uring, direct, time based) per job; jobs at QD 32 run as two fio jobs of QD 16
    (one per vCPU, so that blk-mq spreads them over the queues), reported as a group; the serving process's CPU time (utime +
    stime from /proc/PID/stat) over the job gives its CPU µs per request (loop: in-kernel,
    not measured).
It prints per job the medians over rounds, the ratios ublk / nbd and ublk / loop (medians of
the per-round ratios), and the CPU per request.

Run: python3 bench/bench_ublk.py --qcow2kit build/qcow2kit [--rounds 3] [--runtime 4]
"""
import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import qk_testlib as T  # noqa: E402
import qk_vm as VM  # noqa: E402

JOBS = [  # key, fio rw, block size, queue depth
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd32", "randread", "4k", 32),  # as 2 jobs x QD 16
    ("randwrite-4k-qd1", "randwrite", "4k", 1),
    ("randwrite-4k-qd32", "randwrite", "4k", 32),
    ("read-512k-qd8", "read", "512k", 8),
    ("write-512k-qd8", "write", "512k", 8),
]
TARGETS = ("ublk1", "ublk2", "nbd", "loop")

GUEST = r"""
cd /tmp
qcow2kit create -q -f qcow2 -o preallocation=full img.qcow2 512M || fail setup "create"
dd if=/dev/zero of=raw.img bs=1M count=512 2>/dev/null || fail setup "raw"
ticks() {{ [ -n "$1" ] && awk '{{print $14 + $15}}' /proc/$1/stat || echo 0; }}
up() {{
  case $1 in
    ublk*) rm -f dev.txt
          qcow2kit ublk add --foreground -q ${{1#ublk}} img.qcow2 > dev.txt 2> ublk.err &
          PID=$!
          i=0; while [ ! -s dev.txt ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
          DEV=$(cat dev.txt) ;;
    nbd)  qemu-nbd -f qcow2 --cache=none --aio=io_uring -c /dev/nbd0 img.qcow2 2> nbd.err
          i=0  # the kernel client is connected once the device has a size
          while [ "$(cat /sys/block/nbd0/size)" = 0 ] && [ $i -lt 600 ]; do
            sleep 0.1; i=$((i + 1))
          done
          DEV=/dev/nbd0; PID=$(pidof qemu-nbd) ;;
    loop) DEV=$(/usr/bin/losetup --direct-io=on -f --show raw.img); PID= ;;  # not the applet
  esac
  [ -b "$DEV" ] || fail "up-$1" "no device"
}}
down() {{
  case $1 in
    ublk*) kill -TERM $PID; wait $PID || fail down-$1 "exit $?: $(cat ublk.err)" ;;
    nbd)  qemu-nbd -d /dev/nbd0 > /dev/null ;;
    loop) losetup -d "$DEV" ;;
  esac
}}
for round in $(seq 1 {rounds}); do
  for t in {targets}; do
    up $t
    for job in {jobs}; do
      set -- $(echo $job | tr , ' ')
      before=$(ticks "$PID")
      jobs=1; depth=$4
      if [ $4 -ge 32 ]; then jobs=2; depth=$(($4 / 2)); fi
      line=$(fio --name=$1 --filename="$DEV" --ioengine=io_uring --direct=1 --rw=$2 --bs=$3 \
             --iodepth=$depth --numjobs=$jobs --group_reporting --time_based --runtime={runtime} --ramp_time=1 --size=512m \
             --minimal --eta=never 2> fio.err) || fail "fio-$t-$1" "$(cat fio.err)"
      after=$(ticks "$PID")
      echo "QKVM FIO $round $t $1 $before $after $line"
    done
    down $t
  done
done
pass bench
"""


def parse(console):
    """{(target, job): [(iops, cpu_us_per_request or None), ...]} from the FIO lines."""
    out = {}
    for line in console.splitlines():
        if not line.startswith("QKVM FIO "):
            continue
        _, _, rnd, target, job, before, after, terse = line.split(" ", 7)
        f = terse.split(";")
        # fio's terse format v3: read iops at 8, read runtime (ms) at 9; write at 49 / 50.
        iops = float(f[7]) + float(f[48])
        runtime_s = max(float(f[8]), float(f[49])) / 1000
        requests = iops * runtime_s
        ticks = int(after) - int(before)
        cpu = ticks * 10_000 / requests if target != "loop" and requests else None
        out.setdefault((target, job), []).append((iops, cpu))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qcow2kit", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=int, default=4)
    args = p.parse_args()
    why = VM.unavailable()
    if why:
        sys.exit(f"bench_ublk: cannot boot the guest: {why}")
    script = GUEST.format(rounds=args.rounds, runtime=args.runtime, targets=" ".join(TARGETS),
                          jobs=" ".join(f"{k},{rw},{bs},{qd}" for k, rw, bs, qd in JOBS))
    with tempfile.TemporaryDirectory():
        with VM.Guest(programs=[args.qcow2kit, "fio", "qemu-nbd", "losetup"],
                      modules=["ublk_drv", "nbd", "loop"], memory_mb=3072) as vm:
            timeout = 600 + args.rounds * len(TARGETS) * len(JOBS) * (args.runtime + 20)
            res = vm.run(script, timeout=timeout)
    try:
        res.check()
        res.passed("bench")
    except T.Failure as e:
        sys.exit(f"bench_ublk: {e}")
    data = parse(res.console)
    print(f"ublk benchmark: {args.rounds} rounds, {args.runtime} s per job, guest 6.12 under TCG")
    print("| job | ublk -q1 IOPS | ublk -q2 IOPS | qemu-nbd IOPS | loop IOPS | -q1 / qemu-nbd | "
          "-q2 / qemu-nbd | -q2 / loop | CPU µs/req -q1 | -q2 | qemu-nbd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, _, _, _ in JOBS:
        runs = {t: data.get((t, key), []) for t in TARGETS}
        med = {t: statistics.median(i for i, _ in runs[t]) for t in TARGETS}
        ratio = lambda a, b: statistics.median(x[0] / y[0] for x, y in zip(runs[a], runs[b]))
        cpu = {t: statistics.median(c for _, c in runs[t]) for t in ("ublk1", "ublk2", "nbd")}
        print(f"| {key} | {med['ublk1']:.0f} | {med['ublk2']:.0f} | {med['nbd']:.0f} | "
              f"{med['loop']:.0f} | {ratio('ublk1', 'nbd'):.2f} | {ratio('ublk2', 'nbd'):.2f} | "
              f"{ratio('ublk2', 'loop'):.2f} | {cpu['ublk1']:.0f} | {cpu['ublk2']:.0f} | "
              f"{cpu['nbd']:.0f} |")


if __name__ == "__main__":
    main()
