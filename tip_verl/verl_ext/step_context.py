"""Hands per-token tensors from the trainer's advantage step to the `tip_opd` estimator.

verl's `compute_advantage` passes an estimator a fixed set of fields; the trainer binds the rest
(old log-probs, teacher log-probs, entropy) here for the duration of one advantage step, and the estimator
leaves what it selected here for the trainer's `tip/` metrics.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from tip_verl.core.advantages import TipTokens
from tip_verl.core.answer_gate import AnswerRecord


@dataclass
class TipStep:
    """Inputs of one advantage step, each (batch, response_length), and the estimator's output.

    step_index: verl's 0-based training step, which seeds the random rules (see rng.selection_generator).
    teacher_correct: (batch,) bool, whether the checker accepts the teacher's own answer to each rollout's
        prompt, for teacher_trust=verified (the demo loop binds it; verl's trainer has no teacher answers).
    answer: (batch, response_length) bool, each response's tokens after algorithm.tip.answer_marker, for
        answer_teacher other than always (core.answer_gate.answer_span).
    answer_record: the run's record of the teacher on accepted answers, for answer_teacher=confirm_on_record
        (the trainer holds it across steps and checkpoints it).
    """

    step_index: Optional[int] = None
    old_log_probs: Optional[torch.Tensor] = None
    teacher_logprobs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    teacher_correct: Optional[torch.Tensor] = None
    answer: Optional[torch.Tensor] = None
    answer_record: Optional[AnswerRecord] = None
    tokens: Optional[TipTokens] = None


_CURRENT_STEP: ContextVar[Optional[TipStep]] = ContextVar("tip_verl_current_step", default=None)


@contextmanager
def tip_step(step: TipStep) -> Iterator[TipStep]:
    """Make `step` visible to `tip_opd` calls inside the block."""
    token = _CURRENT_STEP.set(step)
    try:
        yield step
    finally:
        _CURRENT_STEP.reset(token)


def current_step() -> Optional[TipStep]:
    """The step bound by the enclosing `tip_step` block, or None."""
    return _CURRENT_STEP.get()
