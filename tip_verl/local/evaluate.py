"""Greedy accuracy on held-out problems, and teacher-forced batches of reference responses."""

from __future__ import annotations

import torch

from tip_verl.local.rollout import Rollout, response_mask_from, sample
from tip_verl.local.tasks import Problem, Task


@torch.no_grad()
def greedy_scores(model: torch.nn.Module, task: Task, problems: list[Problem], batch_size: int = 256) -> list[float]:
    """The task checker's score (1.0 / 0.0) of the greedy response to each of `problems`."""
    was_training = model.training
    model.eval()
    tokenizer, scores = task.tokenizer(), []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollout = sample(model, tokenizer, [task.prompt(p) for p in chunk], task.max_new_tokens, greedy=True)
        scores += [task.check(p, tokenizer.decode(r)) for p, r in zip(chunk, rollout.responses)]
    model.train(was_training)
    return scores


def greedy_accuracy(model: torch.nn.Module, task: Task, problems: list[Problem], batch_size: int = 256) -> float:
    """Share of `problems` whose greedy response the task's checker accepts."""
    return sum(greedy_scores(model, task, problems, batch_size)) / len(problems)


def evaluation(model: torch.nn.Module, task: Task, problems: list[Problem], prefix: str = "eval/") -> dict:
    """`<prefix>accuracy` on `problems`; for a task whose teacher (student) was taught a known mistake, also the
    accuracy on the problems it was taught wrong, `accuracy_teacher_wrong` (`accuracy_student_wrong`), and on
    the others, `accuracy_teacher_right` (`accuracy_student_right`)."""
    scores = greedy_scores(model, task, problems)
    metrics = {f"{prefix}accuracy": sum(scores) / len(scores)}
    for role in ("teacher", "student"):
        if task.taught(role) is None:
            continue
        wrong = [task.taught_wrong(role, p) for p in problems]
        for name, part in ((f"{role}_wrong", True), (f"{role}_right", False)):
            picked = [s for s, w in zip(scores, wrong) if w == part]
            metrics[f"{prefix}accuracy_{name}"] = sum(picked) / max(1, len(picked))
    return metrics


def reference_batch(task: Task, problems: list[Problem], role: str = "student") -> Rollout:
    """The responses (+ EOS) `role` is taught for `problems`, laid out like a rollout, for supervised training."""
    tokenizer, solution = task.tokenizer(), task.reference(role)
    prompt_ids, prompt_mask = tokenizer.encode_prompts([task.prompt(p) for p in problems])
    rows = [tokenizer.encode(solution(p)) + [tokenizer.eos_id] for p in problems]
    responses = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        responses[i, : len(row)] = torch.tensor(row)
    return Rollout(prompt_ids, prompt_mask, responses, response_mask_from(responses, tokenizer.eos_id))
