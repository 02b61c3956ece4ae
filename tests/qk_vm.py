"""A Linux guest for tests that need what this machine's kernel lacks (ublk).

Debian's 6.12 kernel (linux-image-6.12.*-amd64-unsigned, installed by scripts/install-deps.sh)
boots under qemu-system-x86_64 with TCG and an initramfs built here: busybox, the host
programs a test names with the libraries `ldd` lists, and the kernel modules it asks for
(with their dependencies, decompressed). /init mounts the usual file systems, loads the
modules and runs the test's shell script; the guest then powers off.

The script reports on the serial console with lines the host parses:

    QKVM PASS <name>            a check passed
    QKVM FAIL <name>: <why>     a check failed
    QKVM SIZE <disk> <bytes>    the size of what the guest wrote back to a disk (see below)

A guest that does not power off within its timeout is killed and fails the test.

Files travel on raw virtio disks, one per file, /dev/vda, /dev/vdb, ... in the order given:
the guest copies a disk into /tmp with `qkvm_in DISK PATH SIZE`, and back with
`qkvm_out PATH DISK`, which also prints the SIZE line; Guest.run() then cuts the host file
to that size. Each disk file is padded so the guest's copy can grow by `room` bytes.

    vm = Guest(programs=[qk.path, "fio"], modules=["ublk_drv"])
    res = vm.run(script, disks=[image_path], timeout=300)
    res.passed("ublk-add")   # raises a test failure unless the guest printed that PASS line
"""

import glob
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import qk_testlib as T

BUSYBOX = "/bin/busybox"

INIT = """#!/bin/busybox sh
# Busybox applets in a directory of their own, last in PATH. Its shell still runs an applet
# before a program of the same name (losetup, blkdiscard): scripts name those by full path.
/bin/busybox mkdir -p /bb && /bin/busybox --install -s /bb && /bin/busybox ln -sf busybox /bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/bb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=75% tmp /tmp
mkdir -p /dev/shm /run /var/lock && mount -t tmpfs shm /dev/shm
ulimit -n 4096
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m" || echo "QKVM FAIL insmod: $m"
done
qkvm_in() { head -c "$3" "/dev/$1" > "$2"; }
qkvm_out() { cat "$1" > "/dev/$2" && sync && echo "QKVM SIZE $2 $(stat -c %s "$1")"; }
pass() { echo "QKVM PASS $1"; }
fail() { echo "QKVM FAIL $1: $2"; }
echo "QKVM BOOTED $(uname -r)"
. /test.sh
echo "QKVM END"
sync
poweroff -f
"""


def kernel():
    """(vmlinuz path, modules dir) of the newest Debian 6.12 kernel installed, or None."""
    found = []
    for path in glob.glob("/boot/vmlinuz-6.12.*-amd64"):
        release = os.path.basename(path)[len("vmlinuz-"):]
        mods = f"/lib/modules/{release}"
        if os.path.isdir(mods):
            nums = tuple(int(x) for x in re.findall(r"\d+", release)[:3])
            found.append((nums, path, mods))
    if not found:
        return None
    _, path, mods = max(found)
    return path, mods


def unavailable():
    """Why a guest cannot be booted here ("" if it can)."""
    if kernel() is None:
        return "no /boot/vmlinuz-6.12.*-amd64 (linux-image-6.12.*-amd64-unsigned)"
    for tool in ("qemu-system-x86_64", "cpio"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} is missing (busybox-static)"
    return ""


def shared_libraries(program):
    """The libraries `ldd` lists for `program` (absolute paths, the loader included)."""
    res = subprocess.run(["ldd", program], capture_output=True, text=True)
    libs = []
    for line in res.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


class Result:
    def __init__(self, console, rc, timed_out):
        self.console = console
        self.rc = rc
        self.timed_out = timed_out
        self.passes = set(re.findall(r"QKVM PASS (\S+)", console))
        self.failures = re.findall(r"QKVM FAIL (.*)$", console, re.M)
        self.sizes = {d: int(n) for d, n in re.findall(r"^QKVM SIZE (\S+) (\d+)", console, re.M)}

    def tail(self, lines=60):
        return "\n".join(self.console.splitlines()[-lines:])

    def check(self):
        """Fails the test if the guest hung, did not reach the end of its script, or printed
        a FAIL line."""
        if self.timed_out:
            T.fail(f"the guest did not power off in time; console:\n{self.tail()}")
        if "QKVM END" not in self.console:
            T.fail(f"the guest did not reach the end of its script; console:\n{self.tail()}")
        if self.failures:
            T.fail("the guest reported:\n  " + "\n  ".join(self.failures) +
                   f"\nconsole:\n{self.tail()}")

    def passed(self, name):
        if name not in self.passes:
            T.fail(f"no 'QKVM PASS {name}' on the console:\n{self.tail()}")


class Guest:
    def __init__(self, programs=(), modules=(), memory_mb=2048, cpus=2):
        self.programs = [shutil.which(p) or p for p in programs]
        self.modules = list(modules)
        self.memory_mb = memory_mb
        self.cpus = cpus
        self._initramfs = None
        self._dir = tempfile.mkdtemp(prefix="qkvm-")

    def close(self):
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the initramfs ---------------------------------------------------------------

    def _module_order(self, mods_dir):
        """Module files (relative to mods_dir, as in modules.dep) in a loading order."""
        deps = {}
        with open(os.path.join(mods_dir, "modules.dep")) as f:
            for line in f:
                name, _, rest = line.partition(":")
                deps[name] = rest.split()
        by_base = {re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", os.path.basename(k)).replace("-", "_"): k
                   for k in deps}
        order = []

        def add(path):
            if path in order:
                return
            for d in deps.get(path, []):
                add(d)
            order.append(path)

        for m in self.modules:
            path = by_base.get(m.replace("-", "_"))
            if path is None:
                T.fail(f"kernel module {m} is not in {mods_dir}/modules.dep")
            add(path)
        return order

    def initramfs(self):
        if self._initramfs:
            return self._initramfs
        _, mods_dir = kernel()
        root = os.path.join(self._dir, "root")
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc",
                  "lib/modules"):
            os.makedirs(os.path.join(root, d), exist_ok=True)

        def copy(src, dst=None):
            dst = os.path.join(root, (dst or src).lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.realpath(src), dst)

        copy(BUSYBOX, "/bin/busybox")
        for lib in shared_libraries(BUSYBOX):
            copy(lib)
        for prog in self.programs:
            copy(prog, "/usr/bin/" + os.path.basename(prog))
            for lib in shared_libraries(prog):
                copy(lib)
        order = []
        for rel in self._module_order(mods_dir):
            src = os.path.join(mods_dir, rel)
            name = re.sub(r"\.(xz|zst|gz)$", "", os.path.basename(rel))
            with open(src, "rb") as f:
                data = f.read()
            if rel.endswith(".xz"):
                data = lzma.decompress(data)
            with open(os.path.join(root, "lib/modules", name), "wb") as f:
                f.write(data)
            order.append(name)
        with open(os.path.join(root, "modules.order"), "w") as f:
            f.write("\n".join(order) + "\n")
        with open(os.path.join(root, "init"), "w") as f:
            f.write(INIT)
        os.chmod(os.path.join(root, "init"), 0o755)
        with open(os.path.join(root, "etc/passwd"), "w") as f:
            f.write("root:x:0:0:root:/tmp:/bin/sh\n")
        self._initramfs = os.path.join(self._dir, "base.cpio")
        self._pack(root, self._initramfs)
        return self._initramfs

    @staticmethod
    def _pack(root, out, names=None):
        """A newc archive of `names` under `root` (all of it by default)."""
        if names is None:
            files = subprocess.run(["find", "."], cwd=root, capture_output=True,
                                   check=True).stdout
        else:
            files = ("\n".join(names) + "\n").encode()
        with open(out, "wb") as f:
            subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                           stdout=f, check=True)

    # ---- running ---------------------------------------------------------------------

    def run(self, script, disks=(), timeout=600, room=256 << 20):
        """Boots the guest with `script` as /test.sh and the files `disks` as /dev/vda...;
        returns a Result. Disk files are padded by `room` for the boot and cut afterwards to
        the size the guest reported for them (left as they were if it reported none)."""
        base = self.initramfs()
        # The script goes in a second archive appended to the first (the kernel unpacks
        # concatenated newc archives in order), so the base is built once per Guest.
        extra_root = tempfile.mkdtemp(dir=self._dir)
        # The sanitizers' settings of the host's run (make test sets them) apply inside too.
        env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(os.environ.items())
                      if k in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS"))
        with open(os.path.join(extra_root, "test.sh"), "w") as f:
            f.write(env + script)
        initrd = os.path.join(extra_root, "initrd.cpio")
        tail = os.path.join(extra_root, "tail.cpio")
        self._pack(extra_root, tail, ["test.sh"])
        with open(initrd, "wb") as out:
            for part in (base, tail):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        sizes = []
        for path in disks:
            size = os.path.getsize(path)
            sizes.append(size)
            os.truncate(path, (size + room + 511) // 512 * 512)
        vmlinuz, _ = kernel()
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-smp", str(self.cpus),
                "-m", str(self.memory_mb), "-kernel", vmlinuz, "-initrd", initrd,
                "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
                "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
                "-nodefaults"]
        for path in disks:
            argv += ["-drive", f"file={path},format=raw,if=virtio,cache=unsafe"]
        # TCG now and then crashes the kernel while it boots (an int3 left by code patching
        # on another vCPU: "Oops: int3" before init runs). A guest that died before /init
        # said "QKVM BOOTED" touched no disk and ran nothing of ours: boot it again.
        for attempt in range(3):
            res = T.run(argv, timeout=timeout)
            console = res.text.replace("\r", "")
            if "QKVM BOOTED" in console or "Kernel panic" not in console:
                break
            print(f"# the guest's kernel panicked while booting (attempt {attempt + 1}); "
                  "booting again", file=sys.stderr)
        result = Result(console, res.rc, res.timed_out)
        for i, path in enumerate(disks):
            name = "vd" + chr(ord("a") + i)
            os.truncate(path, result.sizes.get(name, sizes[i]))
        shutil.rmtree(extra_root, ignore_errors=True)
        return result
