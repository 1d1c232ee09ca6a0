"""`tip/...` metrics of one TIP step, as plain floats for verl's metric dict."""

from __future__ import annotations

from typing import Optional

import torch

from tip_verl.core.advantages import TipTokens


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = mask.sum()
    return float((values * mask).sum() / count) if count > 0 else 0.0


def tip_metrics(tokens: TipTokens, response_mask: torch.Tensor) -> dict[str, float]:
    """Selected fraction, token share per quadrant, mean teacher reward and divergence, selected vs not."""
    valid = response_mask.bool()
    selected = tokens.selected & valid
    unselected = ~tokens.selected & valid
    n_valid = valid.sum().clamp_min(1)
    metrics = {
        "tip/selected_fraction": float(selected.sum() / n_valid),
        "tip/teacher_reward/selected_mean": _masked_mean(tokens.teacher_reward, selected),
        "tip/teacher_reward/unselected_mean": _masked_mean(tokens.teacher_reward, unselected),
        "tip/teacher_reward/mean": _masked_mean(tokens.teacher_reward, valid),
        "tip/divergence/selected_mean": _masked_mean(tokens.divergence, selected),
        "tip/divergence/unselected_mean": _masked_mean(tokens.divergence, unselected),
    }
    if tokens.trust is not None:
        metrics.update(tokens.trust.metrics())
    if tokens.answer is not None:
        metrics.update(tokens.answer.metrics())
    if tokens.quadrant is not None:
        for q in (1, 2, 3, 4):
            in_q = tokens.quadrant == q
            metrics[f"tip/quadrant/q{q}_share"] = float(in_q.sum() / n_valid)
            metrics[f"tip/quadrant/q{q}_selected_share"] = _masked_mean(selected.float(), in_q)
    return metrics


def rollout_columns(response_mask: torch.Tensor, **per_token: Optional[torch.Tensor]) -> list[dict]:
    """One record per rollout for verl's rollout dump: `tip_response_tokens` (its m_i) and each given per-token
    tensor as a `tip_<name>` list over its response tokens; a bool tensor also as `tip_<name>_tokens`, its count.

    response_mask: (B, T) 0/1; per_token: name -> (B, T) tensor, or None (left out).
    """
    valid = response_mask.bool()
    records = [{"tip_response_tokens": int(row.sum())} for row in valid]
    for name, values in per_token.items():
        if values is None:
            continue
        for record, row, keep in zip(records, values, valid):
            kept = row[keep]
            if kept.dtype == torch.bool:
                record[f"tip_{name}_tokens"] = int(kept.sum())
                kept = kept.int()
            record[f"tip_{name}"] = kept.tolist()
    return records
