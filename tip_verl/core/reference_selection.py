"""Slow per-rollout reference of the selection rules: a Python loop over rollouts.

The vectorised rules in `selection.py` are tested for exact equality against it and benchmarked against
it. Nothing is shared with them but the noise draws: the batch-level clip and min-max are recomputed in
numpy (float64), the per-rollout budget and the ranking (ties to the earlier position) one rollout at a time.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


def _row_budget(length: int, ratio: float) -> int:
    return 0 if length == 0 else min(length, max(1, math.floor(length * ratio)))


def reference_select(
    rule: str,
    ratio: float,
    response_mask: torch.Tensor,
    entropy: Optional[torch.Tensor] = None,
    divergence: Optional[torch.Tensor] = None,
    entropy_quantile: float = 0.98,
    generator: Optional[torch.Generator] = None,
    divergence_quantile: float = 0.98,
) -> torch.Tensor:
    """Boolean mask (B, T), one rollout at a time; same noise draws as the vectorised rules."""
    mask = response_mask.bool()
    keys = _reference_keys(rule, mask, entropy, divergence, entropy_quantile, divergence_quantile, generator)
    selected = torch.zeros_like(mask)
    for row in range(mask.shape[0]):
        positions = mask[row].nonzero().flatten()
        if rule == "all":
            chosen = positions
        else:
            order = torch.sort(keys[row, positions], descending=True, stable=True).indices
            chosen = positions[order[: _row_budget(positions.numel(), ratio)]]
        selected[row, chosen] = True
    return selected


def _clipped_minmax(values: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """numpy: clip at the batch quantile of the valid values (unless that is their minimum), min-max to [0, 1]."""
    array = values.double().numpy()
    valid = array[mask.numpy()]
    low, high = valid.min(), np.quantile(valid, quantile)
    if high <= low:
        high = valid.max()
    return torch.from_numpy((np.minimum(array, high) - low) / (high - low))


def _reference_keys(
    rule, mask, entropy, divergence, entropy_quantile, divergence_quantile, generator
) -> Optional[torch.Tensor]:
    if rule == "all":
        return None
    if rule == "random":
        return torch.rand(mask.shape, generator=generator)
    if rule == "entropy":
        return entropy.float()
    if rule == "divergence":
        return divergence.float()
    if rule == "entropy_sample":
        uniform = torch.rand(mask.shape, generator=generator)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        return torch.log(entropy.float().clamp_min(0.0)).clamp_min(-1e4) + gumbel
    h_hat = _clipped_minmax(entropy, mask, entropy_quantile)
    if rule == "soft_or":
        d_hat = _clipped_minmax(divergence, mask, divergence_quantile)
        return 1.0 - (1.0 - h_hat) * (1.0 - d_hat)
    if rule == "q3":
        return divergence.double() * (1.0 - h_hat)
    raise ValueError(f"Unknown rule {rule!r}")
