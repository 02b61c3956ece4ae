#!/usr/bin/env bash
# A first look at qcow2kit: make a sample image with QEMU's tools, show what qcow2kit
# sees in it, and check that it reads the same bytes as qemu-img.
#
#   scripts/demo.sh build/qcow2kit
set -euo pipefail

QK=${1:?usage: $0 /path/to/qcow2kit}
QK=$(realpath "$QK")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

step() { printf '\n== %s\n' "$*"; }

step "Making sample.qcow2 (64 MiB) with qemu-img and qemu-io"
qemu-img create -q -f qcow2 sample.qcow2 64M
qemu-io -f qcow2 \
    -c 'write -P 0xaa 0 1M' \
    -c 'write -P 0x55 10M 300k' \
    -c 'write -z 20M 2M' \
    -c 'write -c -P 0x11 40M 256k' \
    -c 'write -P 0x77 63M 100k' \
    sample.qcow2 >/dev/null
echo "  data at 0 and 10M, zeros at 20M, compressed clusters at 40M, data near the end"

step "qcow2kit info sample.qcow2"
"$QK" info sample.qcow2

step "qcow2kit map --output=json sample.qcow2"
"$QK" map --output=json sample.qcow2

step "Reading the whole image: qcow2kit vs qemu-img"
ours=$("$QK" read --sha256 sample.qcow2 | awk '{print $1}')
qemu-img convert -O raw sample.qcow2 sample.raw
theirs=$(sha256sum sample.raw | awk '{print $1}')
echo "  qcow2kit read --sha256:            $ours"
echo "  sha256 of qemu-img convert -O raw: $theirs"
if [[ "$ours" == "$theirs" ]]; then
    echo "OK: qcow2kit reads exactly what qemu-img reads"
else
    echo "MISMATCH: qcow2kit and qemu-img read different bytes"
    exit 1
fi
