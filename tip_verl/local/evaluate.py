"""Greedy accuracy on held-out problems, and teacher-forced batches of reference responses."""

from __future__ import annotations

import torch

from tip_verl.local.rollout import Rollout, response_mask_from, sample
from tip_verl.local.tasks import Problem, Task


@torch.no_grad()
def greedy_accuracy(model: torch.nn.Module, task: Task, problems: list[Problem], batch_size: int = 256) -> float:
    """Share of `problems` whose greedy response the task's checker accepts."""
    was_training = model.training
    model.eval()
    tokenizer, correct = task.tokenizer(), 0.0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollout = sample(model, tokenizer, [task.prompt(p) for p in chunk], task.max_new_tokens, greedy=True)
        correct += sum(task.check(p, tokenizer.decode(r)) for p, r in zip(chunk, rollout.responses))
    model.train(was_training)
    return correct / len(problems)


def reference_batch(task: Task, problems: list[Problem]) -> Rollout:
    """The reference responses (+ EOS) of `problems` laid out like a rollout, for supervised training."""
    tokenizer = task.tokenizer()
    prompt_ids, prompt_mask = tokenizer.encode_prompts([task.prompt(p) for p in problems])
    rows = [tokenizer.encode(task.solution(p)) + [tokenizer.eos_id] for p in problems]
    responses = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        responses[i, : len(row)] = torch.tensor(row)
    return Rollout(prompt_ids, prompt_mask, responses, response_mask_from(responses, tokenizer.eos_id))
