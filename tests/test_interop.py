#!/usr/bin/env python3
"""Interop matrix: images written by qemu-img / qemu-io must read back identically through
qcow2kit, and `map` / `info` must report what qemu-img reports.

For each image of the matrix:
  read      - `qcow2kit read --output F` with both I/O engines equals `qemu-img convert -O raw`;
              `read -t none --sha256` (O_DIRECT; engines alternate between images) equals the
              digest of that; -o/-l sub-ranges at odd offsets (crossing cluster / L2
              boundaries, the image tail) equal the same bytes. "Light" variants (refcount
              widths other than 1 and 64, compat=1.1 spelled out) do one engine per read.
              Huge sparse images compare whole reads by digest.
  map       - `qcow2kit map --output=json` equals `qemu-img map --output=json` without "offset"
  info      - `qcow2kit info --output=json` equals qemu-img's for the keys that do not depend
              on the host (virtual-size, cluster-size, format, dirty-flag, backing-*,
              format-specific whole, snapshots' id/name/sizes/dates/clocks/icount)
plus `info --backing-chain` on the backing chains (also comparing each "filename").
Cases run concurrently (-j, default 3); --long changes nothing here.

Run: python3 tests/test_interop.py --qcow2kit build/qcow2kit [--long] [--only SUBSTR]
"""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qk_testlib as T  # noqa: E402
from qk_testlib import KiB, MiB  # noqa: E402

INFO_KEYS = ["virtual-size", "cluster-size", "format", "dirty-flag", "backing-filename",
             "full-backing-filename", "backing-filename-format", "format-specific"]
SNAPSHOT_KEYS = ["id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec",
                 "vm-clock-nsec", "icount"]
MISSING = "<absent>"
ENGINES = ["sync", "io_uring"]


class Image:
    """One image of the matrix and the facts its checks need."""

    def __init__(self, name, path, big=False, chain=False, notes=""):
        self.name = name
        self.path = path
        self.big = big          # compare whole-image reads by digest only (sparse, large)
        self.light = False      # a variant whose read paths the others already cover:
        #                         one engine per whole read, fewer sub-ranges
        self.chain = chain      # also compare `info --backing-chain`
        self.notes = notes
        self.ranges = []        # extra (offset, length) sub-range reads of interest


# --------------------------------------------------------------------------------------
# qemu-io command scripts
# --------------------------------------------------------------------------------------

class Script:
    """Collects qemu-io commands, dropping any that would run past the image end."""

    def __init__(self, size):
        self.size = size
        self.cmds = []

    def _fits(self, off, ln):
        return off >= 0 and ln > 0 and off + ln <= self.size

    def w(self, pattern, off, ln, compressed=False):
        if self._fits(off, ln):
            self.cmds.append(f"write {'-c ' if compressed else ''}-P {pattern:#x} {off} {ln}")

    def z(self, off, ln, unmap=False):
        if self._fits(off, ln):
            self.cmds.append(f"write -z {'-u ' if unmap else ''}{off} {ln}")

    def d(self, off, ln):
        if self._fits(off, ln):
            self.cmds.append(f"discard {off} {ln}")


def standard_script(cs, size, l2_cover, zero_ops=True):
    """Data at assorted offsets: whole clusters, partial clusters at odd offsets and
    lengths, writes crossing cluster and L2-table boundaries, zero writes with and without
    unmap, discards, overwrites and the image tail."""
    s = Script(size)
    s.w(0x11, 0, cs)                          # first cluster, whole
    s.w(0x12, cs + 1000 % cs, 333)            # partial cluster, odd offset and length
    s.w(0x13, 3 * cs - 700, 1500)             # crosses a cluster boundary
    s.w(0x14, 5 * cs + 100, 3 * cs)           # several clusters, unaligned both ends
    s.w(0x15, 9 * cs, 5 * cs)                 # data that the zero ops below punch into
    if zero_ops:
        s.z(9 * cs, 2 * cs)                   # zero, keep allocation (ZERO_ALLOC)
        s.z(11 * cs, cs, unmap=True)          # zero + unmap
        s.d(12 * cs, cs)                      # discard
        s.z(15 * cs, cs)                      # zero on unallocated (ZERO_PLAIN)
        s.z(16 * cs + 512, 1024 if cs > 1024 else 512)  # unaligned zero write
    s.w(0x16, 17 * cs - 512, 1024)            # straddles clusters 16/17
    s.w(0x17, 6 * cs, cs // 2)                # overwrite inside the earlier run
    if l2_cover + cs < size:
        s.w(0x18, l2_cover - cs - 300, 2 * cs + 600)   # crosses an L2-table boundary
    if 2 * l2_cover + cs < size:
        s.w(0x19, 2 * l2_cover - 4096, 8192)
    s.w(0x1a, size - 3000, 3000)              # the image tail, unaligned start
    return s.cmds


def l2_cover(cs, extended=False):
    return (cs // (16 if extended else 8)) * cs


def subcluster_script(cs, size):
    """Extended-L2 subcluster allocation, zero and discard states."""
    sc = cs // 32
    s = Script(size)
    s.w(0x21, 2 * sc, 2 * sc)                 # two whole subclusters of cluster 0
    s.w(0x22, 5 * sc + 100, 300)              # part of one subcluster
    s.z(8 * sc, 2 * sc)                       # zero subclusters of an allocated cluster
    s.w(0x23, cs, cs)                         # whole cluster 1
    s.z(cs + 4 * sc, 3 * sc)                  # zero bits inside an allocated cluster
    s.z(cs + 10 * sc, sc, unmap=True)
    s.d(cs + 20 * sc, 2 * sc)
    s.w(0x24, 3 * cs - sc // 2, sc)           # crosses a cluster boundary mid-subcluster
    s.z(4 * cs + 3 * sc, 5 * sc)              # zero subclusters of an unallocated cluster
    s.w(0x25, 4 * cs + 6 * sc, sc)            # data inside the zeroed range
    s.w(0x26, 6 * cs, 2 * cs)
    s.z(6 * cs, cs)                           # whole cluster to zero (keeps allocation)
    s.d(7 * cs, cs)                           # whole cluster discard
    s.w(0x27, 9 * cs + 31 * sc, 2 * sc)       # last subcluster of 9 into first of 10
    s.w(0x28, size - 1000, 1000)
    return s.cmds


# --------------------------------------------------------------------------------------
# Image builders (each returns a list of Image)
# --------------------------------------------------------------------------------------

def build_plain(q, d, name, cs, size, extra_cmds=(), zero_ops=True, **opts):
    path = os.path.join(d, f"{name}.qcow2")
    q.create(path, size, cluster_size=cs, **opts)
    ext = opts.get("extended_l2") == "on"
    cmds = standard_script(cs, size, l2_cover(cs, ext), zero_ops=zero_ops) + list(extra_cmds)
    q.io(path, cmds)
    img = Image(name, path)
    img.ranges = [(cs - 3, 7), (3 * cs - 701, 1502)]
    cover = l2_cover(cs, ext)
    if cover + cs < size:
        img.ranges.append((cover - 5, 11))
    return img


def build_cluster_sizes(q, d):
    out = []
    for cs, size in [(512, 1 * MiB), (4 * KiB, 5 * MiB), (64 * KiB, 2 * MiB),
                     (2 * MiB, 40 * MiB)]:
        out.append(build_plain(q, d, f"cs{cs // 1024 if cs >= 1024 else cs}"
                               f"{'k' if cs >= 1024 else ''}", cs, size))
    return out


def build_l2_crossing_64k(q, d):
    # 64 KiB clusters: one L2 table maps 512 MiB, so crossing it needs a (sparse) larger disk.
    cs = 64 * KiB
    size = 512 * MiB + 4 * MiB
    path = os.path.join(d, "l2cross64k.qcow2")
    q.create(path, size, cluster_size=cs)
    s = Script(size)
    s.w(0x31, 0, 3000)
    s.w(0x32, 512 * MiB - 100 * KiB - 7, 300 * KiB)   # crosses the first L2 table's end
    s.z(512 * MiB + 256 * KiB, 128 * KiB)
    s.w(0x33, size - 512, 512)
    q.io(path, s.cmds)
    img = Image("l2cross64k", path, big=True)
    img.ranges = [(512 * MiB - 5, 10), (512 * MiB - 100 * KiB - 8, 300 * KiB + 16)]
    return [img]


def build_compat(q, d):
    out = []
    for cs in (512, 64 * KiB):
        nm = f"v2-cs{cs if cs < 1024 else str(cs // 1024) + 'k'}"
        out.append(build_plain(q, d, nm, cs, 1 * MiB if cs == 512 else 2 * MiB, compat="0.10"))
    img = build_plain(q, d, "v3-compat11", 64 * KiB, 2 * MiB, compat="1.1")
    img.light = True                        # the same as the default cs64k image
    out.append(img)
    return out


def build_refcount_bits(q, d):
    out = []
    for bits in (1, 2, 4, 8, 16, 32, 64):
        cs = 512 if bits in (1, 64) else 4 * KiB   # small clusters: several refblocks
        img = build_plain(q, d, f"refcount{bits}", cs, 1 * MiB if cs == 512 else 3 * MiB,
                          refcount_bits=bits)
        img.light = bits not in (1, 64)     # refcounts do not change the read path
        out.append(img)
    return out


def build_extended_l2(q, d):
    out = []
    for cs, size in [(16 * KiB, 18 * MiB), (64 * KiB, 2 * MiB), (2 * MiB, 24 * MiB)]:
        nm = f"extl2-cs{cs // 1024}k"
        path = os.path.join(d, nm + ".qcow2")
        q.create(path, size, cluster_size=cs, extended_l2="on")
        cmds = subcluster_script(cs, size)
        cover = l2_cover(cs, True)
        s = Script(size)
        s.w(0x29, cover - cs // 32 - 5, cs)  # crosses an L2 table (16 KiB: at 16 MiB)
        q.io(path, cmds + s.cmds)
        img = Image(nm, path)
        img.ranges = [(2 * (cs // 32) - 1, cs // 32 + 2), (cs + 4 * (cs // 32) - 3, 9)]
        out.append(img)
    # Extended L2 over a backing file: unallocated subclusters read from the backing file.
    base = os.path.join(d, "extl2-base.qcow2")
    q.create(base, 2 * MiB, cluster_size=64 * KiB)
    q.io(base, ["write -P 0x41 0 2M"])
    top = os.path.join(d, "extl2-over-backing.qcow2")
    q.create(top, 2 * MiB, backing="extl2-base.qcow2", backing_fmt="qcow2", cluster_size=64 * KiB,
             extended_l2="on")
    q.io(top, subcluster_script(64 * KiB, 2 * MiB))
    img = Image("extl2-over-backing", top, chain=True)
    img.ranges = [(4 * KiB - 1, 3 * KiB)]
    out.append(img)
    return out


def make_mixed_raw(path, size, seed):
    """Random, zero and text parts (compressible and incompressible clusters)."""
    rnd = random.Random(seed)
    text = (b"The quick brown fox jumps over the lazy qcow2 cluster. " * 64)
    buf = bytearray()
    kinds = ["random", "zeros", "text", "text", "random", "zeros", "text"]
    i = 0
    while len(buf) < size:
        part = rnd.choice([37 * KiB, 100 * KiB + 123, 200 * KiB, 64 * KiB, 300 * KiB + 5])
        k = kinds[i % len(kinds)]
        i += 1
        if k == "random":
            buf += rnd.randbytes(part)
        elif k == "zeros":
            buf += bytes(part)
        else:
            buf += (text * (part // len(text) + 1))[:part]
    with open(path, "wb") as f:
        f.write(buf[:size])


def build_compressed(q, d):
    out = []
    src = os.path.join(d, "mixed.raw")
    make_mixed_raw(src, 5 * MiB + 12345, seed=1234)    # not cluster (or even 512) aligned
    for ctype, cs in [("zlib", 64 * KiB), ("zstd", 64 * KiB), ("zlib", 512), ("zstd", 4 * KiB),
                      ("zlib", 2 * MiB), ("zstd", 2 * MiB)]:
        nm = f"compressed-{ctype}-cs{cs if cs < 1024 else str(cs // 1024) + 'k'}"
        path = os.path.join(d, nm + ".qcow2")
        q.img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
              f"compression_type={ctype},cluster_size={cs}", src, path)
        img = Image(nm, path)
        img.ranges = [(cs - 1, 2), (5 * MiB + 12345 - 100, 100), (100 * KiB + 3, 64 * KiB)]
        out.append(img)
    # Compressed clusters written by qemu-io, then partly overwritten / zeroed / discarded.
    for ctype in ("zlib", "zstd"):
        nm = f"compressed-rw-{ctype}"
        path = os.path.join(d, nm + ".qcow2")
        q.create(path, 2 * MiB, compression_type=ctype)
        q.io(path, ["write -c -P 0x51 0 64k", "write -c -P 0x52 128k 192k",
                    "write -c -P 0x53 1984k 64k",
                    "write -P 0x54 130k 1k",          # COW of a compressed cluster
                    "write -z 256k 64k",              # zeroing a compressed cluster
                    "discard 192k 64k"])
        img = Image(nm, path)
        img.ranges = [(64 * KiB - 1, 2), (130 * KiB - 5, 1034)]
        out.append(img)
    return out


def build_backing_chain(q, d):
    """base.raw <- mid.qcow2 <- top.qcow2 with relative backing names and -F."""
    cd = os.path.join(d, "chain")
    os.makedirs(cd)
    base = os.path.join(cd, "base.raw")
    with open(base, "wb") as f:
        f.truncate(2 * MiB + 1536)          # shorter than mid, not cluster aligned
    q.io(base, ["write -P 0xb1 0 2M", "write -P 0xb2 2M 1536"], fmt="raw")
    q.create("mid.qcow2", 3 * MiB, cwd=cd, backing="base.raw", backing_fmt="raw")
    mid = os.path.join(cd, "mid.qcow2")
    q.io(mid, ["write -P 0xc1 64k 64k", "write -P 0xc2 300k 1000",   # partial: COW from base
               "write -z 512k 128k",                                  # zero over base data
               "discard 768k 64k",                                    # discard over base data
               "write -P 0xc3 2040k 20k",                             # crosses base's end
               "write -P 0xc4 2900k 100k"])                           # beyond base's end
    q.create("top.qcow2", 4 * MiB + 512, cwd=cd, backing="mid.qcow2", backing_fmt="qcow2")
    top = os.path.join(cd, "top.qcow2")
    q.io(top, ["write -P 0xd1 100k 10k", "write -z 64k 16k",           # zero part of mid data
               "write -P 0xd2 500k 200k",                              # over mid's zero range
               "discard 1M 64k", "write -z -u 1152k 64k",
               "write -P 0xd3 3M 64k",                                  # beyond mid data
               "write -P 0xd4 4M 512"])                                 # beyond mid's end
    img = Image("chain3", top, chain=True)
    img.ranges = [(2 * MiB + 1530, 20), (3 * MiB - 3, 6), (1 * MiB - 7, 70 * KiB)]
    # The middle layer on its own as well (raw backing, shorter than it).
    img2 = Image("chain3-mid", mid, chain=True)
    img2.ranges = [(2 * MiB + 1000, 1000)]

    # v2 overlay over a v2 base: zero writes cannot use zero clusters there.
    b2 = os.path.join(d, "v2base.qcow2")
    q.create(b2, 1 * MiB, compat="0.10")
    q.io(b2, ["write -P 0xe1 0 1M"])
    t2 = os.path.join(d, "v2top.qcow2")
    q.create(t2, 1 * MiB, backing="v2base.qcow2", backing_fmt="qcow2", compat="0.10")
    q.io(t2, ["write -P 0xe2 65000 2000", "write -z 128k 64k", "write -z 300k 1000"])
    img3 = Image("v2-chain", t2, chain=True)
    return [img, img2, img3]


def build_data_file(q, d):
    out = []
    for raw in ("off", "on"):
        nm = f"datafile-raw-{raw}"
        dd = os.path.join(d, nm)
        os.makedirs(dd)
        # qemu-img 7.2 resolves a relative data-file name against the current directory
        # (not the image's), so store an absolute name.
        path = os.path.join(dd, f"{nm}.qcow2")
        q.create(path, 2 * MiB, data_file=os.path.join(dd, f"{nm}.data"), data_file_raw=raw)
        q.io(path, standard_script(64 * KiB, 2 * MiB, l2_cover(64 * KiB)))
        img = Image(nm, path)
        img.ranges = [(65535, 2)]
        out.append(img)
    return out


def build_prealloc(q, d):
    out = []
    for mode in ("off", "metadata", "falloc", "full"):
        nm = f"prealloc-{mode}"
        path = os.path.join(d, nm + ".qcow2")
        q.create(path, 2 * MiB, preallocation=mode)
        q.io(path, ["write -P 0x61 100k 10k", "write -z 512k 64k", "write -z -u 640k 64k",
                    "discard 1M 128k", "write -P 0x62 2047k 1k"])
        out.append(Image(nm, path))
    return out


def build_snapshots(q, d):
    out = []
    for compat in ("1.1", "0.10"):
        nm = f"snapshots-v{3 if compat == '1.1' else 2}"
        path = os.path.join(d, nm + ".qcow2")
        q.create(path, 2 * MiB, compat=compat)
        q.io(path, ["write -P 0x71 0 256k", "write -P 0x72 1M 64k"])
        q.img("snapshot", "-c", "first", path)
        q.io(path, ["write -P 0x73 32k 64k", "discard 1M 64k", "write -z 128k 64k"])
        q.img("snapshot", "-c", "second snapshot", path)
        q.io(path, ["write -P 0x74 200k 100k", "write -P 0x75 1500k 4k"])
        img = Image(nm, path)
        img.ranges = [(32 * KiB - 1, 2), (1 * MiB - 3, 70 * KiB)]
        out.append(img)
    # The snapshot table as the last thing in the file: qemu-img does not pad the file to
    # the end of the table's last 8-byte-aligned entry, let alone the cluster.
    path = os.path.join(d, "snapshots-at-eof.qcow2")
    q.create(path, 1 * MiB, cluster_size=4096)
    q.io(path, ["write -P 0x76 0 12k", "write -P 0x77 512k 4k"])
    q.img("snapshot", "-c", "snap-one", path)
    out.append(Image("snapshots-at-eof", path))
    return out


def build_dirty(q, d):
    path = os.path.join(d, "dirty-lazy.qcow2")
    q.create(path, 2 * MiB, lazy_refcounts="on")
    q.io(path, ["write -P 0x5a 0 128k", "sigraise 9"], ok=False)   # killed: stays dirty
    info = q.info(path)
    T.check(info.get("dirty-flag") is True,
            f"qemu-img info does not show the killed image as dirty: {info}")
    return [Image("dirty-lazy", path)]


def build_zero_discard(q, d):
    """Zero clusters, discards and partial-cluster writes in detail (4 KiB clusters)."""
    cs = 4 * KiB
    size = 1 * MiB
    path = os.path.join(d, "zero-discard.qcow2")
    q.create(path, size, cluster_size=cs)
    cmds = ["write -P 0x81 0 64k",
            "write -z 4k 4k", "write -z -u 12k 8k", "discard 24k 8k",
            "write -z 36k 100",              # unaligned: real zeros written (stays data)
            "write -z -u 40k 2k",            # half-cluster zero with unmap
            "discard 48k 2k",                # partial discard: ignored by qcow2
            "write -z 128k 64k",             # zero clusters on unallocated
            "write -P 0x82 130k 1",          # one byte inside a zero cluster
            "write -P 0x83 255999 2",        # straddles a cluster boundary at an odd offset
            "write -z -u 512k 512k",         # to the end
            "write -P 0x84 1040383 1"]       # last byte of the image
    q.io(path, cmds)
    img = Image("zero-discard", path)
    img.ranges = [(36 * KiB - 1, 102), (130 * KiB, 1), (255998, 4), (size - 1, 1)]
    return [img]


BUILDERS = [build_cluster_sizes, build_l2_crossing_64k, build_compat, build_refcount_bits,
            build_extended_l2, build_compressed, build_backing_chain, build_data_file,
            build_prealloc, build_snapshots, build_dirty, build_zero_discard]


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------

def pick_info(info, keys):
    return {k: info.get(k, MISSING) for k in keys}


def pick_snapshots(info):
    snaps = info.get("snapshots", MISSING)
    if snaps is MISSING or not isinstance(snaps, list):
        return snaps
    return [{k: s.get(k, MISSING) for k in SNAPSHOT_KEYS} if isinstance(s, dict) else s
            for s in snaps]


def queue_image_cases(R, qk, q, img, idx):
    """Compute qemu-img's answers for one image and queue its cases (run concurrently)."""
    tmp = R.tmp
    ref = os.path.join(tmp, f"{img.name}.ref.raw")
    q.to_raw(img.path, ref)
    ref_size = os.path.getsize(ref)
    ref_sha = T.sha256_file(ref)
    qinfo = q.info(img.path)
    # Both tools decide whether to probe the host file for holes from its allocated size
    # (QEMU's metadata-preallocation heuristic); with delayed allocation that size changes
    # until the file is written back, so settle it first.
    os.sync()
    qmap = q.map(img.path)
    qchain = q.info(img.path, chain=True) if img.chain else None
    T.check(qinfo["virtual-size"] == ref_size, "qemu-img raw size != virtual size")
    pre = f"interop/{img.name}"

    def whole_read(engine, extra=(), tag=""):
        if img.big:
            res = qk.ok("read", *extra, "--sha256", img.path, engine=engine, timeout=600)
            T.check_eq(T.parse_sha256_output(res), ref_sha,
                       f"sha256 of the whole image (engine {engine} {' '.join(extra)})")
        else:
            out = os.path.join(tmp, f"{img.name}.{engine}{tag}.out")
            qk.ok("read", *extra, "--output", out, img.path, engine=engine)
            T.compare_files(out, ref)
            os.unlink(out)

    def sha_read(engine, extra=()):
        res = qk.ok("read", *extra, "--sha256", img.path, engine=engine, timeout=600)
        T.check_eq(T.parse_sha256_output(res), ref_sha,
                   f"sha256 of the whole image (engine {engine} {' '.join(extra)})")

    def range_read(off, ln, engine, i):
        out = os.path.join(tmp, f"{img.name}.range{i}.out")
        qk.ok("read", "-o", off, "-l", ln, "--output", out, img.path, engine=engine)
        with open(out, "rb") as f:
            got = f.read()
        os.unlink(out)
        want = T.read_range(ref, off, ln)
        T.check_eq(len(got), ln, f"bytes returned for -o {off} -l {ln}")
        dd = T.first_difference(got, want)
        if dd is not None:
            T.fail(f"-o {off} -l {ln}: differs at guest offset {off + dd}: got "
                   f"{got[dd:dd + 16].hex()} expected {want[dd:dd + 16].hex()}")

    def map_json():
        got = qk.json("map", "--output=json", img.path)
        # qemu-img's answer taken again right now: whether hole probing applies depends on the
        # host file's allocated size at the moment (see above), so compare like with like.
        qmap = q.map(img.path)
        T.check(isinstance(got, list), f"map JSON is not a list: {got!r:.200}")
        T.check_json_eq(T.strip_keys(got, {"offset", "compressed"}), T.strip_keys(qmap, {"offset"}),
                        "map --output=json (offset keys removed)")

    def info_json():
        got = qk.json("info", "--output=json", img.path)
        T.check(isinstance(got, dict), f"info JSON is not an object: {got!r:.200}")
        T.check_json_eq(pick_info(got, INFO_KEYS), pick_info(qinfo, INFO_KEYS), "info keys")
        T.check_json_eq(pick_snapshots(got), pick_snapshots(qinfo), "info snapshots")

    def info_chain():
        got = qk.json("info", "--output=json", "--backing-chain", img.path)
        T.check(isinstance(got, list), f"--backing-chain JSON is not a list: {got!r:.200}")
        keys = INFO_KEYS + ["filename"]
        T.check_json_eq([pick_info(x, keys) for x in got],
                        [pick_info(x, keys) for x in qchain], "info --backing-chain")

    # (a) whole-image reads: both engines; -t none (by digest) with alternating engines
    if img.light:
        R.defer(f"{pre}/read-{ENGINES[idx % 2]}", whole_read, ENGINES[idx % 2])
        R.defer(f"{pre}/read-sha256-t-none-{ENGINES[(idx + 1) % 2]}", sha_read,
                ENGINES[(idx + 1) % 2], ("-t", "none"))
    else:
        for engine in ENGINES:
            R.defer(f"{pre}/read-{engine}", whole_read, engine)
        R.defer(f"{pre}/read-sha256-t-none-{ENGINES[idx % 2]}", sha_read, ENGINES[idx % 2],
                ("-t", "none"))
    # sub-ranges at odd offsets (the tail of the image, plus the image's own)
    ranges = list(img.ranges) + [(ref_size - 17, 17)]
    if not img.light:
        ranges.append((12345, 54321))
    for i, (off, ln) in enumerate(ranges):
        off = max(0, min(off, ref_size - 1))
        ln = max(1, min(ln, ref_size - off))
        engine = ENGINES[(idx + i) % 2]
        R.defer(f"{pre}/read-range-{off}+{ln}-{engine}", range_read, off, ln, engine, i)
    # (b) map, (c) info
    R.defer(f"{pre}/map-json", map_json)
    R.defer(f"{pre}/info-json", info_json)
    if img.chain:
        R.defer(f"{pre}/info-backing-chain", info_chain)


def main():
    args = T.parse_args(__doc__)
    R = T.Runner(args, "test_interop")
    qk = T.Qcow2kit(args.qcow2kit)
    q = T.QemuTools()
    images = []
    for b in BUILDERS:
        d = os.path.join(R.tmp, b.__name__)
        os.makedirs(d)
        got = R.setup(b.__name__, b, q, d)
        if got:
            images += got
    print(f"# {len(images)} images built")
    sys.stdout.flush()
    if not qk.exists():
        with R.case("qcow2kit-binary-exists"):
            T.fail(f"{args.qcow2kit} does not exist or is not executable")
        R.finish()
    for idx, img in enumerate(images):
        if args.only and args.only not in f"interop/{img.name}/":
            continue
        R.setup(f"oracle/{img.name}", queue_image_cases, R, qk, q, img, idx)
    R.run_deferred()
    R.finish()


if __name__ == "__main__":
    main()
