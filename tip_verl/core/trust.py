"""Checker-verified teacher: where the outcome checker contradicts the teacher, the group keeps GRPO alone.

TIP hands the teacher the tokens where student and teacher disagree most, so a teacher's systematic mistake
is exactly what it distils. The checker knows what the teacher does not. Within one prompt's group of
rollouts two kinds of evidence say the teacher is wrong on that prompt:

  endorsed_wrong   a rollout the checker rejects although the teacher endorses it: every one of its tokens
                   has teacher probability >= endorse_prob, so it is the teacher's own path, and that path
                   fails the checker.
  prefers_wrong    the group holds correct and wrong rollouts and the teacher's log-likelihood of its
                   responses, sum_t log pT(y_t), is lower on average for the correct ones than for the
                   wrong ones: the teacher prefers the answers the checker rejects.

A third, direct kind needs the teacher to answer the prompt itself (`teacher_trust=verified`):

  teacher_fails    the checker rejects the teacher's own (greedy) answer to the prompt.

The first two need the student to have produced the evidence (a correct rollout, or the teacher's own path);
on a prompt where every rollout is wrong in its own way they cannot fire, and the teacher pulls the student
towards its answer there whether that answer is right or not. The third costs one teacher generation per prompt
and fires from the first step.

Every rollout of such a group is `distrusted`: it gets no teacher signal, and the outcome (GRPO) advantage
on all of its tokens instead (advantage route), or the policy loss instead of the divergence (loss route).
Where the teacher is right neither can fire on a teacher that writes correct answers (its own path passes
the checker, and it prefers the correct rollouts), so the hybrid is TIP unchanged there.

Shapes: B rollouts, T response positions. No verl import here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

@dataclass
class TeacherTrust:
    """Per-rollout verdicts of one batch, all (B,) bool."""

    correct: torch.Tensor
    endorsed: torch.Tensor  # the teacher would write every token: min_t pT(y_t) >= endorse_prob
    distrusted: torch.Tensor  # the rollout's group shows evidence against the teacher

    def metrics(self) -> dict:
        """`tip/trust/...`: shares of rollouts (distrusted, endorsed, endorsed and wrong)."""
        n = max(1, self.correct.numel())
        return {
            "tip/trust/distrusted_fraction": self.distrusted.sum().item() / n,
            "tip/trust/endorsed_fraction": self.endorsed.sum().item() / n,
            "tip/trust/endorsed_wrong_fraction": (self.endorsed & ~self.correct).sum().item() / n,
        }


def group_ids(index) -> torch.Tensor:
    """verl's prompt ids (B,) (any hashable values, e.g. uid strings) as dense int64 group numbers (B,)."""
    _, inverse = np.unique(np.asarray(index), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def teacher_trust(
    scores: torch.Tensor,
    index,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    endorse_prob: float,
    correct_threshold: float = 0.0,
    teacher_correct: Optional[torch.Tensor] = None,
) -> TeacherTrust:
    """Which rollouts' groups show the checker contradicting the teacher (see the module docstring).

    Args:
        scores: (B,) each rollout's outcome score; correct means score > correct_threshold.
        index: (B,) the group (prompt id) of each rollout, as verl's GRPO reads it.
        teacher_logprobs: (B, T) log pT(y_t) of the sampled tokens.
        response_mask: (B, T) 1 on valid response tokens.
        endorse_prob: in (0, 1]: the teacher endorses a rollout whose every token has pT(y_t) >= this.
        teacher_correct: (B,) bool, whether the checker accepts the teacher's own answer to each rollout's
            prompt (teacher_fails), or None where the teacher did not answer.
    Returns:
        TeacherTrust with (B,) bool verdicts.
    """
    if not 0.0 < endorse_prob <= 1.0:
        raise ValueError(f"algorithm.tip.endorse_prob={endorse_prob!r}: must be in (0, 1], e.g. 0.5.")
    if scores.dim() != 1 or scores.shape[0] != teacher_logprobs.shape[0]:
        raise ValueError(
            f"scores must be (batch,) = ({teacher_logprobs.shape[0]},), one per rollout; got {tuple(scores.shape)}"
        )
    mask = response_mask.bool()
    logp = teacher_logprobs.float()
    correct = scores.float() > correct_threshold
    weakest = logp.masked_fill(~mask, math.inf).amin(dim=-1)  # the teacher's strongest objection, (B,)
    endorsed = mask.any(dim=-1) & (weakest >= math.log(endorse_prob))
    likelihood = (logp * mask).sum(dim=-1)  # (B,)

    groups = group_ids(index).to(scores.device)
    n_groups = int(groups.max()) + 1 if groups.numel() else 0

    def per_group_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_groups, dtype=torch.float32, device=values.device).index_add_(0, groups, values.float())

    n_correct, n_wrong = per_group_sum(correct), per_group_sum(~correct)
    mean_correct = per_group_sum(likelihood * correct) / n_correct.clamp_min(1)
    mean_wrong = per_group_sum(likelihood * ~correct) / n_wrong.clamp_min(1)
    prefers_wrong = (n_correct > 0) & (n_wrong > 0) & (mean_correct < mean_wrong)
    endorsed_wrong = per_group_sum(endorsed & ~correct) > 0
    distrusted = (prefers_wrong | endorsed_wrong)[groups]
    if teacher_correct is not None:
        if teacher_correct.shape != correct.shape:
            raise ValueError(f"teacher_correct must be (batch,) = {tuple(correct.shape)}; got {tuple(teacher_correct.shape)}")
        distrusted = distrusted | ~teacher_correct.bool().to(distrusted.device)
    return TeacherTrust(correct=correct, endorsed=endorsed, distrusted=distrusted)
