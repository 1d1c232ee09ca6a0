"""Tensor math of the TIP loss route: the distillation divergences, which per-token losses count, and with what weight.

The loss route back-propagates a per-token divergence on the tokens TIP selects, averaged over those tokens
(the paper's 1/|T|). Every divergence is registered once, by name, with `register_divergence`, and declares
what it reads of the teacher: its logits (the full vocabulary: the demo loop), the sampled token's log-prob
(verl's estimator losses, loss_mode=tip_<name>) or its top-k (verl's top-k losses). The name is what users
type: the demo's --loss, algorithm.tip_loss.correct_loss / wrong_loss, and after `tip_` verl's loss_mode.
On verl the per-token losses are aggregated with `agg_loss` over the response mask; this module supplies the
mask and the weights that turn that aggregate into a mean over the selected tokens. No verl import here.

Shapes: B rollouts of the micro-batch, T response positions (right-padded), K teacher top-k, V vocabulary,
N selected tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from tip_verl.core.config import build_section
from tip_verl.core.schedule import check_schedule
from tip_verl.core.scores import check_finite, k3_estimate
from tip_verl.core.selected_divergence import DIVERGENCE_LOSS_NAMES as HAND_WRITTEN_GRADIENTS
from tip_verl.core.selected_divergence import selected_token_divergence
from tip_verl.core.selection import SelectionInputs, rules_reading, select_tokens, selection_budget, selection_rule_names

NO_TEACHER_TERM = "none"  # correct_loss / wrong_loss value: those rollouts get no distillation term
K3_LINEAR_ABOVE = 40.0  # log q where k3 turns linear: e^40 ~ 2.4e17, far from float32's 3.4e38
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm")
TEACHER_SIGNALS = ("logits", "sampled_token", "topk")


@dataclass(frozen=True)
class Divergence:
    """A registered per-token distillation divergence.

    name: what users type (--loss, correct_loss / wrong_loss, verl's loss_mode after `tip_`).
    teacher: what it reads of the teacher, one of TEACHER_SIGNALS; `per_token` takes, by that:
        logits: (student_logits (N, V), teacher_logits (N, V)), both divided by the temperature, float32 or
            wider -> (N,); a plain function, differentiated by autograd (`full_vocabulary_divergence`);
        sampled_token: (student_log_probs (B, T), teacher_log_probs (B, T)) of the sampled token -> (B, T);
        topk: verl's distillation-loss signature (config, distillation_config, model_output, data) ->
            ((B, T) losses, metrics), over the teacher's top-k.
    """

    name: str
    teacher: str
    per_token: Callable


DIVERGENCES: dict[str, Divergence] = {}


def register_divergence(*names: str, teacher: str) -> Callable[[Callable], Callable]:
    """Decorator: register `per_token` under each of `names`, reading `teacher` (see `Divergence`)."""
    if teacher not in TEACHER_SIGNALS:
        raise ValueError(f"register_divergence(teacher={teacher!r}): set one of {list(TEACHER_SIGNALS)}.")

    def register(per_token: Callable) -> Callable:
        for name in names:
            if name in DIVERGENCES or name == NO_TEACHER_TERM:
                raise ValueError(f"A divergence named {name!r} is already registered or reserved; pick another name.")
            DIVERGENCES[name] = Divergence(name, teacher, per_token)
        return per_token

    return register


def divergence_names(teacher: str) -> tuple[str, ...]:
    """The registered divergences that read `teacher`, in registration order."""
    return tuple(name for name, divergence in DIVERGENCES.items() if divergence.teacher == teacher)


@register_divergence("reverse_kl", teacher="logits")
def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(pS || pT) = sum_v pS_v (log pS_v - log pT_v), mode seeking. (N, V), (N, V) -> (N,)."""
    log_s, log_t = torch.log_softmax(student_logits, dim=-1), torch.log_softmax(teacher_logits, dim=-1)
    return (log_s.exp() * (log_s - log_t)).sum(dim=-1)


@register_divergence("forward_kl", teacher="logits")
def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(pT || pS) = sum_v pT_v (log pT_v - log pS_v), mass covering. (N, V), (N, V) -> (N,)."""
    return reverse_kl(teacher_logits, student_logits)


@register_divergence("jsd", teacher="logits")
def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """0.5 KL(pS || M) + 0.5 KL(pT || M), M = (pS + pT) / 2: TRL GKD's generalized JSD at beta = 0.5. (N,)."""
    log_s, log_t = torch.log_softmax(student_logits, dim=-1), torch.log_softmax(teacher_logits, dim=-1)
    log_m = torch.logaddexp(log_s, log_t) - math.log(2.0)
    return 0.5 * (log_s.exp() * (log_s - log_m)).sum(dim=-1) + 0.5 * (log_t.exp() * (log_t - log_m)).sum(dim=-1)


def full_vocabulary_divergence(
    name: str,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    selected: torch.Tensor,
    *,
    chunk_size: int,
    temperature: float,
) -> torch.Tensor:
    """(N,) divergence `name` between the student's and the teacher's LM-head distributions at `selected` only.

    student_hidden: (B, T, H), with grad; student_weight: (V, H); teacher_hidden: (B, T, Ht) and teacher_weight
    (V, Ht), no grad; selected: bool (B, T). The hand-written gradients of `selected_token_divergence` are the
    fast path; a divergence without one gets its gradient from autograd through its registered function.
    """
    if name not in divergence_names("logits"):
        raise ValueError(
            f"loss={name!r} (--loss, tip_loss.correct_loss / wrong_loss) is not a full-vocabulary divergence; "
            f"set one of {list(divergence_names('logits'))}, or register one with teacher='logits'."
        )
    if name in HAND_WRITTEN_GRADIENTS:
        return selected_token_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, selected, loss=name,
            chunk_size=chunk_size, temperature=temperature,
        )
    return autograd_divergence(
        DIVERGENCES[name].per_token, student_hidden[selected], student_weight,
        teacher_hidden.detach()[selected], teacher_weight.detach(), chunk_size=chunk_size, temperature=temperature,
    )


def autograd_divergence(
    per_token: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    chunk_size: int,
    temperature: float,
) -> torch.Tensor:
    """per_token(student logits, teacher logits) / temperature for N gathered tokens, `chunk_size` at a time. (N,).

    student_hidden: (N, H), teacher_hidden: (N, Ht). Each chunk is recomputed in backward (activation
    checkpointing), so autograd holds one chunk's (chunk_size, V) logits at a time, not N x V.
    """
    dtype = torch.promote_types(torch.promote_types(student_hidden.dtype, student_weight.dtype), torch.float32)

    def chunk(student_h: torch.Tensor, teacher_h: torch.Tensor) -> torch.Tensor:
        student_logits = (student_h @ student_weight.t()).to(dtype) / temperature
        teacher_logits = (teacher_h @ teacher_weight.t()).to(dtype) / temperature
        return per_token(student_logits, teacher_logits)

    if student_hidden.shape[0] == 0:  # empty, but in the graph, as the fast path's
        return student_hidden.sum(dim=-1).to(dtype)
    return torch.cat([
        checkpoint(chunk, student_hidden[s : s + chunk_size], teacher_hidden[s : s + chunk_size], use_reentrant=False)
        for s in range(0, student_hidden.shape[0], chunk_size)
    ])


@dataclass(frozen=True)
class TipLossConfig:
    """Settings of the loss route, read from `algorithm.tip_loss` (selection itself is `algorithm.tip`).

    correct_loss / wrong_loss: TRACE's outcome split (`split_by_outcome`). null: every rollout gets the loss_mode's own divergence;
        a divergence name: rollouts with that outcome get it instead (estimator path: verl's kl_penalty names
        kl, k1, abs, mse, k2, low_var_kl, k3; top-k path: forward_kl_topk); "none": those rollouts get no
        distillation term at all.
    score_field: micro-batch field holding each rollout's outcome score, per token (summed over the response).
    A rollout is correct when its score is > algorithm.tip.correct_threshold (the threshold of teacher trust too).
    teacher_entropy_tau: entropy gate of `tip_entropy_aware_topk`, in nats; the forward KL counts only where
        the teacher's entropy over its renormalised top-k is >= tau.
    schedule, warmup_steps, anneal_steps, final_coef: the teacher-coefficient schedule (tip_verl.core.schedule).
    """

    correct_loss: Optional[str] = None
    wrong_loss: Optional[str] = None
    score_field: str = "rm_scores"
    teacher_entropy_tau: float = 0.8
    schedule: str = "constant"
    warmup_steps: int = 0
    anneal_steps: int = 0
    final_coef: float = 0.0

    def __post_init__(self):
        for name in ("correct_loss", "wrong_loss"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"algorithm.tip_loss.{name}={value!r} must be null, 'none' or a divergence name.")
        if not isinstance(self.score_field, str) or not self.score_field:
            raise ValueError(f"algorithm.tip_loss.score_field={self.score_field!r} must be a field name, e.g. rm_scores.")
        tau = self.teacher_entropy_tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
            raise ValueError(f"algorithm.tip_loss.teacher_entropy_tau={tau!r} must be a finite number.")
        if self.teacher_entropy_tau < 0:
            raise ValueError(f"algorithm.tip_loss.teacher_entropy_tau={self.teacher_entropy_tau} must be >= 0 nats.")
        check_schedule(self.schedule, self.warmup_steps, self.anneal_steps, self.final_coef)

    @property
    def splits_by_outcome(self) -> bool:
        return self.correct_loss is not None or self.wrong_loss is not None

    def check_divergences(self, allowed: tuple, path: str) -> None:
        """Raise if correct_loss / wrong_loss is not one of `allowed` (or 'none') on this `path` of the loss route."""
        for name in ("correct_loss", "wrong_loss"):
            value = getattr(self, name)
            if value is not None and value != NO_TEACHER_TERM and value not in allowed:
                raise ValueError(
                    f"algorithm.tip_loss.{name}={value!r} cannot run on the {path} path; "
                    f"set null, '{NO_TEACHER_TERM}' or one of {list(allowed)}."
                )

    @classmethod
    def from_any(cls, config: Any) -> "TipLossConfig":
        """Build from None, a TipLossConfig or a mapping (dict or DictConfig) of `algorithm.tip_loss` keys."""
        return build_section(cls, config, "algorithm.tip_loss")


def check_loss_inputs(response_mask: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Raise on a per-token loss input (B, T) that is misshapen or NaN/inf at a response token."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.shape[:2] != response_mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but the response mask has {tuple(response_mask.shape)}; "
                "both must be aligned to the response tokens (batch, response_length)."
            )
        check_finite(name, tensor, response_mask)


def k3_divergence(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """k3 of the sampled token, per token, in at least float32, linear above log q = K3_LINEAR_ABOVE. (B, T) -> (B, T).

    verl's `kl_penalty(..., "k3")` (and "low_var_kl", the same estimate) clamps log q to [-20, 20] and k3 to
    [-10, 10]: every token with log q above ~2.6 or below ~-11 gets a constant loss and no gradient, and a
    ranking on those values ties exactly the tokens where student and teacher disagree most. Here k3 is exact
    for log q <= K3_LINEAR_ABOVE and continues on its tangent above (slope e^40 - 1), so it stays finite and
    monotone and every token keeps a gradient d k3 / d log pS = 1 - q (`tip_verl.core.scores.k3_estimate`).
    """
    dtype = torch.promote_types(student_log_probs.dtype, torch.float32)
    log_ratio = (teacher_log_probs - student_log_probs).to(dtype)
    return k3_estimate(log_ratio, linear_above=K3_LINEAR_ABOVE)


def teacher_topk_entropy(teacher_topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the teacher's distribution renormalised over its top-k. (B, T, K) -> (B, T)."""
    dtype = torch.promote_types(teacher_topk_logprobs.dtype, torch.float32)
    log_p = torch.log_softmax(teacher_topk_logprobs.to(dtype), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def rollout_correct(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Outcome of each rollout from its per-token scores (B, T), summed over the response: bool (B,)."""
    return scores.float().sum(dim=-1) > threshold


def split_by_outcome(tip_loss: TipLossConfig, correct: torch.Tensor, own_divergence: str) -> dict[str, torch.Tensor]:
    """TRACE's outcome split: {divergence name: bool (B,) rollouts that get it}, from each rollout's outcome.

    correct: bool (B,). Correct rollouts get tip_loss.correct_loss, wrong ones wrong_loss; null means
    `own_divergence` (the loss_mode's own, or the demo's `loss`), NO_TEACHER_TERM leaves those rollouts out of every entry.
    """
    rows_by_divergence: dict[str, torch.Tensor] = {}
    for rows, name in ((correct, tip_loss.correct_loss), (~correct, tip_loss.wrong_loss)):
        name = own_divergence if name is None else name
        if name != NO_TEACHER_TERM:
            rows_by_divergence[name] = rows_by_divergence.get(name, torch.zeros_like(rows)) | rows
    return rows_by_divergence


def losses_by_outcome(
    rows_by_divergence: dict[str, torch.Tensor], divergence: Callable[[str], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses (B, T), each rollout's from its own divergence, and bool (B,) rollouts that keep a term.

    rows_by_divergence: from `split_by_outcome`; divergence(name): per-token losses (B, T) of that divergence.
    """
    if not rows_by_divergence:
        raise ValueError("Both algorithm.tip_loss.correct_loss and wrong_loss are 'none': no distillation term left.")
    losses = None
    for name, rows in rows_by_divergence.items():
        values = divergence(name)
        losses = torch.where(rows.unsqueeze(-1), values, torch.zeros_like(values) if losses is None else losses)
    keep = torch.stack(list(rows_by_divergence.values())).any(dim=0)
    return losses, keep


def tip_loss_mask(
    rule: str,
    ratio: float,
    eligible: torch.Tensor,
    divergence: torch.Tensor,
    entropy: Optional[torch.Tensor],
    entropy_quantile: float,
    generator: Optional[torch.Generator] = None,
    *,
    divergence_quantile: float = 0.98,
) -> torch.Tensor:
    """Tokens whose distillation loss counts: the TIP selection among the eligible tokens. bool (B, T).

    eligible: bool (B, T), response tokens still in play (after the outcome split and the entropy gate);
    divergence: (B, T) per-token loss, the divergence axis of the rules; entropy: (B, T) student entropy in
    nats, or None (then only the rules that do not read it can run). Each rollout keeps
    max(1, floor(ratio * eligible_i)) of its eligible tokens. entropy_quantile / divergence_quantile: the batch
    quantiles Soft-OR clips entropy (B, T) and divergence (B, T) at before min-max (algorithm.tip.*_quantile).
    """
    if entropy is None and rule in rules_reading("entropy"):
        raise ValueError(
            f"algorithm.tip.rule={rule} needs the student's per-token entropy, which is not in the model output: "
            "set actor_rollout_ref.actor.calculate_entropy=true so verl computes it in the update forward pass. "
            f"Without it only the rules {', '.join(r for r in selection_rule_names() if r not in rules_reading('entropy'))} "
            "can run on the loss route."
        )
    eligible = eligible.bool()
    if not eligible.any():
        return eligible.clone()
    budget = selection_budget(eligible, ratio)
    if torch.equal(budget, eligible.sum(dim=-1)):  # every eligible token fits the budget: nothing to rank
        return eligible.clone()
    inputs = SelectionInputs(
        response_mask=eligible,
        entropy=entropy.detach().float() if entropy is not None else None,
        divergence=divergence.detach().float(),
        entropy_quantile=entropy_quantile,
        generator=generator,
        divergence_quantile=divergence_quantile,
    )
    return select_tokens(rule, ratio, inputs)


def selected_token_weights(
    selected: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Weights (B, T), of `dtype`, that make verl's `agg_loss(loss * w, response_mask, mode)` a mean over selected tokens.

    token-mean: agg_loss divides by the response tokens; w = selected * m / s with m response and s selected
        tokens of the micro-batch, so each micro-batch contributes its mean over selected tokens, weighted by
        its share of the response tokens as before (exactly 1/|T| when the micro-batch is the whole batch).
    seq-mean-token-mean: w = selected * m_i / s_i per rollout: each rollout's mean over its selected tokens.
    token-sum, seq-mean-token-sum(-norm): sums by definition; w = selected (dropped tokens leave the sum).
    Rollouts or micro-batches with no selected token get weight 0.
    """
    selected = selected.bool() & response_mask.bool()
    if loss_agg_mode == "token-mean":
        scale = response_mask.bool().sum().double() / selected.sum().clamp_min(1)
        return (selected.double() * scale).to(dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        scale = response_mask.bool().sum(dim=-1).double() / selected.sum(dim=-1).clamp_min(1)
        return (selected.double() * scale.unsqueeze(-1)).to(dtype)
    if loss_agg_mode in LOSS_AGG_MODES:
        return selected.to(dtype)
    raise ValueError(
        f"actor_rollout_ref.actor.loss_agg_mode={loss_agg_mode!r} is not known to the TIP loss route; "
        f"set one of {list(LOSS_AGG_MODES)}."
    )
