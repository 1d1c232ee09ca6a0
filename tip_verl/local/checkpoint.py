"""Interrupt-safe run state: the student, the optimizer, RNG states and the step, written atomically, and the
metrics log, which a resume cuts back to the checkpoint's step even when a kill left half a line at its end.

The estimator's generator (random and entropy_sample rules) needs no saving: it restarts from (seed, step)
every step, so a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from typing import Optional

import torch

from tip_verl.core.answer_gate import AnswerRecord

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def save_checkpoint(
    out: Path, step: int, student, optimizer, problem_rng: random.Random, config: dict,
    answer_record: Optional[AnswerRecord] = None,
) -> None:
    """Write out/checkpoint.pt through a temporary file, so a kill mid-write leaves the previous one intact.
    `answer_record`: the teacher's record on accepted answers (answer_teacher=confirm_on_record)."""
    state = {
        "step": step,
        "student": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "problem_rng": problem_rng.getstate(),
        "config": config,
        "answer_record": (answer_record or AnswerRecord()).state_dict(),
    }
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)


def load_checkpoint(
    out: Path, student, optimizer, problem_rng: random.Random, answer_record: Optional[AnswerRecord] = None
) -> int:
    """Restore the state saved in `out` (into `answer_record` too, when given) and drop metric lines written after
    it; returns its step."""
    state = torch.load(out / CHECKPOINT, weights_only=False)
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    problem_rng.setstate(state["problem_rng"])
    if answer_record is not None and "answer_record" in state:
        answer_record.load_state_dict(state["answer_record"])
    truncate_metrics(out / METRICS, state["step"])
    return state["step"]


def checkpoint_step(out: Path) -> int:
    """The step of the checkpoint saved in `out`, 0 when there is none (a resume then starts over)."""
    path = out / CHECKPOINT
    if not path.exists():
        return 0
    return torch.load(path, weights_only=False, mmap=True)["step"]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the records after `last_step`, rewriting through a temporary file, so a kill mid-write keeps the
    previous file; an unreadable last line (a kill while it was written) is dropped too, with a warning."""
    if not path.exists():
        return
    kept = [record for record in _parse_metrics(path) if record["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
    os.replace(tmp, path)


def read_metrics(out: Path) -> list[dict]:
    """The records of out/metrics.jsonl ([] when there is none), without an unreadable last line."""
    path = out / METRICS
    return _parse_metrics(path) if path.exists() else []


def _parse_metrics(path: Path) -> list[dict]:
    """One record per JSON line. A kill while a line is written leaves half of it: an unreadable LAST line is
    skipped with a warning; an unreadable line before it means the file is damaged, and raises."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(
                    f"{path}: line {number} of {len(lines)} is not JSON ({error}); only the last line can be cut "
                    "short by a kill. Remove the damaged lines, or start over without --resume."
                ) from error
            warnings.warn(f"{path}: the last line is incomplete (the run was killed while writing it); skipped.",
                          stacklevel=3)
    return records
