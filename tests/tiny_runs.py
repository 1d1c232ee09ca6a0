"""Runs of ``examples/run_tiny_cpu.sh`` (verl's own trainer in CPU mode) for the end-to-end tests."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "run_tiny_cpu.sh"
RUN_TIMEOUT_S = 900

# Log-probs of the same tokens under the same weights agree to float32 rounding (~1e-8);
# one Adam step at lr 1e-3 moves them by far more than this.
SYNCED_MAX_DIFF = 1e-5


def run_script(overrides, env: dict, log_path: Path, timeout_s: float = RUN_TIMEOUT_S, script: Path = SCRIPT) -> None:
    """Run the launch script `script` (``examples/run_tiny_cpu.sh``) with hydra ``overrides`` and exactly ``env``,
    its output in ``log_path``; fail the test, with the log's tail, on a timeout or a non-zero exit."""
    with open(log_path, "w") as log:
        # Own session, so a timeout stops the trainer and its Ray cluster too, not only bash.
        process = subprocess.Popen(
            ["bash", str(script), *overrides],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"{script.name} took over {timeout_s} s; log: {log_path}")
    if returncode != 0:
        pytest.fail(f"{script.name} exited {returncode}; log tail:\n{log_path.read_text()[-6000:]}")


def run_tiny(
    tiny_dir: Path, out_dir: Path, metrics_path: Path, *overrides: str, script_env: dict | None = None
) -> list[dict]:
    """Run the example script with hydra ``overrides``; return the per-step metrics verl's file logger wrote."""
    env = {
        **os.environ,
        **(script_env or {}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the script's python3 is ours
        "TINY_DIR": str(tiny_dir),
        "OUT_DIR": str(out_dir),
        "VERL_FILE_LOGGER_PATH": str(metrics_path),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    run_script(overrides, env, out_dir / f"{metrics_path.stem}.log")
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def by_step(records: list[dict]) -> dict[int, dict]:
    return {record["step"]: record["data"] for record in records}
