#!/usr/bin/env bash
# Installs everything qcow2kit needs to build and test on Debian 12. Idempotent and quiet:
# packages already present are not reinstalled and apt's index is refreshed only when needed.
set -euo pipefail
PKGS=(build-essential cmake ninja-build pkg-config
      liburing-dev zlib1g-dev libdeflate-dev libzstd-dev
      libfmt-dev nlohmann-json3-dev libcli11-dev libgnutls28-dev
      libgtest-dev libgmock-dev libbenchmark-dev
      qemu-utils python3 util-linux
      libnbd-bin nbdkit fio gnutls-bin fuse3 e2fsprogs
      clang libclang-rt-14-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
