#!/usr/bin/env python3
"""Runs every fuzz target of a fuzz build for a fixed time on a fresh seed corpus.

  python3 fuzz/run.py --build build-fuzz --qcow2kit build/qcow2kit --seconds 10

Each target starts from the seeds fuzz/make_corpus.py generates plus what earlier runs of
this build found (BUILD/corpus-work/TARGET), with a fixed seed. A crash, a leak, a timeout
(an input running over 10 s) or running out of memory (2 GiB) fails the target; the input is
saved as BUILD/artifacts/TARGET-*. Prints one line per target and `N passed, N failed`.
"""

import argparse
import glob
import os
import re
import subprocess
import sys

MAX_LEN = {"fuzz_header": 4096, "fuzz_nbd": 65536}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", required=True)
    p.add_argument("--qcow2kit", required=True)
    p.add_argument("--seconds", type=int, default=10)
    a = p.parse_args()
    build = os.path.abspath(a.build)
    seeds = os.path.join(build, "corpus")
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, os.path.join(here, "make_corpus.py"), "--qcow2kit",
                    a.qcow2kit, "--out", seeds], check=True)
    artifacts = os.path.join(build, "artifacts")
    os.makedirs(artifacts, exist_ok=True)
    passed = failed = 0
    for target in sorted(glob.glob(os.path.join(build, "fuzz_*"))):
        if not os.access(target, os.X_OK) or os.path.isdir(target):
            continue
        name = os.path.basename(target)
        kind = name[len("fuzz_"):]
        work = os.path.join(build, "corpus-work", name)
        os.makedirs(work, exist_ok=True)
        argv = [target, work, os.path.join(seeds, kind), f"-max_total_time={a.seconds}",
                "-seed=1", "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
                f"-max_len={MAX_LEN.get(name, 262144)}",
                f"-artifact_prefix={os.path.join(artifacts, name)}-"]
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
                   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env, errors="replace")
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", res.stdout)
        runs = runs[-1] if runs else "?"
        if res.returncode == 0:
            passed += 1
            print(f"{name}: {runs} executions, 0 crashes ({a.seconds} s)")
        else:
            failed += 1
            print(f"{name}: FAILED (exit {res.returncode}) after {runs} executions")
            print("\n".join(res.stdout.splitlines()[-60:]))
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed or passed == 0 else 0)


if __name__ == "__main__":
    main()
