"""Interrupt-safe run state: the student, the optimizer, RNG states and the step, written atomically.

The estimator's generator (random and entropy_sample rules) needs no saving: it restarts from (seed, step)
every step, so a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def save_checkpoint(out: Path, step: int, student, optimizer, problem_rng: random.Random, config: dict) -> None:
    """Write out/checkpoint.pt through a temporary file, so a kill mid-write leaves the previous one intact."""
    state = {
        "step": step,
        "student": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "problem_rng": problem_rng.getstate(),
        "config": config,
    }
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)


def load_checkpoint(out: Path, student, optimizer, problem_rng: random.Random) -> int:
    """Restore the state saved in `out` and drop metric lines written after it; returns its step."""
    state = torch.load(out / CHECKPOINT, weights_only=False)
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    problem_rng.setstate(state["problem_rng"])
    truncate_metrics(out / METRICS, state["step"])
    return state["step"]


def truncate_metrics(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(out: Path) -> list[dict]:
    path = out / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
