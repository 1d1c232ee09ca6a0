"""Per-token scores of TIP: student entropy, teacher-student divergence, Soft-OR, quadrants.

Shapes: B rollouts, T response positions (right-padded), V vocabulary, K teacher top-k.
A `response_mask` (B, T) marks valid response tokens; padded positions come out as 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def check_finite(name: str, values: torch.Tensor, response_mask: torch.Tensor) -> None:
    """Raise if `values` (B, T, ...) holds NaN or inf at a valid response position of `response_mask` (B, T)."""
    bad = ~torch.isfinite(values.detach())
    if bad.dim() > 2:
        bad = bad.flatten(2).any(dim=-1)
    bad &= response_mask.bool()
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN/inf value(s) at valid response tokens "
            f"(first at rollout {row}, position {col}). Check the model's dtype and logits, and that the teacher "
            "returned a log-prob for every response token (on the loss route, "
            "distillation.distillation_loss.log_prob_min_clamp bounds -inf log-probs)."
        )


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) (..., V) -> (...)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """h_t = H(p(.|c_t)) / log|V| in [0, 1], from logits (..., V) -> (...)."""
    return token_entropy(logits) / math.log(logits.shape[-1])


def divergence_estimate(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, response_mask: torch.Tensor, kind: str = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pS || pT) from the sampled token's log-probs, y_t ~ pS.

    teacher_logprobs, student_logprobs, response_mask: (B, T). Returns (B, T), 0 at padding.
    k1 = log pS - log pT (unbiased, signed); abs_k1 = |k1|; k3 = (q - 1) - log q with q = pT / pS
    (unbiased and non-negative).
    """
    mask = response_mask.bool()
    log_ratio = (teacher_logprobs - student_logprobs).float().masked_fill(~mask, 0.0)
    if kind == "k1":
        estimate = -log_ratio
    elif kind == "abs_k1":
        estimate = log_ratio.abs()
    elif kind == "k3":
        estimate = torch.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"Unknown divergence estimate {kind!r}; set algorithm.tip.divergence to k1, abs_k1 or k3.")
    return estimate.masked_fill(~mask, 0.0)


def topk_reverse_kl(student_topk_logprobs: torch.Tensor, teacher_topk_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(pS || pT) restricted to the teacher's top-k tokens, both renormalised over those k tokens.

    student_topk_logprobs, teacher_topk_logprobs: (B, T, K), log-probs of the same K token ids.
    Returns (B, T), non-negative.
    """
    if student_topk_logprobs.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"top-k log-probs must have one shape, got student {tuple(student_topk_logprobs.shape)} "
            f"and teacher {tuple(teacher_topk_logprobs.shape)}."
        )
    log_ps = torch.log_softmax(student_topk_logprobs.float(), dim=-1)
    log_pt = torch.log_softmax(teacher_topk_logprobs.float(), dim=-1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(dim=-1).clamp_min(0.0)


def masked_quantile(values: torch.Tensor, response_mask: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (linear interpolation, as torch.quantile) of `values` over valid tokens; a 0-d tensor.

    Two order statistics by selection (kthvalue), not a full sort: this runs on every batch.
    """
    valid = values[response_mask.bool()].float()
    if valid.numel() == 0:
        raise ValueError("No valid response token in the batch (response_mask is all zero): nothing to score.")
    position = q * (valid.numel() - 1)
    low = int(math.floor(position))
    high = min(low + 1, valid.numel() - 1)
    low_value = torch.kthvalue(valid, low + 1).values
    high_value = torch.kthvalue(valid, high + 1).values if high != low else low_value
    return low_value + (position - low) * (high_value - low_value)


def minmax_normalize(
    values: torch.Tensor, response_mask: torch.Tensor, name: str, upper: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Min-max normalise `values` (B, T) over the batch's valid tokens to [0, 1]; 0 at padding.

    `upper` (0-d) clips values from above first (e.g. an entropy quantile). Raises on a constant input,
    where min-max has no meaning.
    """
    mask = response_mask.bool()
    if not mask.any():
        raise ValueError(f"No valid response token to normalise {name} over (response_mask is all zero).")
    values = values.float()
    low = values.masked_fill(~mask, math.inf).amin()
    high = values.masked_fill(~mask, -math.inf).amax()
    if upper is not None and upper > low:
        high = torch.minimum(high, upper)
    if high <= low:
        raise ValueError(
            f"Cannot min-max normalise {name}: all {int(mask.sum())} valid tokens have the same value "
            f"{low.item():.6g}, so it ranks no token above another. This happens when teacher and student "
            "are the same model (divergence 0) or entropy is constant; pick a rule that does not use this score "
            "(algorithm.tip.rule=random, entropy or all) or check the inputs."
        )
    return values.clamp(max=high).sub_(low).div_(high - low).masked_fill_(~mask, 0.0)


def quantile_clipped_minmax(
    values: torch.Tensor, response_mask: torch.Tensor, quantile: float, name: str
) -> torch.Tensor:
    """Clip `values` (B, T) at their batch `quantile` over valid tokens, then min-max normalise to [0, 1].

    quantile 1.0 is plain min-max. The clip keeps a few extreme tokens from pressing every other token's
    normalised value towards 0 (k3 of a single token at log-ratio 12 is ~1.6e5). 0 at padding.
    """
    upper = masked_quantile(values, response_mask, quantile) if quantile < 1.0 else None
    return minmax_normalize(values, response_mask, name, upper=upper)


def soft_or_score(normalized_entropy_: torch.Tensor, normalized_divergence: torch.Tensor) -> torch.Tensor:
    """s_t = 1 - (1 - h^_t)(1 - d^_t): high when either the entropy or the divergence is high. (B, T)."""
    return 1.0 - (1.0 - normalized_entropy_) * (1.0 - normalized_divergence)


def q3_score(divergence: torch.Tensor, normalized_entropy_: torch.Tensor) -> torch.Tensor:
    """w_t = d_t (1 - h^_t): high divergence at low entropy, "overconfident and wrong" (Q3). (B, T)."""
    return divergence * (1.0 - normalized_entropy_)


def quadrant_labels(
    entropy: torch.Tensor,
    divergence: torch.Tensor,
    response_mask: torch.Tensor,
    quantile: float = 0.5,
    entropy_threshold: Optional[float] = None,
    divergence_threshold: Optional[float] = None,
) -> torch.Tensor:
    """Quadrant of each token on the entropy x divergence plane, int64 (B, T); 0 at padding.

    1: high entropy, high divergence; 2: high entropy, low divergence;
    3: low entropy, high divergence ("overconfident and wrong"); 4: low entropy, low divergence (solved).
    "High" means above the threshold: the given absolute one, else the batch `quantile` over valid tokens.
    """
    h_cut = entropy_threshold if entropy_threshold is not None else masked_quantile(entropy, response_mask, quantile)
    d_cut = (
        divergence_threshold if divergence_threshold is not None else masked_quantile(divergence, response_mask, quantile)
    )
    high_h, high_d = entropy > h_cut, divergence > d_cut
    labels = torch.where(high_h, torch.where(high_d, 1, 2), torch.where(high_d, 3, 4))
    return labels.masked_fill(~response_mask.bool(), 0)
