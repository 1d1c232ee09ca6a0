"""The hybrid advantage: teacher reward on TIP-selected tokens, the outcome (GRPO) advantage elsewhere.

Shapes: B rollouts, T response positions; every tensor is (B, T) and 0 at padded positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tip_verl.core.config import TipConfig
from tip_verl.core.scores import check_finite, check_scores_vary, divergence_estimate, quadrant_labels
from tip_verl.core.selection import SelectionInputs, rules_reading, select_tokens
from tip_verl.core.answer_gate import AnswerGate, AnswerRecord, answer_gate
from tip_verl.core.trust import TeacherTrust


@dataclass
class TipTokens:
    """Per-token results of one TIP step, all (B, T): what was selected and why."""

    selected: torch.Tensor  # bool
    teacher_reward: torch.Tensor  # r_t = log pT(y_t) - log pS_old(y_t)
    divergence: torch.Tensor  # the configured KL(pS || pT) estimate
    quadrant: Optional[torch.Tensor]  # int64 1..4 (0 at padding); None without entropy
    trust: Optional[TeacherTrust] = None  # per-rollout verdicts of teacher_trust=checked; None with always
    answer: Optional[AnswerGate] = None  # what answer_teacher saw and did; None with always


def teacher_reward(
    teacher_logprobs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """r_t = log pT(y_t) - log pS_old(y_t), the negative single-sample reverse-KL estimate. (B, T)."""
    return (teacher_logprobs.float() - old_log_probs.float()).masked_fill(~response_mask.bool(), 0.0)


def mix_advantages(
    outcome_advantages: torch.Tensor,
    reward: torch.Tensor,
    selected: torch.Tensor,
    response_mask: torch.Tensor,
    mix: str,
    coef: float,
    distrusted: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Combine the outcome advantage (B, T) with coef * teacher reward (B, T) on the `selected` tokens.

    replace: selected -> coef * r_t, others -> outcome advantage;
    add: outcome advantage everywhere, plus coef * r_t on selected;
    teacher_only: selected -> coef * r_t, others -> 0.
    distrusted: (B,) bool, rollouts whose every token takes the outcome advantage instead (checked trust).
    """
    teacher_term = coef * reward * selected
    if mix == "replace":
        mixed = torch.where(selected, teacher_term, outcome_advantages.float())
    elif mix == "add":
        mixed = outcome_advantages.float() + teacher_term
    elif mix == "teacher_only":
        mixed = teacher_term
    else:
        raise ValueError(f"Unknown mix {mix!r}; set algorithm.tip.mix to replace, add or teacher_only.")
    if distrusted is not None:
        mixed = torch.where(distrusted[:, None], outcome_advantages.float(), mixed)
    return mixed.masked_fill(~response_mask.bool(), 0.0)


def check_tip_inputs(response_mask: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Clear errors for the inputs of a TIP step: missing, misshapen, empty or non-finite."""
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be (batch, response_length), got shape {tuple(response_mask.shape)}.")
    if not response_mask.bool().any():
        raise ValueError(
            "Every response in the batch is empty (response_mask is all zero): no token to score. "
            "Check the rollout's max response length and that responses are not all truncated away."
        )
    for name, tensor in tensors.items():
        if tensor is None:
            hint = (
                "enable verl's teacher (distillation.enabled=true with distillation.teacher_models) "
                "and use trainer.v1.trainer_mode=tip_sync so the trainer passes it on"
                if name == "teacher_logprobs"
                else "use trainer.v1.trainer_mode=tip_sync, which passes it from the old-log-prob step"
            )
            raise ValueError(f"tip_opd needs {name} (batch, response_length), but it is missing: {hint}.")
        if tensor.shape != response_mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but response_mask has {tuple(response_mask.shape)}; "
                "both must be (batch, response_length), aligned to the response tokens only."
            )
        check_finite(name, tensor, response_mask)


def select_and_reward(
    config: TipConfig,
    response_mask: torch.Tensor,
    old_log_probs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    entropy: Optional[torch.Tensor],
    generator: Optional[torch.Generator] = None,
    divergence: Optional[torch.Tensor] = None,
) -> TipTokens:
    """Score every response token, select with `config.rule` at `config.ratio`, and compute the teacher reward.

    response_mask, old_log_probs (student log pS_old(y_t)), teacher_logprobs (log pT(y_t)), entropy (nats):
    all (B, T). entropy may be None only for rules that do not read it (all, random, divergence).
    divergence: (B, T) the divergence axis when it is known exactly (KL(pS || pT) over the vocabulary, where
    both full distributions are at hand); None estimates it from the sampled token (`config.divergence`).
    """
    optional = {"entropy": entropy} if entropy is not None else {}
    if divergence is not None:
        optional["divergence"] = divergence
    check_tip_inputs(response_mask, old_log_probs=old_log_probs, teacher_logprobs=teacher_logprobs, **optional)
    if divergence is None:
        divergence = divergence_estimate(teacher_logprobs, old_log_probs, response_mask, config.divergence)
    else:
        divergence = divergence.float().masked_fill(~response_mask.bool(), 0.0)
    inputs = SelectionInputs(
        response_mask=response_mask,
        entropy=entropy,
        divergence=divergence,
        entropy_quantile=config.entropy_quantile,
        divergence_quantile=config.divergence_quantile,
        generator=generator,
    )
    # a whole step's batch that ranks no token (teacher = student, entropy never computed) is refused here; the
    # rules themselves accept a constant axis, as the loss route's micro-batches can be
    axes = (("divergence", divergence, "teacher-student divergence"), ("entropy", entropy, "student entropy"))
    for axis, values, name in axes:
        if values is not None and config.rule in rules_reading(axis):
            check_scores_vary(values, response_mask, name, ", ".join(rules_reading(axis)))
    quadrant = None
    if entropy is not None:
        quadrant = quadrant_labels(
            entropy,
            divergence,
            response_mask,
            quantile=config.quadrant_quantile,
            entropy_threshold=config.entropy_threshold,
            divergence_threshold=config.divergence_threshold,
        )
    return TipTokens(
        selected=select_tokens(config.rule, config.ratio, inputs),
        teacher_reward=teacher_reward(teacher_logprobs, old_log_probs, response_mask),
        divergence=divergence,
        quadrant=quadrant,
    )


def gate_answer(
    tokens: TipTokens,
    config: TipConfig,
    answer: Optional[torch.Tensor],
    scores: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    record: Optional[AnswerRecord] = None,
) -> None:
    """With `config.answer_teacher` other than always, hand the answer to the checker (tip_verl.core.answer_gate):
    `tokens.selected` loses the answer tokens the teacher may not keep, and `tokens.answer` records the gate.

    answer: (B, T) bool, the answer tokens (answer_span); scores: (B,) the rollouts' outcome scores;
    teacher_logprobs: (B, T) log pT(y_t); record: the run's AnswerRecord (confirm_on_record).
    """
    if config.answer_teacher == "always":
        return
    if answer is None:
        raise ValueError(
            f"algorithm.tip.answer_teacher={config.answer_teacher} needs each response's answer tokens (after "
            "algorithm.tip.answer_marker), which no one bound: use trainer.v1.trainer_mode=tip_sync, whose trainer "
            "finds them in the responses."
        )
    tokens.answer = answer_gate(
        config.answer_teacher, answer, scores, teacher_logprobs, config.endorse_prob, config.correct_threshold,
        record=record, tolerance=config.answer_tolerance,
    )
    tokens.selected = tokens.answer.apply(tokens.selected)
