#!/usr/bin/env python3
"""Writes a valid qcow2 image with many allocated clusters scattered over the virtual disk and
mapped to host clusters in random order, without writing any guest data (the data clusters
are holes in a sparse file). For benchmarks of metadata walks (check, map, stats): building
such an image with real writes would take hours and the disk space of the data.

  python3 bench/make_scattered_image.py OUT --size 1T --cluster-size 65536 --clusters 1000000
"""
import argparse
import random
import struct

L1E_COPIED = 1 << 63


def parse_size(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower()
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--size", default="1T")
    ap.add_argument("--cluster-size", type=int, default=65536)
    ap.add_argument("--clusters", type=int, default=1000000, help="allocated data clusters")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    cs = a.cluster_size
    cb = cs.bit_length() - 1
    size = parse_size(a.size)
    guest_clusters = size // cs
    per_l2 = cs // 8
    l1_size = -(-guest_clusters // per_l2)
    rng = random.Random(a.seed)
    guest = rng.sample(range(guest_clusters), a.clusters)
    tables = sorted({g // per_l2 for g in guest})

    # Layout (in clusters): header, refcount table, L1 table, L2 tables, refcount blocks,
    # data. The refcount table and blocks must cover everything, themselves included.
    rc_per_block = cs * 8 // 16
    l1_clusters = -(-l1_size * 8 // cs)
    n_blocks = 1
    while True:
        rt_clusters = -(-n_blocks * 8 // cs)
        total = 1 + rt_clusters + l1_clusters + len(tables) + n_blocks + a.clusters
        need = -(-total // rc_per_block)
        if need <= n_blocks:
            break
        n_blocks = need
    rt_at = 1
    l1_at = rt_at + rt_clusters
    l2_at = l1_at + l1_clusters
    rb_at = l2_at + len(tables)
    data_at = rb_at + n_blocks
    total = data_at + a.clusters

    hosts = list(range(data_at, total))
    rng.shuffle(hosts)
    l2_of = {t: l2_at + i for i, t in enumerate(tables)}
    with open(a.out, "wb") as f:
        header = struct.pack(">IIQIIQIIQQIIQQQQII", 0x514649FB, 3, 0, 0, cb, size, 0, l1_size,
                             l1_at * cs, rt_at * cs, rt_clusters, 0, 0, 0, 0, 0, 4, 104)
        f.write(header.ljust(cs, b"\0"))
        rt = bytearray(rt_clusters * cs)
        for i in range(n_blocks):
            struct.pack_into(">Q", rt, i * 8, (rb_at + i) * cs)
        f.seek(rt_at * cs)
        f.write(rt)
        l1 = bytearray(l1_clusters * cs)
        for t in tables:
            struct.pack_into(">Q", l1, t * 8, L1E_COPIED | l2_of[t] * cs)
        f.seek(l1_at * cs)
        f.write(l1)
        l2 = {t: bytearray(cs) for t in tables}
        for g, h in zip(guest, hosts):
            struct.pack_into(">Q", l2[g // per_l2], (g % per_l2) * 8, L1E_COPIED | h * cs)
        for t in tables:
            f.seek(l2_of[t] * cs)
            f.write(l2[t])
        blocks = bytearray(n_blocks * cs)
        one = struct.pack(">H", 1)
        for c in range(total):
            blocks[c * 2:c * 2 + 2] = one
        f.seek(rb_at * cs)
        f.write(blocks)
        f.truncate(total * cs)
    print(f"{a.out}: {size} bytes virtual, {cs}-byte clusters, {a.clusters} data clusters, "
          f"{len(tables)} L2 tables, {n_blocks} refcount blocks, file {total * cs} bytes")


if __name__ == "__main__":
    main()
