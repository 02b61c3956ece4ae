#!/usr/bin/env python3
"""Seed corpora for the fuzz targets, generated (never committed as binaries).

  python3 fuzz/make_corpus.py --qcow2kit build/qcow2kit --out build-fuzz/corpus

image/ and repair/: small images made by qemu-img and qemu-io across the option matrix
(versions, cluster sizes, refcount widths, extended L2, lazy refcounts, compressed clusters,
snapshots, bitmaps, preallocation). header/: their first 4 KiB. nbd/: the bytes real clients
(nbdinfo, qemu-io, qemu-img) send to `qcow2kit serve`, recorded through a relaying socket.
"""

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

OPTIONS = [
    "cluster_size=4096",
    "compat=0.10,cluster_size=4096",
    "cluster_size=512",
    "cluster_size=512,refcount_bits=1",
    "cluster_size=4096,refcount_bits=64",
    "cluster_size=4096,refcount_bits=4",
    "cluster_size=16384,extended_l2=on",
    "cluster_size=4096,lazy_refcounts=on",
    "cluster_size=4096,preallocation=metadata",
    "cluster_size=4096,compression_type=zstd",
]


def sh(*argv, cwd=None):
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def make_images(work):
    images = []
    for i, opts in enumerate(OPTIONS):
        path = os.path.join(work, f"img{i}.qcow2")
        size = "256k" if "preallocation" in opts else "1M"  # small inputs fuzz faster
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, size)
        sh("qemu-io", "-c", "write -P 0x11 0 12k", "-c", "write -P 0x22 100k 4k",
           "-c", "write -z 200k 8k", path)
        images.append(path)
    # Compressed clusters, an internal snapshot, a persistent bitmap.
    raw = os.path.join(work, "data.raw")
    with open(raw, "wb") as f:
        f.write(bytes(range(256)) * 64 + b"x" * 16384)
    comp = os.path.join(work, "compressed.qcow2")
    sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", "-f", "raw",
       raw, comp)
    images.append(comp)
    snap = os.path.join(work, "snapshot.qcow2")
    shutil.copyfile(images[0], snap)
    sh("qemu-img", "snapshot", "-c", "s1", snap)
    sh("qemu-io", "-c", "write -P 0x33 4k 4k", snap)
    images.append(snap)
    bitmap = os.path.join(work, "bitmap.qcow2")
    shutil.copyfile(images[0], bitmap)
    sh("qemu-img", "bitmap", "--add", bitmap, "b0")
    images.append(bitmap)
    return images


def record_nbd(qcow2kit, work, out):
    """Runs clients against `qcow2kit serve` through a relay that saves what they send."""
    image = os.path.join(work, "nbd.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "4M")
    sock = os.path.join(work, "server.sock")
    relay = os.path.join(work, "relay.sock")
    server = subprocess.Popen([qcow2kit, "serve", "-t", "-k", sock, "--discard=unmap", image],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(relay)
    listener.listen(4)
    recordings = []

    def pump(src, dst, log):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if log is not None:
                log.append(data)
            try:
                dst.sendall(data)
            except OSError:
                return

    def serve_relay():
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(sock)
            log = []
            recordings.append(log)
            threading.Thread(target=pump, args=(client, upstream, log), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, None), daemon=True).start()

    threading.Thread(target=serve_relay, daemon=True).start()
    uri = f"nbd+unix:///?socket={relay}"
    clients = [
        ["nbdinfo", "--json", uri],
        ["nbdinfo", "--map", uri],
        ["nbdinfo", "--map=qemu:allocation-depth", uri],
        ["nbdinfo", "--list", uri],
        ["qemu-io", "-f", "raw", "-c", "write -P 1 4k 8k", "-c", "read -P 1 4k 8k",
         "-c", "flush", "-c", "discard 64k 64k", "-c", "write -z 128k 64k",
         "-c", "read 0 256k", uri],
        ["qemu-img", "map", "-f", "raw", "--output=json", uri],
    ]
    for argv in clients:
        try:
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=30)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            pass
    time.sleep(0.2)
    listener.close()
    server.terminate()
    server.wait(timeout=30)
    for i, log in enumerate(recordings):
        with open(os.path.join(out, f"session{i}"), "wb") as f:
            f.write(b"".join(log))
    return len(recordings)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qcow2kit", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    for sub in ("image", "repair", "header", "nbd"):
        os.makedirs(os.path.join(a.out, sub), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qcow2kit-corpus-") as work:
        images = make_images(work)
        for path in images:
            name = os.path.basename(path)
            for sub in ("image", "repair"):
                shutil.copyfile(path, os.path.join(a.out, sub, name))
            with open(path, "rb") as f, open(os.path.join(a.out, "header", name), "wb") as h:
                h.write(f.read(4096))
        sessions = record_nbd(os.path.abspath(a.qcow2kit), work, os.path.join(a.out, "nbd"))
    print(f"corpus: {len(images)} images, {sessions} NBD sessions in {a.out}")


if __name__ == "__main__":
    main()
