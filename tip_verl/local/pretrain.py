"""Supervised training on reference responses: the teacher to high accuracy, the student to a weak start.

Both are deterministic from a seed. The student's warm start stops at the first evaluation that reaches
`target_accuracy`, so it starts the on-policy phase weak but not hopeless (rollouts with reward exist).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tip_verl.local.evaluate import greedy_accuracy, reference_batch
from tip_verl.local.models import ModelSize, build_model
from tip_verl.local.rollout import logprobs_and_entropy
from tip_verl.local.tasks import Task


@dataclass(frozen=True)
class SftPlan:
    """max_steps of AdamW at lr (linear warm-up over 50 steps, cosine decay to 0 at max_steps), batch_size
    problems per step; evaluate
    every eval_every steps on eval_size held-out problems; stop when accuracy >= stop_at (None: never)."""

    max_steps: int
    lr: float
    batch_size: int
    eval_every: int
    eval_size: int
    stop_at: Optional[float]


TEACHER_PLAN = SftPlan(max_steps=1000, lr=2e-3, batch_size=64, eval_every=100, eval_size=256, stop_at=0.985)
STUDENT_PLAN = SftPlan(max_steps=3000, lr=1e-3, batch_size=32, eval_every=25, eval_size=256, stop_at=0.15)


def lr_factor(step: int, max_steps: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, max_steps - warmup)))


def supervised_train(
    task: Task,
    size: ModelSize,
    plan: SftPlan,
    seed: int,
    max_positions: int,
    log: Callable[[str], None] = print,
) -> tuple[torch.nn.Module, dict]:
    """Train a fresh model of `size` on the task's reference responses; returns it and a card of the run."""
    model = build_model(size, task.tokenizer(), max_positions, seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan.max_steps))
    rng = random.Random(seed)
    eval_problems = task.heldout(plan.eval_size, seed=seed + 999)
    start, accuracy, step = time.time(), 0.0, 0
    for step in range(1, plan.max_steps + 1):
        batch = reference_batch(task, [task.sample(rng) for _ in range(plan.batch_size)])
        logp, _ = logprobs_and_entropy(model, batch)
        loss = -(logp * batch.response_mask).sum() / batch.response_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % plan.eval_every == 0:
            accuracy = greedy_accuracy(model, task, eval_problems)
            log(f"  sft step {step}: loss {loss.item():.4f}, held-out accuracy {accuracy:.3f}")
            if plan.stop_at is not None and accuracy >= plan.stop_at:
                break
    model.eval()
    return model, {"sft_steps": step, "sft_seconds": round(time.time() - start, 1), "sft_accuracy": accuracy}
