#!/usr/bin/env python3
"""`qcow2kit ublk` in a real kernel: Debian's 6.12 under qemu-system-x86_64 (tests/qk_vm.py),
with ublk_drv loaded.

  boot        the guest runs the binary and has /dev/ublk-control
  fio         on /dev/ublkbN (two queues) over an empty qcow2 image: random writes with
              crc32c verify, 4 KiB at QD 32 from two jobs, 64 KiB at QD 1 and 16 KiB at QD 8
  pattern     a 1 MiB pattern written with dd at 16 MiB (direct, then fsync); on the host
              qemu-img reads the pattern there
  ext4        mkfs.ext4, a file written, unmounted, e2fsck clean
  discard     blkdiscard of 4 MiB (--discard=unmap): the range reads zeros in the guest and
              through qemu-img, and qemu-img map shows it unallocated
  zeroes      --detect-zeroes=unmap: 1 MiB of zeros written with dd over data reads zeros and
              is unallocated in qemu-img map; fallocate --punch-hole and --zero-range over data
              too
  stop        SIGTERM to the daemon: exit 0, /dev/ublkbN gone, the image closed clean
  del-load    `ublk del` while fio writes through two queues: it returns, the device is gone,
              the daemon exits 0
  recover     SIGKILL to the daemon under fio (O_SYNC writes), the device quiesced, `ublk
              recover` makes it live again, fio finishes its writes and its verify pass;
              qemu-img check afterwards finds at most leaks
  matrix      fio verify (4 KiB QD 32 from two jobs, 64 KiB QD 1) with one queue and with two
              over a backing file, extended L2 over a backing file, compressed clusters, a
              preallocated image and an empty one, each checked by qemu-img afterwards
  read-only   `ublk add -n 3 -r` as a daemon: returns once /dev/ublkb3 is live, `ublk list`
              shows it live with its image and two queues (the default: one per CPU), writes are refused, the ext4 file reads back; `ublk del -n 3` removes it and the daemon
              (its pid file gone); two more read-only daemons removed by `ublk del --all`
Back on the host every image passes qemu-img check.

Run: python3 tests/test_ublk.py --qcow2kit build/qcow2kit
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qk_testlib as T  # noqa: E402
import qk_vm as VM  # noqa: E402
from qk_testlib import MiB  # noqa: E402

BOOT_TIMEOUT = 900  # TCG, and an AddressSanitizer build in the guest

# Starts `qcow2kit ublk add` on $1 in the foreground with options $2; sets DEV and QK.
GUEST_LIB = r"""
start_ublk() {
  rm -f /tmp/dev.txt
  qcow2kit ublk add --foreground $2 "$1" > /tmp/dev.txt 2> /tmp/ublk.err &
  QK=$!
  i=0
  while [ ! -s /tmp/dev.txt ] && [ $i -lt 1200 ] && kill -0 $QK 2>/dev/null; do
    sleep 0.1; i=$((i + 1))
  done
  DEV=$(cat /tmp/dev.txt)
  if [ -b "$DEV" ]; then pass "$3-add"; else fail "$3-add" "no device: $(cat /tmp/ublk.err)"; fi
}
stop_ublk() {
  kill -TERM $QK
  wait $QK
  rc=$?
  if grep -q -e Sanitizer -e "runtime error" /tmp/ublk.err; then
    fail "$1-sanitizer" "$(head -20 /tmp/ublk.err)"
  fi
  if [ $rc -eq 0 ] && [ ! -e "$DEV" ]; then pass "$1-stop"
  else fail "$1-stop" "exit $rc, $DEV $( [ -e "$DEV" ] && echo 'still there'): $(cat /tmp/ublk.err)"; fi
}
run_fio() {
  name=$1; shift
  if fio --name="$name" --filename="$DEV" --ioengine=io_uring --direct=1 \
      --verify=crc32c --verify_fatal=1 --eta=never --output=/tmp/fio.out "$@"; then pass "$name"
  else fail "$name" "$(grep -i -m 3 -e verify -e error /tmp/fio.out || tail -3 /tmp/fio.out)"; fi
}
"""

GUEST_MAIN = r"""
[ -c /dev/ublk-control ] && pass boot-ublk-control || fail boot-ublk-control "missing"
qcow2kit --version > /dev/null && pass boot-binary || fail boot-binary "does not run"

qkvm_in vda /tmp/img.qcow2 {img_size}
qkvm_in vdb /tmp/pattern.raw {pattern_size}
start_ublk /tmp/img.qcow2 "-q 2 --discard=unmap --detect-zeroes=unmap" main
run_fio fio-4k-qd32 --rw=randwrite --bs=4k --iodepth=32 --numjobs=2 --size=16m \
    --offset=32m --offset_increment=16m
run_fio fio-64k-qd1 --rw=randwrite --bs=64k --iodepth=1 --size=16m --offset=48m
run_fio fio-16k-qd8 --rw=randwrite --bs=16k --iodepth=8 --size=8m --offset=40m
dd if=/tmp/pattern.raw of="$DEV" bs=64k seek=256 oflag=direct conv=fsync 2>/tmp/dd.err \
    && pass pattern-write || fail pattern-write "$(cat /tmp/dd.err)"
for k in 0 1 2 3; do  # data at 8 MiB..12 MiB first, so that the discard has work to do
  dd if=/tmp/pattern.raw of="$DEV" bs=64k seek=$((128 + k * 16)) oflag=direct 2>/dev/null
done
if blkdiscard -o $((8 << 20)) -l $((4 << 20)) "$DEV" 2>/tmp/bd.err; then
  if [ "$(dd if="$DEV" bs=1M skip=8 count=4 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]
  then pass discard; else fail discard "the discarded range does not read zeros"; fi
else fail discard "blkdiscard: $(cat /tmp/bd.err)"; fi
dd if=/tmp/pattern.raw of="$DEV" bs=64k seek=192 oflag=direct 2>/dev/null  # 12-13 MiB
dd if=/dev/zero of="$DEV" bs=64k seek=192 count=16 oflag=direct conv=fsync 2>/tmp/dd.err \
    && pass zero-write || fail zero-write "$(cat /tmp/dd.err)"
dd if=/tmp/pattern.raw of="$DEV" bs=64k seek=208 oflag=direct 2>/dev/null  # 13-14 MiB
if /usr/bin/fallocate -p -o $((13 << 20)) -l $((512 << 10)) "$DEV" 2>/tmp/fa.err \
    && /usr/bin/fallocate -z -o $((27 << 19)) -l $((512 << 10)) "$DEV" 2>>/tmp/fa.err; then
  if [ "$(dd if="$DEV" bs=1M skip=13 count=1 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]
  then pass fallocate; else fail fallocate "punched and zeroed ranges do not read zeros"; fi
else fail fallocate "$(cat /tmp/fa.err)"; fi
stop_ublk main

# ublk del while fio writes through both queues: no hang, the daemon exits 0, the image is
# closed clean (qemu-img check on the host).
start_ublk /tmp/img.qcow2 "-q 2" load
fio --name=load --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --numjobs=2 --size=8m --offset=32m --offset_increment=8m --time_based \
    --runtime=120 --eta=never > /tmp/load.out 2>&1 &
FIO=$!
sleep 3
if timeout 60 qcow2kit ublk del -n "${{DEV#/dev/ublkb}}" 2>/tmp/del.err && [ ! -e "$DEV" ]; then
  pass load-del
else fail load-del "$(cat /tmp/del.err)"; fi
wait $QK && pass load-daemon-exit || fail load-daemon-exit "exit $?: $(cat /tmp/ublk.err)"
wait $FIO
grep -q -e Sanitizer -e "runtime error" /tmp/ublk.err && fail load-sanitizer "$(head -20 /tmp/ublk.err)"

# SIGKILL under fio load (O_SYNC writes: each one that completes is durable), then
# `ublk recover`: the device waits quiesced, the new daemon takes the requests the dead one
# held, and fio's own verify pass after its writes reads back every block.
start_ublk /tmp/img.qcow2 "-q 2" kill
N=${{DEV#/dev/ublkb}}
fio --name=killed --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=16 --numjobs=2 --size=14m --offset=32m --offset_increment=14m --loops=20 \
    --sync=1 --verify=crc32c --verify_fatal=1 --eta=never --output=/tmp/killed.out &
FIO=$!
sleep 1
kill -0 $FIO && pass kill-fio-running \
    || fail kill-fio-running "fio ended before the kill: $(tail -5 /tmp/killed.out)"
kill -KILL $QK
wait $QK
i=0
while ! qcow2kit ublk list --output=json | grep -q '"state": "quiesced"' && [ $i -lt 300 ]; do
  sleep 0.1; i=$((i + 1))
done
qcow2kit ublk list --output=json | grep -q '"state": "quiesced"' && pass kill-quiesced \
    || fail kill-quiesced "$(qcow2kit ublk list)"
if qcow2kit ublk recover -n "$N" --pid-file /tmp/rec.pid /tmp/img.qcow2 > /tmp/rec.out \
    2> /tmp/rec.err && [ "$(cat /tmp/rec.out)" = "$DEV" ]; then pass recover
else fail recover "$(cat /tmp/rec.out /tmp/rec.err)"; fi
qcow2kit ublk list --output=json | grep -q '"state": "live"' && pass recover-live \
    || fail recover-live "$(qcow2kit ublk list)"
wait $FIO && pass kill-fio-verified \
    || fail kill-fio-verified "$(grep -i -m 3 -e verify -e error /tmp/killed.out)"
if qcow2kit ublk del -n "$N" 2>/tmp/del.err && [ ! -e "$DEV" ] && [ ! -e /tmp/rec.pid ]; then
  pass recover-del
else fail recover-del "$(cat /tmp/del.err)"; fi
qkvm_out /tmp/img.qcow2 vda

qkvm_in vdc /tmp/fs.qcow2 {fs_size}
start_ublk /tmp/fs.qcow2 "" ext4
mkdir -p /mnt
if mkfs.ext4 -q -F "$DEV" && mount -t ext4 "$DEV" /mnt; then
  dd if=/tmp/pattern.raw of=/mnt/file bs=64k 2>/dev/null
  sync
  umount /mnt
  mount -t ext4 "$DEV" /mnt && cmp /tmp/pattern.raw /mnt/file && pass ext4-file \
      || fail ext4-file "the file reads back differently"
  umount /mnt
  e2fsck -f -n "$DEV" > /tmp/fsck.out 2>&1 && pass ext4-fsck \
      || fail ext4-fsck "$(tail -5 /tmp/fsck.out)"
else fail ext4-mkfs "mkfs or mount failed"; fi
stop_ublk ext4

# A read-only device from a daemon: add returns once it is live, del removes it.
DEV=$(qcow2kit ublk add -n 3 -r --pid-file /tmp/ro.pid /tmp/fs.qcow2 2>/tmp/ro.err)
rc=$?
if [ $rc -eq 0 ] && [ "$DEV" = /dev/ublkb3 ] && [ -b /dev/ublkb3 ] && [ -s /tmp/ro.pid ]; then
  pass ro-add
else fail ro-add "exit $rc, printed '$DEV': $(cat /tmp/ro.err)"; fi
qcow2kit ublk list --output=json > /tmp/list.json 2>&1
if grep -q '"device": "/dev/ublkb3"' /tmp/list.json && grep -q '"state": "live"' /tmp/list.json \
    && grep -q '"image": "/tmp/fs.qcow2"' /tmp/list.json \
    && grep -q '"queues": 2' /tmp/list.json; then pass list
else fail list "$(cat /tmp/list.json)"; fi
dd if=/dev/zero of=/dev/ublkb3 bs=4k count=1 oflag=direct 2>/dev/null \
    && fail ro-refuses-writes "a write succeeded" || pass ro-refuses-writes
mount -t ext4 -o ro /dev/ublkb3 /mnt && cmp /tmp/pattern.raw /mnt/file && pass ro-reads \
    || fail ro-reads "the file system does not read back"
umount /mnt
if qcow2kit ublk del -n 3 2>/tmp/del.err && [ ! -e /dev/ublkb3 ] && [ ! -e /tmp/ro.pid ]; then
  pass ro-del
else fail ro-del "$(cat /tmp/del.err)"; fi
# ublk del --all: two read-only daemons of one image, both removed, both daemons gone.
if qcow2kit ublk add -n 5 -r --pid-file /tmp/a5.pid /tmp/fs.qcow2 > /dev/null 2>/tmp/a5.err \
    && qcow2kit ublk add -n 6 -r --pid-file /tmp/a6.pid /tmp/fs.qcow2 > /dev/null 2>/tmp/a6.err
then pass all-add; else fail all-add "$(cat /tmp/a5.err /tmp/a6.err)"; fi
if qcow2kit ublk del --all 2>/tmp/delall.err && [ ! -e /dev/ublkb5 ] && [ ! -e /dev/ublkb6 ] \
    && [ ! -e /tmp/a5.pid ] && [ ! -e /tmp/a6.pid ]; then pass del-all
else fail del-all "$(cat /tmp/delall.err; ls /dev/ublk*)"; fi
qkvm_out /tmp/fs.qcow2 vdc

# The other kinds of image: fio verify over data below (a backing file, compressed clusters,
# subclusters over a backing file) and over a preallocated image, with one queue and with two
# (each in its own ranges: 1-5 MiB and 20-22 MiB, then 5-9 MiB and 22-24 MiB).
qkvm_in vdd /tmp/base.qcow2 {base_size}
n=4
for kind in backing extl2 compressed prealloc empty; do
  n=$((n + 1))
  disk=vd$(echo abcdefghi | cut -c$n)
  qkvm_in $disk /tmp/$kind.qcow2 $(eval echo \$size_$kind)
  for q in 1 2; do
    start_ublk /tmp/$kind.qcow2 "-q $q" $kind-q$q
    run_fio $kind-q$q-4k-qd32 --rw=randwrite --bs=4k --iodepth=32 --numjobs=2 --size=2m \
        --offset=$((1 + (q - 1) * 4))m --offset_increment=2m
    run_fio $kind-q$q-64k-qd1 --rw=randwrite --bs=64k --iodepth=1 --size=2m \
        --offset=$((20 + (q - 1) * 2))m
    stop_ublk $kind-q$q
  done
  qkvm_out /tmp/$kind.qcow2 $disk
done
"""


def main():
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_ublk")
    q = T.QemuTools()
    qk = args.qcow2kit

    with R.case("guest"):
        why = VM.unavailable()
        if why:
            T.skip(why)
        tmp = R.tmp
        img = q.create(os.path.join(tmp, "img.qcow2"), 64 * MiB)
        fs = q.create(os.path.join(tmp, "fs.qcow2"), 128 * MiB)
        pattern = os.path.join(tmp, "pattern.raw")
        with open(pattern, "wb") as f:
            f.write(os.urandom(MiB))
        # The matrix: every kind of image holds data where fio writes (partial clusters copy
        # from below). Overlays name their backing file relatively: both live in /tmp there.
        base = q.create(os.path.join(tmp, "base.qcow2"), 32 * MiB)
        q.io(base, ["write -P 0x5a 0 32M"])
        kinds = {
            "backing": q.create(os.path.join(tmp, "backing.qcow2"), cwd=tmp,
                                backing="base.qcow2", backing_fmt="qcow2"),
            "extl2": q.create(os.path.join(tmp, "extl2.qcow2"), cwd=tmp, backing="base.qcow2",
                              backing_fmt="qcow2", extended_l2="on"),
            "empty": q.create(os.path.join(tmp, "empty.qcow2"), 32 * MiB),
            "prealloc": q.create(os.path.join(tmp, "prealloc.qcow2"), 32 * MiB,
                                 preallocation="metadata"),
        }
        raw = os.path.join(tmp, "compressed.raw")
        with open(raw, "wb") as f:
            f.write(os.urandom(16 * MiB) + bytes(16 * MiB))
        kinds["compressed"] = os.path.join(tmp, "compressed.qcow2")
        q.img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, kinds["compressed"])
        kinds = {k: os.path.join(tmp, os.path.basename(v)) for k, v in kinds.items()}
        sizes = "".join(f"size_{k}={os.path.getsize(v)}\n" for k, v in kinds.items())
        script = GUEST_LIB + sizes + GUEST_MAIN.format(img_size=os.path.getsize(img),
                                                       pattern_size=MiB,
                                                       fs_size=os.path.getsize(fs),
                                                       base_size=os.path.getsize(base))
        with VM.Guest(programs=[qk, "fio", "mkfs.ext4", "e2fsck", "blkdiscard",
                                "/usr/bin/fallocate"],
                      modules=["ublk_drv", "virtio_blk", "crc32c_generic", "ext4"]) as vm:
            res = vm.run(script, disks=[img, pattern, fs, base, kinds["backing"],
                                        kinds["extl2"], kinds["compressed"], kinds["prealloc"],
                                        kinds["empty"]],
                         timeout=BOOT_TIMEOUT)
        if args.verbose:
            print(res.console)
        res.check()
        for name in ("boot-ublk-control", "boot-binary", "main-add", "fio-4k-qd32",
                     "fio-64k-qd1", "fio-16k-qd8", "pattern-write", "discard", "zero-write", "fallocate",
                     "main-stop", "load-add", "load-del", "load-daemon-exit", "kill-add",
                     "kill-fio-running", "kill-quiesced", "recover", "recover-live",
                     "kill-fio-verified", "recover-del",
                     "ext4-add", "ext4-file", "ext4-fsck", "ext4-stop", "ro-add",
                     "list", "ro-refuses-writes", "ro-reads", "ro-del", "all-add", "del-all"):
            res.passed(name)
        for kind in kinds:
            for queues in (1, 2):
                for step in ("add", "4k-qd32", "64k-qd1", "stop"):
                    res.passed(f"{kind}-q{queues}-{step}")
        for image in (fs, *kinds.values()):
            T.expect_ok(T.run(["qemu-img", "check", image], timeout=120),
                        f"qemu-img check of {os.path.basename(image)} after the guest")
        # The killed daemon may leak clusters (qemu-img check's exit 3), nothing worse.
        checked = T.run(["qemu-img", "check", img], timeout=120)
        T.check(checked.rc in (0, 3) and "ERROR" not in checked.text,
                f"qemu-img check of img.qcow2 after the kill: {checked.text}{checked.err}")
        # Outside fio's ranges the overlays still read their backing file's data.
        for kind in ("backing", "extl2"):
            q.io(kinds[kind], ["read -P 0x5a 0 1M", "read -P 0x5a 9M 11M",
                               "read -P 0x5a 24M 8M"], cwd=tmp)
        # qemu-img reads what the guest wrote and discarded.
        got = T.run(["qemu-img", "convert", "-O", "raw", img, img + ".raw"], timeout=120)
        T.expect_ok(got, "qemu-img convert of the image")
        with open(img + ".raw", "rb") as f:
            f.seek(16 * MiB)
            written = f.read(MiB)
            f.seek(8 * MiB)
            discarded = f.read(4 * MiB)
            zeroed = f.read(2 * MiB)
        with open(pattern, "rb") as f:
            T.check(written == f.read(), "qemu-img does not read the pattern the guest wrote")
        T.check(discarded == bytes(4 * MiB), "qemu-img does not read zeros where the guest "
                                             "discarded")
        T.check(zeroed == bytes(2 * MiB), "qemu-img does not read the zeros the guest wrote, "
                                          "punched or zeroed")
        mapped = q.map(img)
        T.check(not any(e["data"] and e["start"] < 12 * MiB and e["start"] + e["length"] > 8 * MiB
                        for e in mapped), f"the discarded range is still allocated: {mapped}")
        # --detect-zeroes=unmap with --discard=unmap: the zeros written over data let it go;
        # fallocate's punch and zero range leave no data either.
        T.check(not any(e["data"] and e["start"] < 14 * MiB and e["start"] + e["length"] > 12 * MiB
                        for e in mapped), f"the zeroed range still holds data: {mapped}")
    R.finish()


if __name__ == "__main__":
    main()
