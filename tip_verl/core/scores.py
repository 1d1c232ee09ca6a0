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
        estimate = k3_estimate(log_ratio)
    else:
        raise ValueError(f"Unknown divergence estimate {kind!r}; set algorithm.tip.divergence to k1, abs_k1 or k3.")
    return estimate.masked_fill(~mask, 0.0)


def k3_estimate(log_ratio: torch.Tensor, linear_above: Optional[float] = None) -> torch.Tensor:
    """k3 = (q - 1) - log q per token, from log q = log pT(y_t) - log pS(y_t). (...) -> (...), in log_ratio's dtype.

    linear_above: None: exact everywhere (e^(log q) overflows to inf above log q ~ 88.7 in float32); a number:
    exact for log q <= linear_above and continued on its tangent above, so it stays finite and monotone and
    every token keeps a gradient d k3 / d log q = q - 1. Nothing changes below: e^(log q) -> 0 there.
    """
    if linear_above is None:
        return torch.expm1(log_ratio) - log_ratio
    exact_part = log_ratio.clamp(max=linear_above)
    excess = (log_ratio - linear_above).clamp(min=0.0)  # two one-sided clamps: the gradient never subtracts two huge e^x terms
    return torch.expm1(exact_part) - exact_part + excess * math.expm1(linear_above)


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
    """The q-quantile (linear interpolation, as torch.quantile) of `values` (B, T) over valid tokens; 0-d."""
    return _quantile(_valid_values(values, response_mask, "score"), q)


def _valid_values(values: torch.Tensor, response_mask: torch.Tensor, what: str) -> torch.Tensor:
    valid = torch.masked_select(values, response_mask.bool()).float()  # faster than values[mask] on CPU
    if valid.numel() == 0:
        raise ValueError(f"No valid response token in the batch (response_mask is all zero): nothing to {what}.")
    return valid


def _quantile(valid: torch.Tensor, q: float) -> torch.Tensor:
    """q-quantile of the 1-d `valid` from the two order statistics around q * (n - 1); 0-d."""
    position = q * (valid.numel() - 1)
    low = int(math.floor(position))
    low_value, high_value = _adjacent_order_statistics(valid, low)
    return low_value + (position - low) * (high_value - low_value)


# Size of the strided sample that brackets an order statistic; used above 4x as many values
ORDER_SAMPLE_SIZE = 4096


def _adjacent_order_statistics(valid: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-th and (rank + 1)-th smallest of the 1-d `valid` (0-based; the second capped at the largest).

    Exact, by selection (kthvalue), not a full sort: this runs on every batch. On a large batch the order
    statistics of a strided sample bracket the rank, and kthvalue runs only on the few values inside the
    bracket, unless the bracket misses the rank (then on all values).
    """
    n = valid.numel()
    candidates, below = valid, 0
    if n > 4 * ORDER_SAMPLE_SIZE:
        sample = torch.sort(valid[:: n // ORDER_SAMPLE_SIZE]).values
        centre = rank * (sample.numel() - 1) // max(n - 1, 1)
        margin = 2 * math.isqrt(sample.numel())  # >= 4 standard errors of the quantile's rank in the sample
        lower = sample[max(centre - margin, 0)]
        upper = sample[min(centre + margin + 1, sample.numel() - 1)]
        under = int(torch.count_nonzero(valid < lower))
        inside = torch.masked_select(valid, (valid >= lower) & (valid <= upper))
        if under <= rank and under + inside.numel() >= min(rank + 2, n):
            candidates, below = inside, under
    first = torch.kthvalue(candidates, rank - below + 1).values
    if rank + 1 >= n:
        return first, first
    return first, torch.kthvalue(candidates, rank - below + 2).values


def minmax_normalize(
    values: torch.Tensor, response_mask: torch.Tensor, name: str, quantile: float = 1.0
) -> torch.Tensor:
    """Clip `values` (B, T) at their batch `quantile` over valid tokens, then min-max normalise to [0, 1].

    quantile 1.0 is plain min-max. The clip keeps a few extreme tokens from pressing every other token's
    normalised value towards 0 (k3 of a single token at log-ratio 12 is ~1.6e5); a quantile equal to the
    minimum (most tokens tied there) clips nothing. 0 at padding. A constant input ranks no token above another:
    it normalises to 0 everywhere, so a rule's other axis decides (the loss route selects per micro-batch, where
    one eligible token, or a few tied ones, is a legitimate batch). `check_scores_vary` refuses a whole step's
    batch that is constant.
    """
    mask = response_mask.bool()
    valid = _valid_values(values, mask, f"normalise {name} over")
    low, high = torch.aminmax(valid)
    if quantile < 1.0:
        upper = _quantile(valid, quantile)
        if upper > low:
            high = upper
    if high <= low:
        return torch.zeros_like(values, dtype=torch.float32)
    return torch.where(mask, values.float().clamp(max=high).sub_(low).div_(high - low), 0.0)


def check_scores_vary(values: torch.Tensor, response_mask: torch.Tensor, name: str, rules: str) -> None:
    """Raise if `values` (B, T) take one value at every valid token of a step's batch (of more than one token):
    teacher and student are then the same model (divergence 0), or the entropy was never computed.

    rules: the rules that would rank on it, named in the message.
    """
    valid = _valid_values(values, response_mask.bool(), f"rank {name} over")
    low, high = torch.aminmax(valid)
    if valid.numel() > 1 and high <= low:
        raise ValueError(
            f"Cannot rank tokens by {name}: all {valid.numel()} valid tokens of the batch have the same value "
            f"{low.item():.6g}. This happens when teacher and student are the same model (divergence 0) or "
            f"entropy is constant; pick a rule that does not use this score (not {rules}) or check the inputs."
        )


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
