"""Slow per-rollout reference of the selection rules: a Python loop over rollouts.

The vectorised rules in `selection.py` are tested for exact equality against it and benchmarked against
it. Nothing is shared with them but their inputs and the noise draws: the batch-level clip and min-max are
recomputed in numpy (float64), the per-rollout budget and the ranking (ties to the earlier position) one rollout
at a time. Each rule registered in `selection.py` has its oracle here, registered under the rule's name with
`reference_keys_of`; tests/test_selection.py fails for a rule without one.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from tip_verl.core.selection import SELECT_ALL, SelectionInputs


def _row_budget(length: int, ratio: float) -> int:
    return 0 if length == 0 else min(length, max(1, math.floor(length * ratio)))


ReferenceKeyFn = Callable[[SelectionInputs], torch.Tensor]
REFERENCE_KEYS: dict[str, ReferenceKeyFn] = {}


def reference_keys_of(rule: str) -> Callable[[ReferenceKeyFn], ReferenceKeyFn]:
    """Register the oracle of selection rule `rule`: its keys (B, T), computed without `selection.py`'s code.

    The oracle reads the rule's SelectionInputs, with response_mask bool and every tensor on the CPU.
    """

    def decorator(fn: ReferenceKeyFn) -> ReferenceKeyFn:
        REFERENCE_KEYS[rule] = fn
        return fn

    return decorator


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
    if rule == SELECT_ALL:
        return mask.clone()
    if rule not in REFERENCE_KEYS:
        raise ValueError(f"Selection rule {rule!r} has no oracle: add one with @reference_keys_of({rule!r}).")
    inputs = SelectionInputs(mask, entropy, divergence, entropy_quantile, generator, divergence_quantile)
    keys = REFERENCE_KEYS[rule](inputs)
    selected = torch.zeros_like(mask)
    for row in range(mask.shape[0]):
        positions = mask[row].nonzero().flatten()
        order = torch.sort(keys[row, positions], descending=True, stable=True).indices
        selected[row, positions[order[: _row_budget(positions.numel(), ratio)]]] = True
    return selected


def _clipped_minmax(values: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """numpy: clip at the batch quantile of the valid values (unless that is their minimum), min-max to [0, 1];
    0 everywhere for a constant input."""
    array = values.double().numpy()
    valid = array[mask.numpy()]
    low, high = valid.min(), np.quantile(valid, quantile)
    if high <= low:
        high = valid.max()
    if high <= low:  # a constant axis ranks no token: 0 everywhere
        return torch.zeros(array.shape, dtype=torch.float64)
    return torch.from_numpy((np.minimum(array, high) - low) / (high - low))


@reference_keys_of("random")
def reference_random_keys(inputs: SelectionInputs) -> torch.Tensor:
    return torch.rand(inputs.response_mask.shape, generator=inputs.generator)


@reference_keys_of("entropy")
def reference_entropy_keys(inputs: SelectionInputs) -> torch.Tensor:
    return inputs.entropy.float()


@reference_keys_of("entropy_sample")
def reference_entropy_sample_keys(inputs: SelectionInputs) -> torch.Tensor:
    uniform = torch.rand(inputs.response_mask.shape, generator=inputs.generator)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    return torch.log(inputs.entropy.float().clamp_min(0.0)).clamp_min(-1e4) + gumbel


@reference_keys_of("divergence")
def reference_divergence_keys(inputs: SelectionInputs) -> torch.Tensor:
    return inputs.divergence.float()


@reference_keys_of("soft_or")
def reference_soft_or_keys(inputs: SelectionInputs) -> torch.Tensor:
    h_hat = _clipped_minmax(inputs.entropy, inputs.response_mask, inputs.entropy_quantile)
    d_hat = _clipped_minmax(inputs.divergence, inputs.response_mask, inputs.divergence_quantile)
    return 1.0 - (1.0 - h_hat) * (1.0 - d_hat)


@reference_keys_of("q3")
def reference_q3_keys(inputs: SelectionInputs) -> torch.Tensor:
    h_hat = _clipped_minmax(inputs.entropy, inputs.response_mask, inputs.entropy_quantile)
    return inputs.divergence.double() * (1.0 - h_hat)
