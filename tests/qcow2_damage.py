#!/usr/bin/env python3
"""Damage a qcow2 image in named ways, for `qcow2kit check` tests (standard library only).

Every damage is a function ``fn(path, lay=None) -> Damage`` that edits the image in place
and returns what it did: a description and the guest ranges whose contents it may have
destroyed (every other guest cluster must read the same after a repair). A damage that does
not fit the image (no compressed cluster, no snapshot, refcount too narrow...) raises
``NotApplicable`` before touching the file.

Table entries are located from ``qcow2kit dump --all --output=json IMAGE`` when a qcow2kit
binary is given (or found at ../build/qcow2kit) and the dump works; otherwise from our own
parsing of the header and tables (qk_testlib's read_header / l1_entries / peek / poke).
Snapshot L1 tables, bitmap tables and refcount blocks are always read from the file (the
dump gives their offsets, not their contents).

CLI:  python3 tests/qcow2_damage.py --list
      python3 tests/qcow2_damage.py [--qcow2kit BIN] [--no-dump] KIND IMAGE
      python3 tests/qcow2_damage.py [--qcow2kit BIN] layout IMAGE     (print the layout)
"""

import dataclasses
import json
import os
import struct
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qk_testlib as T  # noqa: E402

L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
INCOMPAT_EXTL2 = 1 << 4

DEFAULT_QCOW2KIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "build", "qcow2kit")


class NotApplicable(Exception):
    """The image has nothing this damage could be applied to."""


@dataclasses.dataclass
class Damage:
    kind: str
    desc: str
    guest: list = dataclasses.field(default_factory=list)   # [(offset, length)] destroyed
    # A guest offset whose write lands on the damage (the overlap damages), else None.
    write_at: int = None


# --------------------------------------------------------------------------------------
# Layout: where the tables and their entries are
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class L2E:
    l1_index: int
    index: int
    guest: int        # guest offset of the cluster
    at: int           # file offset of the entry (descriptor word)
    entry: int
    bitmap: int       # extended L2 subcluster bitmap (0 otherwise)

    @property
    def compressed(self):
        return bool(self.entry & OFLAG_COMPRESSED)

    @property
    def host(self):
        return self.entry & T.L2_OFFSET_MASK


class Layout:
    """The active L1/L2 tree, the refcount table, snapshots and bitmaps of an image."""

    def __init__(self, path, source):
        self.path = path
        self.source = source      # "dump" or "parse"
        h = T.read_header(path)
        self.h = h
        self.cs = h["cluster_size"]
        self.cb = h["cluster_bits"]
        self.version = h["version"]
        self.extl2 = bool(h["incompatible_features"] & INCOMPAT_EXTL2)
        self.esize = 16 if self.extl2 else 8
        self.refcount_order = h["refcount_order"]
        self.rbits = 1 << self.refcount_order
        self.l1_offset = h["l1_table_offset"]
        self.l1_size = h["l1_size"]
        self.rt_offset = h["refcount_table_offset"]
        self.rt_clusters = h["refcount_table_clusters"]
        self.file_size = os.path.getsize(path)
        self.l1 = []          # [(index, at, entry)] non-zero entries
        self.l2 = []          # [L2E] non-zero entries of the active tables
        self.reftable = []    # [(index, at, entry)] non-zero entries
        self.snapshots = []   # [{"id", "name", "l1_offset", "l1_size", "at"}]
        self.bitmaps = []     # [{"name", "table_offset", "table_size"}]

    # ---- refcounts ----------------------------------------------------------------
    @property
    def rb_entries(self):
        return self.cs * 8 // self.rbits

    def refcount_max(self):
        return (1 << self.rbits) - 1

    def _refcount_slot(self, cluster):
        ti, bi = divmod(cluster, self.rb_entries)
        if ti >= self.rt_clusters * self.cs // 8:
            return None
        rt = T.peek(self.path, self.rt_offset + 8 * ti, ">Q") & REFT_OFFSET_MASK
        if not rt:
            return None
        return rt, bi

    def get_refcount(self, cluster):
        slot = self._refcount_slot(cluster)
        if slot is None:
            return 0
        blk, i = slot
        if self.rbits >= 8:
            fmt = {8: ">B", 16: ">H", 32: ">I", 64: ">Q"}[self.rbits]
            return T.peek(self.path, blk + i * (self.rbits // 8), fmt)
        per = 8 // self.rbits
        byte = T.peek(self.path, blk + i // per, ">B")
        return (byte >> (self.rbits * (i % per))) & ((1 << self.rbits) - 1)

    def set_refcount(self, cluster, value):
        if value > self.refcount_max():
            raise NotApplicable(f"refcount {value} does not fit in {self.rbits} bits")
        slot = self._refcount_slot(cluster)
        if slot is None:
            raise NotApplicable(f"cluster {cluster} has no refcount block")
        blk, i = slot
        if self.rbits >= 8:
            fmt = {8: ">B", 16: ">H", 32: ">I", 64: ">Q"}[self.rbits]
            T.poke(self.path, blk + i * (self.rbits // 8), fmt, value)
            return
        per = 8 // self.rbits
        at = blk + i // per
        shift = self.rbits * (i % per)
        mask = ((1 << self.rbits) - 1) << shift
        byte = T.peek(self.path, at, ">B")
        T.poke(self.path, at, ">B", (byte & ~mask) | (value << shift))

    # ---- selections -----------------------------------------------------------------
    def data_entries(self, kind="normal"):
        """Active L2 entries of a kind: normal (allocated data), zero-alloc, compressed."""
        out = []
        for e in self.l2:
            if e.compressed:
                if kind == "compressed":
                    out.append(e)
                continue
            if not e.host:
                continue
            if self.extl2:
                is_zero = not (e.bitmap & 0xFFFFFFFF) and bool(e.bitmap >> 32)
            else:
                is_zero = bool(e.entry & OFLAG_ZERO)
            if kind == ("zero-alloc" if is_zero else "normal"):
                out.append(e)
        return out

    def cluster_of(self, off):
        return off >> self.cb

    def meta_clusters(self):
        """Host clusters holding metadata (header, L1, L2, reftable, refblocks...)."""
        s = {0}
        for c in range(self.cluster_of(self.l1_offset),
                       self.cluster_of(self.l1_offset + 8 * max(1, self.l1_size) - 1) + 1):
            s.add(c)
        for _i, _at, e in self.l1:
            s.add(self.cluster_of(e & T.L1_OFFSET_MASK))
        for c in range(self.rt_clusters):
            s.add(self.cluster_of(self.rt_offset) + c)
        for _i, _at, e in self.reftable:
            s.add(self.cluster_of(e & REFT_OFFSET_MASK))
        return s

    def as_json(self):
        return {
            "cluster_size": self.cs, "extended_l2": self.extl2, "refcount_bits": self.rbits,
            "l1_offset": self.l1_offset, "l1_size": self.l1_size,
            "reftable_offset": self.rt_offset, "reftable_clusters": self.rt_clusters,
            "l1": [{"index": i, "at": at, "entry": hex(e)} for i, at, e in self.l1],
            "l2": [{"l1_index": e.l1_index, "index": e.index, "guest": e.guest, "at": e.at,
                    "entry": hex(e.entry), "bitmap": hex(e.bitmap)} for e in self.l2],
            "reftable": [{"index": i, "at": at, "entry": hex(e)} for i, at, e in self.reftable],
            "snapshots": self.snapshots, "bitmaps": self.bitmaps,
        }


def _read_u64s(path, off, n):
    raw = T.read_range(path, off, 8 * n)
    return list(struct.unpack(f">{len(raw) // 8}Q", raw))


def _l2_entries_of(lay, l1_index, l2_off, path):
    words = lay.esize // 8
    n = lay.cs // lay.esize
    raw = _read_u64s(path, l2_off, n * words)
    out = []
    for j in range(n):
        e = raw[j * words]
        bm = raw[j * words + 1] if words > 1 else 0
        if e or bm:
            guest = ((l1_index * n) + j) << lay.cb
            out.append(L2E(l1_index, j, guest, l2_off + j * lay.esize, e, bm))
    return out


def _parse_snapshots(lay):
    h = lay.h
    out = []
    off = h["snapshots_offset"]
    for _k in range(h["nb_snapshots"]):
        l1_off, l1_size, id_len, name_len = struct.unpack(">QIHH", T.read_range(lay.path, off, 16))
        extra = T.peek(lay.path, off + 36, ">I")
        p = off + 40 + extra
        sid = T.read_range(lay.path, p, id_len).decode()
        name = T.read_range(lay.path, p + id_len, name_len).decode()
        out.append({"id": sid, "name": name, "l1_offset": l1_off, "l1_size": l1_size,
                    "at": off})
        off = (p + id_len + name_len + 7) & ~7
    return out


def _parse_bitmaps(lay):
    ext = [x for x in T.read_extensions(lay.path) if x[0] == T.EXT_BITMAPS]
    if not ext:
        return []
    _t, data, _ln = ext[0]
    nb, _res, _dsize, doff = struct.unpack(">IIQQ", T.read_range(lay.path, data, 24))
    out = []
    off = doff
    for _k in range(nb):
        toff, tsize, _flags, _typ, _gb, name_len, extra = struct.unpack(
            ">QIIBBHI", T.read_range(lay.path, off, 24))
        name = T.read_range(lay.path, off + 24 + extra, name_len).decode()
        out.append({"name": name, "table_offset": toff, "table_size": tsize, "at": off})
        off = (off + 24 + extra + name_len + 7) & ~7
    return out


def parse_layout(path):
    """Our own parsing of the image (no qcow2kit)."""
    lay = Layout(path, "parse")
    for i, e in enumerate(T.l1_entries(path)):
        if e:
            lay.l1.append((i, lay.l1_offset + 8 * i, e))
    for i, _at, e in lay.l1:
        l2_off = e & T.L1_OFFSET_MASK
        if l2_off and l2_off + lay.cs <= lay.file_size:
            lay.l2 += _l2_entries_of(lay, i, l2_off, path)
    rt = _read_u64s(path, lay.rt_offset, lay.rt_clusters * lay.cs // 8)
    lay.reftable = [(i, lay.rt_offset + 8 * i, e) for i, e in enumerate(rt) if e]
    lay.snapshots = _parse_snapshots(lay)
    lay.bitmaps = _parse_bitmaps(lay)
    return lay


def dump_layout(path, qcow2kit):
    """The layout from `qcow2kit dump --all --output=json`; None if that does not work."""
    try:
        p = subprocess.run([qcow2kit, "dump", "--all", "--output=json", path],
                           capture_output=True, timeout=60)
        if p.returncode != 0:
            return None
        d = json.loads(p.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    lay = Layout(path, "dump")
    try:
        for x in d["l1"]["entries"]:
            v = int(x["entry"], 16)
            if v:
                lay.l1.append((x["index"], lay.l1_offset + 8 * x["index"], v))
        for t in d["l2"]:
            l2_off = t["offset"]
            for x in t["entries"]:
                e = int(x["entry"], 16)
                bm = int(x["bitmap"], 16) if "bitmap" in x else 0
                lay.l2.append(L2E(t["l1_index"], x["index"], x["guest_offset"],
                                  l2_off + x["index"] * lay.esize, e, bm))
        rc = d["refcounts"]
        for x in rc["table"]:
            v = int(x["entry"], 16)
            if v:
                lay.reftable.append((x["index"], lay.rt_offset + 8 * x["index"], v))
        # The dump gives the snapshot table and the bitmap directory decoded but not the
        # file offsets of their entries: those come from our own parse.
        own_snaps = _parse_snapshots(lay)
        for s, own in zip(d["snapshots"]["snapshots"], own_snaps):
            lay.snapshots.append({"id": s["id"], "name": s["name"],
                                  "l1_offset": s["l1_table_offset"], "l1_size": s["l1_size"],
                                  "at": own["at"]})
        own_bms = _parse_bitmaps(lay)
        for b, own in zip(d.get("bitmaps", {}).get("bitmaps", []), own_bms):
            lay.bitmaps.append({"name": b["name"], "table_offset": b["table_offset"],
                                "table_size": b["table_size"], "at": own["at"]})
    except (KeyError, TypeError, ValueError):
        return None
    if len(lay.snapshots) != lay.h["nb_snapshots"]:
        return None
    return lay


def layout(path, qcow2kit=None, use_dump=True):
    if use_dump:
        qcow2kit = qcow2kit or (DEFAULT_QCOW2KIT if os.access(DEFAULT_QCOW2KIT, os.X_OK)
                                else None)
        if qcow2kit:
            lay = dump_layout(path, qcow2kit)
            if lay is not None:
                return lay
    return parse_layout(path)


# --------------------------------------------------------------------------------------
# Helpers for the damages
# --------------------------------------------------------------------------------------

def _pick(entries, what, pred=lambda e: True):
    for e in entries:
        if pred(e):
            return e
    raise NotApplicable(f"no {what}")


def _data(lay, refcount=1):
    """The first normal data entry whose cluster has the given refcount and the COPIED
    flag as it should be."""
    return _pick(lay.data_entries("normal"), f"normal data cluster with refcount {refcount}",
                 lambda e: lay.get_refcount(lay.cluster_of(e.host)) == refcount
                 and not e.host & (lay.cs - 1))


def _set_l2(lay, e, value):
    T.poke(lay.path, e.at, ">Q", value)


def _guest(lay, e):
    return [(e.guest, lay.cs)]


def _l1_of(lay, pred=lambda i, e: True):
    for i, at, e in lay.l1:
        if pred(i, e):
            return i, at, e
    raise NotApplicable("no L1 entry")


# --------------------------------------------------------------------------------------
# The damages
# --------------------------------------------------------------------------------------

def leak(path, lay=None):
    """Zero the L2 entry of a data cluster, its refcount left at 1: one leaked cluster."""
    lay = lay or layout(path)
    e = _data(lay)
    _set_l2(lay, e, 0)
    if lay.extl2:
        T.poke(path, e.at + 8, ">Q", 0)
    return Damage("leak", f"L2 entry of guest {e.guest:#x} (host {e.host:#x}) zeroed",
                  _guest(lay, e))


def refcount_high(path, lay=None):
    """Refcount 2 under a COPIED data entry: a leak plus an OFLAG_COPIED error."""
    lay = lay or layout(path)
    e = _data(lay)
    if not e.entry & OFLAG_COPIED:
        raise NotApplicable("data entry without COPIED")
    lay.set_refcount(lay.cluster_of(e.host), 2)
    return Damage("refcount-high", f"refcount of host cluster {e.host:#x} set to 2")


def refcount_zero_data(path, lay=None):
    """Refcount 0 for a used data cluster: needs a rebuild."""
    lay = lay or layout(path)
    e = _data(lay)
    lay.set_refcount(lay.cluster_of(e.host), 0)
    return Damage("refcount-zero-data", f"refcount of data cluster {e.host:#x} set to 0")


def refcount_zero_l2(path, lay=None):
    """Refcount 0 for an L2 table."""
    lay = lay or layout(path)
    i, _at, e = _l1_of(lay, lambda i, e: lay.get_refcount(
        lay.cluster_of(e & T.L1_OFFSET_MASK)) == 1)
    l2 = e & T.L1_OFFSET_MASK
    lay.set_refcount(lay.cluster_of(l2), 0)
    return Damage("refcount-zero-l2", f"refcount of L2 table {l2:#x} (L1 index {i}) set to 0",
                  write_at=_unallocated_guest(lay))


def _unallocated_guest(lay):
    """A guest cluster without an entry in an existing active L2 table (a write there
    allocates a data cluster, and no L2 table): the first fit hands out the first free
    host cluster. None if there is none."""
    n = lay.cs // lay.esize
    used = {(e.l1_index, e.index) for e in lay.l2}
    for i, _at, e in lay.l1:
        if not e & T.L1_OFFSET_MASK:
            continue
        for j in range(n):
            guest = (i * n + j) << lay.cb
            if (i, j) not in used and guest + lay.cs <= lay.h["size"]:
                return guest
    return None


def refcount_zero_l1(path, lay=None):
    """Refcount 0 for the (first cluster of the) active L1 table: an allocating write may get
    it as a data cluster (write_at is such a write)."""
    lay = lay or layout(path)
    c = lay.cluster_of(lay.l1_offset)
    lay.set_refcount(c, 0)
    return Damage("refcount-zero-l1", f"refcount of the L1 table cluster {c << lay.cb:#x} "
                  "set to 0", write_at=_unallocated_guest(lay))


def refcount_zero_refblock(path, lay=None):
    """Refcount 0 for the first refcount block (it describes itself): an allocating write
    may get it as a data cluster (write_at is such a write)."""
    lay = lay or layout(path)
    _i, _at, e = _pick(lay.reftable, "refcount block")
    block = e & REFT_OFFSET_MASK
    lay.set_refcount(lay.cluster_of(block), 0)
    return Damage("refcount-zero-refblock", f"refcount of refcount block {block:#x} set to 0",
                  write_at=_unallocated_guest(lay))


def copied_cleared_l2(path, lay=None):
    """COPIED cleared on an L2 entry whose cluster has refcount 1."""
    lay = lay or layout(path)
    e = _pick(lay.data_entries("normal"), "COPIED data entry with refcount 1",
              lambda e: e.entry & OFLAG_COPIED and lay.get_refcount(lay.cluster_of(e.host)) == 1)
    _set_l2(lay, e, e.entry & ~OFLAG_COPIED)
    return Damage("copied-cleared-l2", f"COPIED cleared on the L2 entry of guest {e.guest:#x}")


def copied_cleared_l1(path, lay=None):
    """COPIED cleared on an L1 entry whose L2 table has refcount 1."""
    lay = lay or layout(path)
    i, at, e = _l1_of(lay, lambda i, e: e & OFLAG_COPIED and lay.get_refcount(
        lay.cluster_of(e & T.L1_OFFSET_MASK)) == 1)
    T.poke(path, at, ">Q", e & ~OFLAG_COPIED)
    return Damage("copied-cleared-l1", f"COPIED cleared on L1 entry {i}")


def copied_set_shared_l2(path, lay=None):
    """COPIED set on an L2 entry of a cluster shared with a snapshot (refcount 2)."""
    lay = lay or layout(path)
    e = _pick(lay.data_entries("normal"), "shared data cluster without COPIED",
              lambda e: not e.entry & OFLAG_COPIED and
              lay.get_refcount(lay.cluster_of(e.host)) >= 2)
    _set_l2(lay, e, e.entry | OFLAG_COPIED)
    return Damage("copied-set-shared-l2", f"COPIED set on shared guest cluster {e.guest:#x}")


def copied_set_shared_l1(path, lay=None):
    """COPIED set on an L1 entry whose L2 table is shared with a snapshot."""
    lay = lay or layout(path)
    i, at, e = _l1_of(lay, lambda i, e: not e & OFLAG_COPIED and lay.get_refcount(
        lay.cluster_of(e & T.L1_OFFSET_MASK)) >= 2)
    T.poke(path, at, ">Q", e | OFLAG_COPIED)
    return Damage("copied-set-shared-l1", f"COPIED set on shared L1 entry {i}")


def reserved_l1(path, lay=None):
    """Reserved bit 56 set in an L1 entry (qemu 7.2 cannot repair it)."""
    lay = lay or layout(path)
    i, at, e = _l1_of(lay)
    T.poke(path, at, ">Q", e | (1 << 56))
    return Damage("reserved-l1", f"reserved bit 56 set in L1 entry {i}")


def reserved_l2(path, lay=None):
    """Reserved bit 56 set in a data L2 entry (qemu 7.2 cannot repair it)."""
    lay = lay or layout(path)
    e = _data(lay)
    _set_l2(lay, e, e.entry | (1 << 56))
    return Damage("reserved-l2", f"reserved bit 56 set in the L2 entry of guest {e.guest:#x}",
                  _guest(lay, e))


def unaligned_data(path, lay=None):
    """A data cluster offset moved by half a cluster (qemu 7.2 cannot repair it)."""
    lay = lay or layout(path)
    if lay.cs <= 512:
        raise NotApplicable("512-byte clusters: every offset in an L2 entry is aligned")
    e = _data(lay)
    _set_l2(lay, e, e.entry + lay.cs // 2)
    return Damage("unaligned-data", f"data offset of guest {e.guest:#x} moved to "
                  f"{e.host + lay.cs // 2:#x}", _guest(lay, e))


def unaligned_zero_alloc(path, lay=None):
    """A preallocated (zero-alloc) entry's offset moved by half a cluster."""
    lay = lay or layout(path)
    if lay.cs <= 512:
        raise NotApplicable("512-byte clusters")
    e = _pick(lay.data_entries("zero-alloc"), "zero-alloc entry")
    _set_l2(lay, e, e.entry + lay.cs // 2)
    return Damage("unaligned-zero-alloc", f"zero-alloc offset of guest {e.guest:#x} moved "
                  f"to {e.host + lay.cs // 2:#x}", _guest(lay, e))  # qemu: EIO on read


def _redirect(lay, target, kind, what, pred=lambda e: True):
    e = _pick(lay.data_entries("normal"), "normal data cluster with refcount 1",
              lambda e: lay.get_refcount(lay.cluster_of(e.host)) == 1
              and not e.host & (lay.cs - 1) and pred(e))
    _set_l2(lay, e, (e.entry & ~T.L2_OFFSET_MASK) | target)
    return Damage(kind, f"L2 entry of guest {e.guest:#x} pointed at the {what} ({target:#x})",
                  _guest(lay, e), e.guest)


def l2_at_l1(path, lay=None):
    """A data L2 entry pointing at the cluster of the active L1 table."""
    lay = lay or layout(path)
    return _redirect(lay, lay.l1_offset & ~(lay.cs - 1), "l2-at-l1", "L1 table")


def l2_at_refblock(path, lay=None):
    """A data L2 entry pointing at the first refcount block."""
    lay = lay or layout(path)
    _i, _at, e = _pick(lay.reftable, "refcount block")
    return _redirect(lay, e & REFT_OFFSET_MASK, "l2-at-refblock", "refcount block")


def l2_at_reftable(path, lay=None):
    """A data L2 entry pointing at the refcount table."""
    lay = lay or layout(path)
    return _redirect(lay, lay.rt_offset, "l2-at-reftable", "refcount table")


def l2_at_l2(path, lay=None):
    """A data L2 entry pointing at another active L2 table (one of another L1 entry)."""
    lay = lay or layout(path)
    tables = {i: e & T.L1_OFFSET_MASK for i, _at, e in lay.l1 if e & T.L1_OFFSET_MASK}
    for e in lay.data_entries("normal"):
        other = next((off for i, off in tables.items() if i != e.l1_index), None)
        if other is not None and lay.get_refcount(lay.cluster_of(e.host)) == 1:
            return _redirect(lay, other, "l2-at-l2", "active L2 table",
                             lambda x: x.at == e.at)
    raise NotApplicable("no data cluster with refcount 1 beside a second L2 table")


def l2_at_snapshot_table(path, lay=None):
    """A data L2 entry pointing at the snapshot table."""
    lay = lay or layout(path)
    if not lay.h["nb_snapshots"]:
        raise NotApplicable("no snapshot table")
    target = lay.h["snapshots_offset"] & ~(lay.cs - 1)
    return _redirect(lay, target, "l2-at-snapshot-table", "snapshot table")


def l2_at_snapshot_l1(path, lay=None):
    """A data L2 entry pointing at the L1 table of a snapshot."""
    lay = lay or layout(path)
    s = _pick(lay.snapshots, "snapshot")
    target = s["l1_offset"] & ~(lay.cs - 1)
    return _redirect(lay, target, "l2-at-snapshot-l1", f"L1 table of snapshot {s['name']}")


def l1_at_reftable(path, lay=None):
    """An unused L1 entry pointing (with COPIED) at the refcount table: the refcount table
    is read as that L2 table, and an allocating write in its range must update an entry of
    it. write_at is a guest cluster whose "L2 entry" (refcount table slot) is zero, so the
    write allocates a data cluster and then writes the table back onto the refcount table."""
    lay = lay or layout(path)
    used = {i for i, _at, _e in lay.l1}
    n = lay.cs // lay.esize                 # entries per L2 table
    span = n << lay.cb                      # guest bytes per L1 entry
    size = lay.h["size"]
    i = next((k for k in range(lay.l1_size) if k not in used and (k + 1) * span <= size),
             None)
    if i is None:
        raise NotApplicable("no unused L1 entry with a whole L2 range inside the disk")
    words = _read_u64s(path, lay.rt_offset, n * lay.esize // 8)
    step = lay.esize // 8
    j = next((k for k in range(n - 1, -1, -1) if not any(words[k * step:(k + 1) * step])),
             None)
    if j is None:
        raise NotApplicable("refcount table full")
    T.poke(path, lay.l1_offset + 8 * i, ">Q", lay.rt_offset | OFLAG_COPIED)
    guest = i * span + (j << lay.cb)
    return Damage("l1-at-reftable", f"L1 entry {i} pointed at the refcount table "
                  f"({lay.rt_offset:#x}); guest {guest:#x} maps through its slot {j}",
                  [(i * span, span)], guest)


def l2_past_eof(path, lay=None):
    """A data L2 entry pointing 16 clusters past the end of the file."""
    lay = lay or layout(path)
    end = (lay.file_size + lay.cs - 1) // lay.cs * lay.cs
    return _redirect(lay, end + 16 * lay.cs, "l2-past-eof", "16 clusters past EOF")


def reftable_past_eof(path, lay=None):
    """A new refcount-table entry (the first unused one) pointing past the end of file."""
    lay = lay or layout(path)
    used = {i for i, _at, _e in lay.reftable}
    n = lay.rt_clusters * lay.cs // 8
    i = next((k for k in range(n) if k not in used), None)
    if i is None:
        raise NotApplicable("refcount table full")
    end = (lay.file_size + lay.cs - 1) // lay.cs * lay.cs
    target = end + 4 * lay.cs
    T.poke(path, lay.rt_offset + 8 * i, ">Q", target)
    return Damage("reftable-past-eof", f"refcount table entry {i} set to {target:#x} "
                  f"(file ends at {lay.file_size:#x})")


def reftable_reserved(path, lay=None):
    """Reserved bit 0 set in the first refcount-table entry."""
    lay = lay or layout(path)
    i, at, e = _pick(lay.reftable, "refcount table entry")
    T.poke(path, at, ">Q", e | 1)
    return Damage("reftable-reserved", f"reserved bit 0 set in refcount table entry {i}")


def refblock_shared(path, lay=None):
    """Two refcount-table entries pointing at one block: the first unused entry is made to
    point at the block of entry 0."""
    lay = lay or layout(path)
    i0, _at, e0 = _pick(lay.reftable, "refcount table entry")
    used = {i for i, _at, _e in lay.reftable}
    n = lay.rt_clusters * lay.cs // 8
    i = next((k for k in range(n) if k not in used), None)
    if i is None:
        raise NotApplicable("refcount table full")
    T.poke(path, lay.rt_offset + 8 * i, ">Q", e0)
    return Damage("refblock-shared", f"refcount table entry {i} points at the block of "
                  f"entry {i0} ({e0:#x})")


def copied_compressed(path, lay=None):
    """COPIED set on a compressed L2 entry (qemu 7.2 reports it but does not clear it)."""
    lay = lay or layout(path)
    e = _pick(lay.data_entries("compressed"), "compressed entry")
    _set_l2(lay, e, e.entry | OFLAG_COPIED)
    return Damage("copied-compressed", f"COPIED set on compressed guest cluster {e.guest:#x}")


def _snapshot_l1(lay):
    s = _pick(lay.snapshots, "snapshot")
    for i in range(s["l1_size"]):
        at = s["l1_offset"] + 8 * i
        v = T.peek(lay.path, at, ">Q")
        if v & T.L1_OFFSET_MASK:
            return s, i, at, v
    raise NotApplicable("snapshot without L2 tables")


def snapshot_l1_zeroed(path, lay=None):
    """A snapshot's L1 entry zeroed: its L2 table and the clusters only it uses leak, the
    shared ones have one reference fewer than their refcount."""
    lay = lay or layout(path)
    s, i, at, v = _snapshot_l1(lay)
    T.poke(path, at, ">Q", 0)
    return Damage("snapshot-l1-zeroed", f"L1 entry {i} of snapshot {s['name']} "
                  f"({v:#x}) zeroed")


def snapshot_l1_reserved(path, lay=None):
    """Reserved bit 1 set in a snapshot's L1 entry."""
    lay = lay or layout(path)
    s, i, at, v = _snapshot_l1(lay)
    T.poke(path, at, ">Q", v | 2)
    return Damage("snapshot-l1-reserved", f"reserved bit 1 set in L1 entry {i} of "
                  f"snapshot {s['name']}")


def snapshot_l1_unaligned(path, lay=None):
    """A snapshot table entry's L1 table offset moved off its cluster boundary."""
    lay = lay or layout(path)
    s = _pick(lay.snapshots, "snapshot")
    if lay.cs <= 512:
        raise NotApplicable("512-byte clusters")
    T.poke(path, s["at"], ">Q", s["l1_offset"] + 512)
    return Damage("snapshot-l1-unaligned", f"L1 offset of snapshot {s['name']} moved to "
                  f"{s['l1_offset'] + 512:#x}")


def bitmap_leak(path, lay=None):
    """A bitmap-table entry pointing at a data cluster of the bitmap zeroed: the bitmap data
    cluster leaks (the bitmap loses its dirty bits there)."""
    lay = lay or layout(path)
    for b in lay.bitmaps:
        for i in range(b["table_size"]):
            at = b["table_offset"] + 8 * i
            v = T.peek(path, at, ">Q")
            if v & BME_OFFSET_MASK:
                T.poke(path, at, ">Q", 0)
                return Damage("bitmap-leak", f"entry {i} of the table of bitmap {b['name']} "
                              f"({v:#x}) zeroed")
    raise NotApplicable("no bitmap data cluster")


def dirty_lazy(path, lay=None):
    """A writer with lazy refcounts killed after a flush (qemu-io `abort`): the image is
    left dirty with refcounts missing for the clusters it allocated."""
    lay = lay or layout(path)
    if not lay.h["compatible_features"] & 1:
        raise NotApplicable("no lazy refcounts")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 128k 64k",
                    "-c", "write -P 0x98 1M 64k", "-c", "flush", "-c", "abort", path],
                   capture_output=True, timeout=60)
    if not T.read_header(path)["incompatible_features"] & 1:
        T.fail("dirty-lazy: the image was not left dirty")
    return Damage("dirty-lazy", "qemu-io killed after writing 128k and 1M with lazy "
                  "refcounts", [(128 << 10, 64 << 10), (1 << 20, 64 << 10)])


def corrupt_bit(path, lay=None):
    """The corrupt bit set in the header of a consistent image (check is clean; a repair
    clears the bit)."""
    lay = lay or layout(path)
    if lay.version < 3:
        raise NotApplicable("v2 has no feature bits")
    T.set_header(path, incompatible_features=lay.h["incompatible_features"] | 2)
    return Damage("corrupt-bit", "corrupt bit set")


def extl2_alloc_and_zero(path, lay=None):
    """Extended L2: a data cluster's subclusters marked both allocated and zero."""
    lay = lay or layout(path)
    if not lay.extl2:
        raise NotApplicable("no extended L2 entries")
    e = _data(lay)
    T.poke(path, e.at + 8, ">Q", e.bitmap | ((e.bitmap & 0xFFFFFFFF) << 32))
    return Damage("extl2-alloc-and-zero", f"alloc bits of guest {e.guest:#x} copied to its "
                  "zero bits", _guest(lay, e))


def extl2_unalloc_bitmap(path, lay=None):
    """Extended L2: an unallocated cluster (descriptor 0) with allocation bits set."""
    lay = lay or layout(path)
    if not lay.extl2:
        raise NotApplicable("no extended L2 entries")
    _i, _at, l1e = _l1_of(lay)
    used = {e.index for e in lay.l2 if e.l1_index == _i}
    j = next(k for k in range(lay.cs // lay.esize) if k not in used)
    at = (l1e & T.L1_OFFSET_MASK) + j * lay.esize
    T.poke(path, at + 8, ">Q", 0x0000000F)
    guest = ((_i * (lay.cs // lay.esize)) + j) << lay.cb
    return Damage("extl2-unalloc-bitmap", f"unallocated guest {guest:#x} given allocation "
                  "bits 0-3", [(guest, lay.cs)])


DAMAGES = {
    "leak": leak,
    "refcount-high": refcount_high,
    "refcount-zero-data": refcount_zero_data,
    "refcount-zero-l2": refcount_zero_l2,
    "refcount-zero-l1": refcount_zero_l1,
    "refcount-zero-refblock": refcount_zero_refblock,
    "copied-cleared-l2": copied_cleared_l2,
    "copied-cleared-l1": copied_cleared_l1,
    "copied-set-shared-l2": copied_set_shared_l2,
    "copied-set-shared-l1": copied_set_shared_l1,
    "reserved-l1": reserved_l1,
    "reserved-l2": reserved_l2,
    "unaligned-data": unaligned_data,
    "unaligned-zero-alloc": unaligned_zero_alloc,
    "l2-at-l1": l2_at_l1,
    "l2-at-refblock": l2_at_refblock,
    "l2-at-reftable": l2_at_reftable,
    "l2-at-l2": l2_at_l2,
    "l2-at-snapshot-table": l2_at_snapshot_table,
    "l2-at-snapshot-l1": l2_at_snapshot_l1,
    "l1-at-reftable": l1_at_reftable,
    "l2-past-eof": l2_past_eof,
    "reftable-past-eof": reftable_past_eof,
    "reftable-reserved": reftable_reserved,
    "refblock-shared": refblock_shared,
    "copied-compressed": copied_compressed,
    "snapshot-l1-zeroed": snapshot_l1_zeroed,
    "snapshot-l1-reserved": snapshot_l1_reserved,
    "snapshot-l1-unaligned": snapshot_l1_unaligned,
    "bitmap-leak": bitmap_leak,
    "dirty-lazy": dirty_lazy,
    "corrupt-bit": corrupt_bit,
    "extl2-alloc-and-zero": extl2_alloc_and_zero,
    "extl2-unalloc-bitmap": extl2_unalloc_bitmap,
}


def damage(kind, path, qcow2kit=None, use_dump=True):
    return DAMAGES[kind](path, layout(path, qcow2kit, use_dump))


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Damage a qcow2 image in a named way.")
    p.add_argument("--list", action="store_true", help="list the damage kinds")
    p.add_argument("--qcow2kit", default=None, help="qcow2kit binary for `dump`")
    p.add_argument("--no-dump", action="store_true", help="parse the image ourselves")
    p.add_argument("kind", nargs="?")
    p.add_argument("image", nargs="?")
    a = p.parse_args(argv)
    if a.list:
        for k, fn in DAMAGES.items():
            print(f"{k:24} {fn.__doc__.splitlines()[0]}")
        return 0
    if not a.kind or not a.image:
        p.error("KIND and IMAGE are required (or --list)")
    if a.kind == "layout":
        lay = layout(a.image, a.qcow2kit, not a.no_dump)
        print(json.dumps({"source": lay.source, **lay.as_json()}, indent=1))
        return 0
    if a.kind not in DAMAGES:
        p.error(f"unknown damage {a.kind!r} (see --list)")
    try:
        d = damage(a.kind, a.image, a.qcow2kit, not a.no_dump)
    except NotApplicable as e:
        print(f"not applicable: {e}", file=sys.stderr)
        return 2
    print(d.desc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
