"""Shared by the memory benchmarks: each measurement in a fresh Python process, and its peak RSS.

A benchmark script runs itself with `--worker <spec as JSON>`; the worker prints one JSON line, its result.
Pure standard library, so it runs wherever the benchmarks do (a GPU box with torch only, too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def rss_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB: VmRSS (now) or VmHWM (peak since start or the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_worker(script: str, spec: dict, threads: int) -> dict:
    """Run `script --worker <spec>` in a fresh process with `threads` OpenMP threads; its last stdout line, parsed.

    Small allocations go through mmap (MALLOC_MMAP_THRESHOLD_), so freed buffers leave the RSS and peaks of
    consecutive phases do not hide each other.
    """
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    env["OMP_NUM_THREADS"] = str(threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)],
        env=env, capture_output=True, text=True,
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"worker failed for {spec}: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])
