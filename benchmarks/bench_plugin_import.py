"""What tip-verl's `verl.plugins` entry point adds to `import verl`, the import every verl process runs.

Each run is a fresh Python process timing `import verl` (wall clock, and the process's CPU time, which a
loaded machine inflates less) and reporting its peak RSS. Four ways, interleaved so that machine load
hits them alike, median of --runs:

  without plugin   VERL_USE_EXTERNAL_PLUGINS=none: verl alone
  with plugin      the installed entry point (registration deferred until verl imports its registries)
  plugin module    VERL_USE_EXTERNAL_PLUGINS=none, then our entry-point module imported: its own cost, timed
                   inside the process, free of the noise between processes
  eager            VERL_USE_EXTERNAL_PLUGINS=none, then our estimator, losses and trainer modules imported
                   right away: what the entry point cost when it registered everything on import

    python benchmarks/bench_plugin_import.py --runs 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MEASURE = """
import json, resource, sys, time
started, cpu_started = time.perf_counter(), time.process_time()
import verl
verl_done = time.perf_counter()
for module in sys.argv[1:]:
    __import__(module)
seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "rss_mb": rss_mb,
                  "ours_ms": 1000 * (time.perf_counter() - verl_done)}))
"""
EAGER_MODULES = ["tip_verl.verl_ext.plugin", "tip_verl.verl_ext.estimator", "tip_verl.verl_ext.losses",
                 "tip_verl.verl_ext.trainer"]
WAYS = {  # name: (VERL_USE_EXTERNAL_PLUGINS, modules imported after verl)
    "without plugin": ("none", []),
    "with plugin": ("auto", []),
    "plugin module after verl": ("none", ["tip_verl.verl_ext.plugin"]),
    "eager": ("none", EAGER_MODULES),
}


def measure_once(plugins: str, modules: list[str]) -> dict[str, float]:
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": plugins, "VERL_LOGGING_LEVEL": "ERROR"}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", MEASURE, *modules], capture_output=True,
                            text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per way (default: %(default)s)")
    args = parser.parse_args()
    samples = {name: [] for name in WAYS}
    for _ in range(args.runs):
        for name, (plugins, modules) in WAYS.items():
            samples[name].append(measure_once(plugins, modules))
    median = {
        name: {key: statistics.median(run[key] for run in runs) for key in ("seconds", "cpu_seconds", "rss_mb", "ours_ms")}
        for name, runs in samples.items()
    }
    base = median["without plugin"]
    print(f"`import verl`, median of {args.runs} fresh processes\n")
    print("| way | wall s | added wall s | CPU s | added CPU s | peak RSS MB | added MB | our modules ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, figures in median.items():
        added = {key: figures[key] - base[key] for key in figures}
        print(f"| {name} | {figures['seconds']:.2f} | {added['seconds']:+.2f} | {figures['cpu_seconds']:.2f} "
              f"| {added['cpu_seconds']:+.2f} | {figures['rss_mb']:.0f} | {added['rss_mb']:+.0f} | {figures['ours_ms']:.1f} |")


if __name__ == "__main__":
    main()
