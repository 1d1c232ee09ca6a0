"""Supervised training on reference responses: the teacher to high accuracy, the student to a weak start.

Both are deterministic from a seed. The student's warm start stops at the first evaluation that reaches
its plan's `stop_at`, so it starts the on-policy phase weak but not hopeless (rollouts with reward exist).
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import torch

from tip_verl.local.evaluate import greedy_accuracy, reference_batch
from tip_verl.local.models import build_model
from tip_verl.local.plans import ModelSize, SftPlan
from tip_verl.local.rollout import logprobs_and_entropy
from tip_verl.local.tasks import Task


def lr_factor(step: int, max_steps: int, warmup: int) -> float:
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
    role: str = "student",
) -> tuple[torch.nn.Module, dict]:
    """Train a fresh model of `size` on the responses the task teaches `role`; returns it and a card of the run."""
    model = build_model(size, task.tokenizer(), max_positions, seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan.max_steps, plan.warmup))
    rng = random.Random(seed)
    eval_problems = task.heldout(plan.eval_size, seed=seed + 999)
    start, accuracy, step = time.time(), 0.0, 0
    for step in range(1, plan.max_steps + 1):
        problems = [task.sample(rng, easy=plan.easy_share > 0 and rng.random() < plan.easy_share)
                    for _ in range(plan.batch_size)]
        batch = reference_batch(task, problems, role)
        logp, _ = logprobs_and_entropy(model, batch)
        loss = -(logp * batch.response_mask).sum() / batch.response_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % plan.eval_every == 0 or step == plan.max_steps:
            accuracy = greedy_accuracy(model, task, eval_problems)
            log(f"  sft step {step}: loss {loss.item():.4f}, held-out accuracy {accuracy:.3f}")
            if plan.stop_at is not None and accuracy >= plan.stop_at:
                break
    model.eval()
    return model, {"sft_steps": step, "sft_seconds": round(time.time() - start, 1), "sft_accuracy": accuracy}
