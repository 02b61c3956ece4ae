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
      clang libclang-rt-14-dev
      qemu-system-x86 busybox-static cpio)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The guest kernel of the ublk tests (tests/qk_vm.py): Debian's 6.12, any revision.
have_kernel=""
compgen -G "/boot/vmlinuz-6.12.*-amd64" >/dev/null && have_kernel=1
[ ${#missing[@]} -eq 0 ] && [ -n "$have_kernel" ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
if [ -z "$have_kernel" ]; then
  kernel=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' |
           cut -d' ' -f1 | sort -V | tail -1)
  [ -n "$kernel" ] && missing+=("$kernel")
fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
