#!/usr/bin/env python3
"""`qcow2kit serve` against real NBD clients (docs/nbd-design.md §4 items 1-5 and 7), with
qemu-nbd 7.2 as the differential oracle serving a copy of the same image.

  nbdinfo     --json field by field (apart from the uri and the contexts list: we always offer
              qemu:allocation-depth); --map and --map=qemu:allocation-depth after merging
              adjacent equal runs, on a backing chain (qcow2 over qcow2 over raw), zero,
              compressed, extended-L2 (subclusters over a backing file) and preallocated
              images; --can X / --is read-only exit codes; -L.
  qemu-io     pattern writes/reads, FUA, write zeroes (plain, unmap, fast), discard, aio +
              flush through the server, replayed with qemu-io on a reference copy: the export
              and, after the stop, the image (read by qemu-img) must equal the reference; on
              the plain image and over a backing chain, compressed clusters and extended L2.
  qemu-img    map --output=json over NBD equals the same against qemu-nbd.
  nbdcopy     -C 4 out of the server and --flush into it (random data with holes over an image
              full of old data), also with --request-size=4M -R 64.
  fio         nbd engine, randwrite with crc32c verify at QD1 and QD32, 4 jobs (4
              connections), 512-byte writes at QD16 and randrw with mixed block sizes.
  filesystem  nbdfuse -C 4 + loop (direct I/O) + ext4: write, fsck, remount, verify (root,
              /dev/fuse and losetup needed, else SKIP).
  read-only   -r: the export is read-only, reads work, writes are refused, the image is
              unchanged.
  shutdown    SIGTERM during fio randwrite QD32 (exit 0, clean image, flushed data kept);
              without -t the server exits by itself when its only client leaves.
Every server must exit 0 on SIGTERM without a sanitizer report, and leave its image clean
(`qemu-img check`, dirty flag clear) - see tests/nbd_server.py.

Run: python3 tests/test_nbd_clients.py --qcow2kit build/qcow2kit [--peer] [--only SUBSTR]
     (--peer: qemu-nbd is the server under test, to validate the cases themselves)
"""

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_server as NS  # noqa: E402
import qk_testlib as T  # noqa: E402
from qk_testlib import KiB, MiB  # noqa: E402

TIMEOUT = 120
LAZY = {"lazy_refcounts": "on"}  # the dirty flag is only meaningful with lazy refcounts


def tool(*argv, timeout=TIMEOUT, what=None):
    return T.expect_ok(T.run(list(argv), timeout=timeout), what)


# --------------------------------------------------------------------------------------
# Images. Each lives in its own directory (with its backing files) as img.qcow2; cases work
# on copies made by fresh().
# --------------------------------------------------------------------------------------

def write_raw(path, size, pieces, seed):
    """A sparse raw file: pieces = [(offset, length, byte or None for random)]."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, ln, byte in pieces:
            f.seek(off)
            f.write(rnd.randbytes(ln) if byte is None else bytes([byte]) * ln)
    return path


def build_plain(q, d):
    img = q.create(os.path.join(d, "img.qcow2"), 64 * MiB, **LAZY)
    q.io(img, ["write -P 0x11 0 1M", "write -P 0x22 5M 64k", "write -z 6M 1M"])


def build_chain(q, d):
    """base.raw <- mid.qcow2 (raw backing) <- img.qcow2: data at every depth, zeroes and
    discards over backing data."""
    write_raw(os.path.join(d, "base.raw"), 16 * MiB,
              [(0, 4 * MiB, 0x11), (8 * MiB, MiB, None), (15 * MiB, 4 * KiB, 0x12)], 1)
    mid = q.create("mid.qcow2", cwd=d, backing="base.raw", backing_fmt="raw")
    q.io(os.path.join(d, mid), ["write -P 0x22 1M 1M", "write -z 2M 512k",
                                "write -P 0x23 10M 192k"])
    img = q.create("img.qcow2", cwd=d, backing="mid.qcow2", backing_fmt="qcow2", **LAZY)
    q.io(os.path.join(d, img), ["write -P 0x33 1536k 64k", "write -z 3M 64k",
                                "discard 8M 64k", "write -P 0x44 12M 4k",
                                "write -z -u 10M 64k", "write -P 0x45 10304k 1k"])


def build_zero(q, d):
    img = q.create(os.path.join(d, "img.qcow2"), 16 * MiB, **LAZY)
    q.io(img, ["write -P 0x11 0 2M", "write -z 256k 64k", "write -z 600k 4k",
               "write -z -u 1M 128k", "discard 1536k 64k", "write -z 4M 1M",
               "write -P 0x22 8M 64k", "write -z 8M 4k"])


def build_compressed(q, d):
    src = write_raw(os.path.join(d, "src.raw"), 8 * MiB,
                    [(0, MiB, 0x5a), (MiB, 512 * KiB, None), (3 * MiB, 64 * KiB, 0x01),
                     (5 * MiB + 4 * KiB, 300 * KiB, 0x77)], 2)
    img = os.path.join(d, "img.qcow2")
    q.img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "lazy_refcounts=on", src, img)
    os.unlink(src)
    # A partial overwrite of a compressed cluster, and zeroes over another.
    q.io(img, ["write -P 0x66 68k 4k", "write -z 128k 64k"])


def build_extl2(q, d):
    """Extended L2 entries (32 subclusters of 2 KiB) over a backing file."""
    base = q.create("base.qcow2", 4 * MiB, cwd=d)
    q.io(os.path.join(d, base), ["write -P 0x11 0 1M"])
    img = q.create("img.qcow2", cwd=d, backing="base.qcow2", backing_fmt="qcow2",
                   extended_l2="on", cluster_size="64k", **LAZY)
    q.io(os.path.join(d, img), ["write -P 0x22 2k 2k", "write -P 0x33 66k 6k",
                                "write -z 8k 4k", "write -z 200k 64k", "discard 320k 64k",
                                "write -P 0x44 1034k 2k", "write -z 1100k 6k",
                                "write -P 0x55 2M 64k", "write -z 2M 8k"])


def build_prealloc(mode):
    def build(q, d):
        img = q.create(os.path.join(d, "img.qcow2"), 16 * MiB, preallocation=mode, **LAZY)
        q.io(img, ["write -P 0x11 1M 64k", "write -z 2M 64k", "write -P 0x12 3M 5k"])
    return build


IMAGES = {
    "plain": build_plain,
    "chain": build_chain,
    "zero": build_zero,
    "compressed": build_compressed,
    "extl2": build_extl2,
    "prealloc-metadata": build_prealloc("metadata"),
    "prealloc-falloc": build_prealloc("falloc"),
}


class Images:
    def __init__(self, q, tmp):
        self.tmp = tmp
        self.dirs = {}
        for name, build in IMAGES.items():
            d = os.path.join(tmp, "templates", name)
            os.makedirs(d)
            build(q, d)
            self.dirs[name] = d

    def fresh(self, name):
        """A private copy of an image (with its backing files); returns its img.qcow2."""
        d = tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp)
        os.rmdir(d)
        NS.copy_image(self.dirs[name], d)
        return os.path.join(d, "img.qcow2")


def new_image(tmp, size, cmds=(), name="new"):
    d = tempfile.mkdtemp(prefix=f"{name}-", dir=tmp)
    img = T.QemuTools().create(os.path.join(d, "img.qcow2"), size, **LAZY)
    if cmds:
        T.QemuTools().io(img, cmds)
    return img


# --------------------------------------------------------------------------------------
# Client helpers
# --------------------------------------------------------------------------------------

def nbdinfo_json(*argv):
    res = tool("nbdinfo", "--json", *argv)
    try:
        return json.loads(res.out)
    except ValueError as e:
        T.fail(f"nbdinfo printed no JSON ({e}):\n{res.describe()}")


def merged_map(uri, context=None):
    """nbdinfo --map (of `context`), adjacent runs of the same type merged."""
    runs = []
    for e in nbdinfo_json("--map" if context is None else f"--map={context}", uri):
        if runs and runs[-1]["type"] == e["type"] and \
                runs[-1]["offset"] + runs[-1]["length"] == e["offset"]:
            runs[-1]["length"] += e["length"]
        else:
            runs.append({k: e[k] for k in ("offset", "length", "type", "description")})
    return runs


def export_info(uri):
    """The export of nbdinfo --json without what depends on the socket path or on -A."""
    info = nbdinfo_json(uri)
    T.check_eq(len(info.get("exports", [])), 1, "number of exports in nbdinfo --json")
    exp = {k: v for k, v in info["exports"][0].items() if k not in ("uri", "contexts")}
    return {**{k: v for k, v in info.items() if k != "exports"}, "export": exp}


def qemu_io_uri(uri, cmds, extra=()):
    return T.QemuTools().io(uri, cmds, fmt="raw", extra=extra)


def compare(a, b, fmt_a="qcow2", fmt_b="qcow2", what="images"):
    tool("qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b, what=f"{what} differ")


def fio(uri, out_json, *opts, size, timeout=TIMEOUT):
    argv = ["fio", "--name=v", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
            "--verify_state_save=0", "--output-format=json", f"--output={out_json}", *opts]
    res = T.run(argv, timeout=timeout, cwd=os.path.dirname(out_json))
    T.expect_ok(res, "fio failed")
    with open(out_json) as f:
        jobs = json.load(f)["jobs"]
    for j in jobs:
        T.check(j["error"] == 0, f"fio job {j['jobname']} error {j['error']}:\n{res.describe()}")
    return jobs


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------

CAN_RW = {"multi-conn": 0, "trim": 0, "zero": 0, "fast-zero": 0, "fua": 0, "flush": 0,
          "cache": 0, "df": 0}
CAN_RO = {**CAN_RW, "trim": 2, "zero": 2, "fast-zero": 2}  # design §1.4: 0x040f + DF + MC


def case_info_json(S, imgs, extra):
    a = imgs.fresh("plain")
    b = NS.copy_image(a, a + ".ref")
    with S.under_test(a, *extra) as ours, S.reference(b, *extra) as ref:
        got = export_info(ours.uri)
        T.check_json_eq(got, export_info(ref.uri), "nbdinfo --json")
        exp = got["export"]
        T.check_eq(exp["export-size"], 64 * MiB, "export-size")
        T.check_eq(exp["is_read_only"], "-r" in extra, "is_read_only")
        T.check_eq(exp.get("export-name"), NS.export_name(extra), "export-name")
        if "-D" in extra:
            T.check_eq(exp.get("description"), extra[extra.index("-D") + 1], "description")
        contexts = nbdinfo_json(ours.uri)["exports"][0].get("contexts", [])
        for c in ("base:allocation", "qemu:allocation-depth"):
            T.check(c in contexts, f"context {c} not offered: {contexts}")


def case_can(S, imgs, extra, expected):
    with S.under_test(imgs.fresh("plain"), *extra) as srv:
        got = {}
        for what in expected:
            got[what] = T.run(["nbdinfo", "--can", what, srv.uri], timeout=TIMEOUT).rc
        T.check_json_eq(got, expected, f"nbdinfo --can exit codes ({' '.join(extra)})")
        ro = T.run(["nbdinfo", "--is", "read-only", srv.uri], timeout=TIMEOUT).rc
        T.check_eq(ro, 0 if "-r" in extra else 2, "nbdinfo --is read-only exit code")


def case_list(S, imgs):
    extra = ("-x", "disk0", "-D", "the test disk")
    a = imgs.fresh("plain")
    b = NS.copy_image(a, a + ".ref")
    with S.under_test(a, *extra) as ours, S.reference(b, *extra) as ref:
        def listing(uri):
            info = nbdinfo_json("-L", uri)
            return [{"export-name": e.get("export-name"), "description": e.get("description")}
                    for e in info["exports"]]
        got = listing(ours.uri)
        T.check_json_eq(got, listing(ref.uri), "nbdinfo -L exports")
        T.check_eq(got, [{"export-name": "disk0", "description": "the test disk"}],
                   "nbdinfo -L exports")
        # The default export does not exist when -x names another one.
        res = T.run(["nbdinfo", NS.nbd_uri(ours.sock)], timeout=TIMEOUT)
        T.expect_no_crash(res, "nbdinfo of the default export", allowed_rc=(1,))


def case_map(S, imgs, name):
    a = imgs.fresh(name)
    b = os.path.join(os.path.dirname(a) + ".ref", "img.qcow2")
    NS.copy_image(os.path.dirname(a), os.path.dirname(b))
    with S.under_test(a) as ours, S.reference(b) as ref:
        for ctx in (None, "qemu:allocation-depth"):
            got, want = merged_map(ours.uri, ctx), merged_map(ref.uri, ctx)
            T.check_json_eq(got, want, f"nbdinfo --map={ctx or 'base:allocation'}")
            if ctx is None:
                T.check(len(got) > 1, f"{name}: a single run cannot tell much: {got}")
        compare(ours.uri, ref.uri, "raw", "raw", "the export and qemu-nbd's")


def case_qemu_img_map(S, imgs):
    a = imgs.fresh("chain")
    b = os.path.join(os.path.dirname(a) + ".ref", "img.qcow2")
    NS.copy_image(os.path.dirname(a), os.path.dirname(b))
    with S.under_test(a, "-r") as ours, S.reference(b, "-r") as ref:
        got = T.QemuTools().map(ours.uri, extra=("-f", "raw"))
        T.check_json_eq(got, T.QemuTools().map(ref.uri, extra=("-f", "raw")),
                        "qemu-img map --output=json -f raw URI")
        T.check(any(e["data"] for e in got) and any(not e["data"] for e in got),
                f"map shows no data/hole mix: {got}")


QEMU_IO_SCRIPT = [
    "write -P 0xab 0 64k", "read -P 0xab 0 64k", "write -f -P 0xcd 1M 4k",
    "write -P 0x99 2M 1M", "write -z 2M 1M", "read -P 0 2M 1M",
    "write -P 0x98 3M 64k", "write -z -u 3M 64k", "read -P 0 3M 64k",
    "write -z -n 4M 64k", "write -P 0x55 5M 64k", "discard 5M 64k",
    "aio_write -P 0x11 6M 4k", "aio_write -P 0x12 6148k 3k", "aio_flush",
    "write -P 0x13 7M 511", "write -z 7M 100", "read -P 0x13 7340132 411",
    "write -f -z 8M 4k", "flush", "read -P 0x11 6M 4k", "read -P 0 5M 64k",
]


# Writes over what the layered images hold below (backing data at every depth, compressed
# clusters, subclusters): partial clusters that copy from a backing file or a compressed
# cluster, zeroes and unmaps over backing data (which must then read zeros), discards,
# pipelined writes with a flush and FUA across a cluster boundary. Offsets fit the 4 MiB
# extl2 image.
LAYERED_SCRIPT = [
    "write -P 0xa1 1000k 8k", "write -P 0xa2 2052k 3k", "write -z 4k 2k",
    "write -z -u 64k 64k", "read -P 0 64k 64k", "discard 128k 64k", "write -P 0xa5 1M 512",
    "aio_write -P 0xa3 3M 4k", "aio_write -P 0xa4 3076k 60k", "aio_flush",
    "write -f -P 0xa6 3000k 10k", "write -P 0xa7 66k 1k", "flush",
]


def case_qemu_io(S, imgs, extra, image="plain", script=QEMU_IO_SCRIPT):
    """`script` through the server and with qemu-io on a copy: the export equals the copy,
    and after the stop qemu-img reads the image as the copy (qemu-img is the judge of what
    was written, not the server that wrote it)."""
    a = imgs.fresh(image)
    ref = os.path.join(os.path.dirname(a) + ".ref", "img.qcow2")
    NS.copy_image(os.path.dirname(a), os.path.dirname(ref))
    with S.under_test(a, "--discard=unmap", *extra) as srv:
        qemu_io_uri(srv.uri, script)
        T.QemuTools().io(ref, script)
        compare(srv.uri, ref, "raw", "qcow2", "the export and the reference")
    compare(a, ref, what="the image after the stop and the reference")


def make_holey_raw(path, size, seed):
    """Random data in 1 MiB pieces with holes and written zeroes between them."""
    rnd = random.Random(seed)
    pieces = []
    for off in range(0, size, MiB):
        kind = rnd.choice(["data", "data", "hole", "zeros", "partial"])
        if kind == "data":
            pieces.append((off, MiB, None))
        elif kind == "zeros":
            pieces.append((off, MiB, 0))
        elif kind == "partial":
            pieces.append((off + rnd.randrange(0, MiB // 2, 512), rnd.randrange(512, MiB // 2,
                                                                             512), None))
    return write_raw(path, size, pieces, seed)


def case_nbdcopy_out(S, imgs, opts):
    a = imgs.fresh("chain")
    out = a + ".out.raw"
    with S.under_test(a, "-r") as srv:
        tool("nbdcopy", "-C", "4", *opts, srv.uri, out, timeout=TIMEOUT)
    compare(out, a, "raw", "qcow2", "nbdcopy's copy and the image")


def case_nbdcopy_in(S, tmp, opts, seed):
    size = 48 * MiB
    img = new_image(tmp, size, ["write -P 0x77 0 48M"], "nbdcopy-in")  # old data everywhere
    src = make_holey_raw(img + ".src.raw", size, seed)
    with S.under_test(img) as srv:
        tool("nbdcopy", "-C", "4", "--flush", *opts, src, srv.uri, timeout=TIMEOUT)
        compare(src, srv.uri, "raw", "raw", "the source and the export")
    compare(src, img, "raw", "qcow2", "the source and the image after the stop")


def case_fio(S, tmp, name, size, image_size, opts, jobs=1):
    img = new_image(tmp, image_size, name=f"fio-{name}")
    with S.under_test(img) as srv:
        done = fio(srv.uri, img + ".json", "--verify=crc32c", "--do_verify=1",
                   "--verify_fatal=1", *opts, size=size)
        T.check_eq(len(done), jobs, "fio jobs reported")
        for j in done:
            T.check(j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0,
                    f"fio job wrote or verified nothing: {j['write']['io_bytes']} "
                    f"{j['read']['io_bytes']}")


def fs_available():
    missing = [p for p in ("losetup", "mkfs.ext4", "fsck.ext4", "fusermount3", "nbdfuse")
               if not shutil.which(p)]
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control"
    if missing:
        return f"missing {missing}"
    return None


@contextlib.contextmanager
def nbdfuse(disk, uri):
    """nbdfuse -C 4 over the regular file `disk` (a "naked" mount) until the block ends."""
    pidfile = disk + ".pid"
    errf = open(disk + ".stderr", "w+b")
    p = subprocess.Popen(["nbdfuse", "-C", "4", "-P", pidfile, disk, uri],
                         stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(pidfile) and os.path.getsize(pidfile)):
            if p.poll() is not None or time.monotonic() > deadline:
                errf.seek(0)
                T.fail(f"nbdfuse did not come up (exit {p.poll()}): "
                       f"{errf.read().decode(errors='replace')}")
            time.sleep(0.05)
        yield
    finally:
        T.run(["fusermount3", "-u", disk], timeout=30)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        errf.close()


@contextlib.contextmanager
def loop_device(path):
    dev = tool("losetup", "--direct-io=on", "-f", "--show", path).text.strip()
    try:
        yield dev
    finally:
        for _ in range(50):  # udev or a lazy unmount may hold it for a moment
            if T.run(["losetup", "-d", dev], timeout=30).rc == 0:
                break
            time.sleep(0.1)


@contextlib.contextmanager
def mounted(dev, mnt):
    tool("mount", dev, mnt)
    try:
        yield mnt
    finally:
        if T.run(["umount", mnt], timeout=60).rc != 0:
            T.run(["umount", "-l", mnt], timeout=60)


def case_filesystem(S, tmp):
    why = fs_available()
    if why:
        T.skip(why)
    img = new_image(tmp, 128 * MiB, name="fs")
    work = os.path.dirname(img)
    disk, mnt = os.path.join(work, "disk"), os.path.join(work, "mnt")
    open(disk, "w").close()
    os.mkdir(mnt)
    rnd = random.Random(7)
    files = {f"f{i}": rnd.randbytes(rnd.randrange(1, 1 * MiB)) for i in range(24)}
    files["big"] = rnd.randbytes(12 * MiB)
    with S.under_test(img) as srv, nbdfuse(disk, srv.uri), loop_device(disk) as dev:
        tool("mkfs.ext4", "-q", "-E", "nodiscard", dev)
        with mounted(dev, mnt):
            for n, data in files.items():
                with open(os.path.join(mnt, n), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            tool("sync")
        tool("fsck.ext4", "-fn", dev, what="fsck.ext4 -fn after the first mount")
        with mounted(dev, mnt):
            for n, data in files.items():
                got = T.sha256_file(os.path.join(mnt, n))
                T.check_eq(got, T.hexdigest(data), f"sha256 of {n} after remounting")


def case_read_only(S, imgs):
    a = imgs.fresh("plain")
    before = NS.copy_image(a, a + ".before")
    with S.under_test(a, "-r") as srv:
        qemu_io_uri(srv.uri, ["read -P 0x11 0 1M", "read -P 0x22 5M 64k", "read -P 0 6M 1M"],
                    extra=("-r",))
        res = T.run(["qemu-io", "-f", "raw", "-c", "write -P 0x01 0 4k", srv.uri],
                    timeout=TIMEOUT)
        T.expect_no_crash(res, "qemu-io write on a read-only export", allowed_rc=(1,))
        T.check("Permission denied" in res.err or "read-only" in res.err.lower(),
                f"qemu-io did not report a read-only export:\n{res.describe()}")
        res = T.run(["nbdcopy", before, srv.uri], timeout=TIMEOUT)
        T.expect_no_crash(res, "nbdcopy into a read-only export", allowed_rc=(1,))
        T.check_eq(T.run(["nbdinfo", "--is", "read-only", srv.uri]).rc, 0,
                   "nbdinfo --is read-only")
    compare(a, before, what="the read-only image and its copy from before")


def case_sigterm_under_load(S, tmp):
    img = new_image(tmp, 64 * MiB, name="sigterm")
    with S.under_test(img) as srv:
        # Acknowledged and flushed before the storm: must survive the SIGTERM.
        qemu_io_uri(srv.uri, ["write -P 0x5a 60M 4M", "flush"])
        fio_out = img + ".json"
        p = subprocess.Popen(["fio", "--name=storm", "--ioengine=nbd", f"--uri={srv.uri}",
                              "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=48m",
                              "--time_based", "--runtime=600", "--output-format=json",
                              f"--output={fio_out}"], cwd=os.path.dirname(img),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # The storm is on once fio's writes have allocated a MiB of the image.
            start = os.stat(img).st_blocks * 512
            deadline = time.monotonic() + TIMEOUT
            while os.stat(img).st_blocks * 512 < start + MiB:
                if p.poll() is not None:
                    T.fail(f"fio ended before the SIGTERM: {p.stdout.read()}")
                if time.monotonic() > deadline:
                    T.fail(f"fio wrote nothing through {S.name} in {TIMEOUT}s")
                time.sleep(0.05)
            # fio would run for 10 minutes: a server that waited for its client could not
            # exit within stop()'s limit (STOP_TIMEOUT), however loaded the machine.
            srv.stop()  # SIGTERM; exit 0, qemu-img check clean, dirty flag clear
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
    T.QemuTools().io(img, ["read -P 0x5a 60M 4M"])


def case_exit_after_last_client(S, imgs):
    with S.under_test(imgs.fresh("plain"), persistent=False) as srv:
        T.check(srv.alive(), f"{S.name} without -t exited before any client came")
        nbdinfo_json(srv.uri)
        rc = srv.wait_exit(20, "exit after its only client left (no -t)")
        T.check_eq(rc, 0, f"exit status of {S.name} without -t")


def main():
    args = NS.parse_args(__doc__)
    R = T.Runner(args, "test_nbd_clients")
    S = NS.Servers(args, R.tmp)
    if not S.check_binary(R):
        R.finish()
    q = T.QemuTools()
    imgs = R.setup("images", Images, q, R.tmp)
    if imgs is None:
        R.finish()

    # Quick differential and protocol-level cases run concurrently (-j).
    R.defer("nbdinfo/json", case_info_json, S, imgs, ())
    R.defer("nbdinfo/json-read-only", case_info_json, S, imgs, ("-r",))
    R.defer("nbdinfo/json-named", case_info_json, S, imgs, ("-x", "vol1", "-D", "a volume"))
    R.defer("nbdinfo/can-writable", case_can, S, imgs, (), CAN_RW)
    R.defer("nbdinfo/can-read-only", case_can, S, imgs, ("-r",), CAN_RO)
    R.defer("nbdinfo/list", case_list, S, imgs)
    for name in IMAGES:
        R.defer(f"nbdinfo/map/{name}", case_map, S, imgs, name)
    R.defer("qemu-img/map-json", case_qemu_img_map, S, imgs)
    R.defer("qemu-io/script", case_qemu_io, S, imgs, ())
    R.defer("qemu-io/script-writeback-threads", case_qemu_io, S, imgs,
            ("--cache=writeback", "--aio=threads"))
    for name in ("chain", "compressed", "extl2"):
        R.defer(f"qemu-io/layered/{name}", case_qemu_io, S, imgs, (), name, LAYERED_SCRIPT)
    R.defer("read-only", case_read_only, S, imgs)
    R.defer("nbdcopy/out-C4", case_nbdcopy_out, S, imgs, ())
    R.defer("nbdcopy/out-C4-req4M-R64", case_nbdcopy_out, S, imgs,
            ("--request-size=4194304", "-R", "64"))
    R.defer("nbdcopy/in-C4-flush", case_nbdcopy_in, S, R.tmp, (), 11)
    R.defer("nbdcopy/in-C4-flush-req4M-R64", case_nbdcopy_in, S, R.tmp,
            ("--request-size=4194304", "-R", "64"), 12)
    R.defer("shutdown/exit-after-last-client", case_exit_after_last_client, S, imgs)
    R.run_deferred()

    # Load cases, one at a time (the machine has 2 cores).
    with R.case("fio/randwrite-qd1"):
        case_fio(S, R.tmp, "qd1", "16m", 64 * MiB, ["--rw=randwrite", "--bs=4k", "--iodepth=1"])
    with R.case("fio/randwrite-qd32"):
        case_fio(S, R.tmp, "qd32", "64m", 64 * MiB,
                 ["--rw=randwrite", "--bs=4k", "--iodepth=32"])
    with R.case("fio/randwrite-4-jobs"):
        case_fio(S, R.tmp, "jobs4", "16m", 256 * MiB,
                 ["--rw=randwrite", "--bs=4k", "--iodepth=8", "--numjobs=4",
                  "--offset_increment=64m"], jobs=4)
    with R.case("fio/randwrite-512b-qd16"):  # sub-4k writes racing inside one 4k block
        case_fio(S, R.tmp, "512b", "4m", 64 * MiB,
                 ["--rw=randwrite", "--bs=512", "--iodepth=16"])
    with R.case("fio/randrw-bsrange"):
        case_fio(S, R.tmp, "randrw", "32m", 64 * MiB,
                 ["--rw=randrw", "--bsrange=512-256k", "--iodepth=16"])
    with R.case("filesystem/nbdfuse-loop-ext4"):
        case_filesystem(S, R.tmp)
    with R.case("shutdown/sigterm-under-fio-qd32"):
        case_sigterm_under_load(S, R.tmp)
    R.finish()


if __name__ == "__main__":
    main()
