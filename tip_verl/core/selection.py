"""TIP selection rules: which response tokens of each rollout get the teacher signal.

Every rule turns per-token scores into a boolean mask (B, T), vectorised over the padded batch.
Each rollout i with m_i >= 1 valid tokens keeps k_i = max(1, floor(ratio * m_i)) of them: with a plain
floor a one-token rollout (an immediate EOS) would get no teacher signal at all, which let a toy student
collapse to emitting EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tip_verl.core.scores import minmax_normalize, q3_score, soft_or_score


@dataclass
class SelectionInputs:
    """What a rule may read. All (B, T); entropy in nats, divergence a per-token KL estimate.

    entropy_quantile / divergence_quantile: Soft-OR clips each axis at this batch quantile before min-max
    normalisation (1.0: plain min-max); q3 reads the entropy one only.
    generator: draws of the random rules, made on its own device (see `uniform_like`).
    """

    response_mask: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    divergence: Optional[torch.Tensor] = None
    entropy_quantile: float = 0.98
    generator: Optional[torch.Generator] = None
    divergence_quantile: float = 0.98


SelectionKeyFn = Callable[[SelectionInputs], torch.Tensor]
SELECTION_RULES: dict[str, SelectionKeyFn] = {}
# What a rule may read besides response_mask: "entropy" and "divergence", those fields of SelectionInputs;
# "random", draws from its generator.
SELECTION_READS = ("entropy", "divergence", "random")
SELECTION_RULE_READS: dict[str, tuple[str, ...]] = {}
SELECT_ALL = "all"  # not a ranking rule: every valid token, whatever the ratio


def register_selection_rule(name: str, reads: tuple[str, ...]) -> Callable[[SelectionKeyFn], SelectionKeyFn]:
    """Register a rule: a function from SelectionInputs to keys (B, T); the top k_i keys of a rollout win.

    reads: what the keys depend on, a subset of SELECTION_READS. A new rule is this function, registered in this
    module, and its oracle in `reference_selection.py` under the same name: the names TipConfig and the CLI
    accept (`selection_rule_names`), the rules that need the student's entropy (`rules_reading("entropy")`) and
    the rule lists of the tests and the benchmark follow from the registry.
    """
    unknown = sorted(set(reads) - set(SELECTION_READS))
    if unknown:
        raise ValueError(f"Selection rule {name!r} reads {unknown}; declare reads from {list(SELECTION_READS)}.")
    if name == SELECT_ALL or name in SELECTION_RULES:
        raise ValueError(f"Selection rule {name!r} is already defined; register the rule under another name.")

    def decorator(fn: SelectionKeyFn) -> SelectionKeyFn:
        SELECTION_RULES[name] = fn
        SELECTION_RULE_READS[name] = tuple(reads)
        return fn

    return decorator


def selection_rule_names() -> tuple[str, ...]:
    """Every rule `select_tokens` runs: `all`, then the registered rules in registration order."""
    return (SELECT_ALL, *SELECTION_RULES)


def rules_reading(read: str) -> tuple[str, ...]:
    """The registered rules that declared `read` (one of SELECTION_READS), in registration order."""
    if read not in SELECTION_READS:
        raise ValueError(f"{read!r} is not a selection input; choose one of {list(SELECTION_READS)}.")
    return tuple(name for name, reads in SELECTION_RULE_READS.items() if read in reads)


def selection_budget(response_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """k_i = max(1, floor(ratio * m_i)) for rollouts with m_i >= 1 valid tokens, else 0. (B,) int64."""
    lengths = torch.count_nonzero(response_mask.bool(), dim=-1)
    budget = torch.floor(lengths.double() * ratio).long().clamp_min(1)
    return torch.where(lengths > 0, torch.minimum(budget, lengths), torch.zeros_like(lengths))


# Largest budget, as a share of the padded length T, up to which a partial selection beats the full sort
# (512 x 4096 keys, one CPU thread: about 0.3x of the sort's time at 0.1 T, 0.7x at 0.5 T, 1x at T).
TOPK_MAX_SHARE = 0.5


def top_k_per_rollout(keys: torch.Tensor, response_mask: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Mark the `budget[i]` valid positions with the largest keys in each row; ties go to the earlier position.

    keys: (B, T) finite at valid positions; response_mask: (B, T); budget: (B,). Returns bool (B, T).
    Up to a largest budget of TOPK_MAX_SHARE * T, a partial selection (torch.topk) finds each row's k_i-th
    largest key, far cheaper than the full sort it replaces; both give the same mask.
    """
    mask = response_mask.bool()
    ranked = torch.where(mask, keys.float(), float("-inf"))
    largest_budget = int(budget.max()) if budget.numel() else 0
    if largest_budget <= TOPK_MAX_SHARE * keys.shape[-1]:
        selected = _top_k_by_threshold(ranked, budget, largest_budget)
    else:
        selected = _top_k_by_sort(ranked, budget)
    return selected & mask


def _top_k_by_sort(ranked: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Rank every position by a stable descending sort of `ranked` (B, T); keep ranks below `budget` (B,)."""
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(ranked.shape[-1], device=ranked.device).expand_as(order))
    return rank < budget.unsqueeze(-1)


def _top_k_by_threshold(ranked: torch.Tensor, budget: torch.Tensor, largest_budget: int) -> torch.Tensor:
    """Keep what the stable sort would: keys at or above each row's k_i-th largest, the earliest of the ties.

    ranked: (B, T); budget: (B,) with every entry <= largest_budget. A row with budget 0 keeps nothing.
    """
    if largest_budget == 0:
        return torch.zeros_like(ranked, dtype=torch.bool)
    top = torch.topk(ranked, largest_budget, dim=-1, sorted=True).values
    threshold = top.gather(-1, (budget - 1).clamp_min(0).unsqueeze(-1))
    selected = ranked >= threshold
    crowded = (torch.count_nonzero(selected, dim=-1) > budget).nonzero().flatten()
    if crowded.numel():  # more ties at the threshold than room: the earliest positions win, as in a stable sort
        rows, row_threshold = ranked[crowded], threshold[crowded]
        above, tied = rows > row_threshold, rows == row_threshold
        room = (budget[crowded] - torch.count_nonzero(above, dim=-1)).unsqueeze(-1)
        selected[crowded] = above | (tied & (tied.cumsum(dim=-1) <= room))
    return selected


def select_tokens(rule: str, ratio: float, inputs: SelectionInputs) -> torch.Tensor:
    """Boolean mask (B, T) of the tokens `rule` selects at `ratio`; `all` selects every valid token."""
    if rule not in selection_rule_names():
        names = sorted(selection_rule_names())
        raise ValueError(f"Unknown selection rule {rule!r}; set algorithm.tip.rule to one of {names}.")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"Selection ratio {ratio!r} must be in (0, 1]: set algorithm.tip.ratio, e.g. 0.5.")
    mask = inputs.response_mask.bool()
    if not mask.any():
        raise ValueError("Every response in the batch is empty (response_mask is all zero): nothing to select.")
    if rule == SELECT_ALL:
        return mask.clone()
    keys = SELECTION_RULES[rule](inputs)
    return top_k_per_rollout(keys, mask, selection_budget(mask, ratio))


def _require(inputs: SelectionInputs, field: str, rule: str) -> torch.Tensor:
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"Selection rule {rule!r} needs per-token {field}, which was not given.")
    if value.shape != inputs.response_mask.shape:
        raise ValueError(
            f"{field} has shape {tuple(value.shape)} but response_mask has {tuple(inputs.response_mask.shape)}; "
            "pass both as (batch, response_length)."
        )
    return value


def normalized_entropy_for_ranking(inputs: SelectionInputs, rule: str) -> torch.Tensor:
    """h^: entropy clipped at its batch `entropy_quantile`, min-max normalised over valid tokens. (B, T)."""
    entropy = _require(inputs, "entropy", rule)
    return minmax_normalize(entropy, inputs.response_mask, "student entropy", inputs.entropy_quantile)


def uniform_like(reference: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """U[0, 1) noise of `reference`'s shape (B, T), on its device, drawn on the generator's device.

    torch refuses a generator of another device (a CPU generator for CUDA tensors): drawing where the
    generator lives and moving the draw gives the same numbers for a seed whatever the tensors' device.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(reference.shape, generator=generator, device=device).to(reference.device)


@register_selection_rule("random", reads=("random",))
def random_keys(inputs: SelectionInputs) -> torch.Tensor:
    """Uniform random keys: a uniform subset of k_i tokens (the control)."""
    return uniform_like(inputs.response_mask, inputs.generator)


@register_selection_rule("entropy", reads=("entropy",))
def entropy_keys(inputs: SelectionInputs) -> torch.Tensor:
    """The k_i highest-entropy tokens."""
    return _require(inputs, "entropy", "entropy")


@register_selection_rule("entropy_sample", reads=("entropy", "random"))
def entropy_sample_keys(inputs: SelectionInputs) -> torch.Tensor:
    """Sample k_i tokens without replacement with p proportional to entropy (Gumbel-top-k).

    log h + Gumbel noise, top-k, draws the same distribution as sequential sampling without replacement.
    Zero-entropy tokens get a key below every positive one and fill the budget only when needed.
    """
    entropy = _require(inputs, "entropy", "entropy_sample").float()
    uniform = uniform_like(entropy, inputs.generator)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    log_weight = torch.log(entropy.clamp_min(0.0)).clamp_min(-1e4)
    return log_weight + gumbel


@register_selection_rule("divergence", reads=("divergence",))
def divergence_keys(inputs: SelectionInputs) -> torch.Tensor:
    """The k_i tokens with the highest teacher-student divergence."""
    return _require(inputs, "divergence", "divergence")


@register_selection_rule("soft_or", reads=("entropy", "divergence"))
def soft_or_keys(inputs: SelectionInputs) -> torch.Tensor:
    """Soft-OR of normalised entropy and divergence, top-k (the paper's best rule).

    Both axes are clipped at a batch quantile before min-max: with plain min-max one k3 outlier squeezes
    every other token's d^ towards 0 and Soft-OR picks the entropy rule's tokens.
    """
    divergence = _require(inputs, "divergence", "soft_or")
    normalized_divergence = minmax_normalize(
        divergence, inputs.response_mask, "teacher-student divergence", inputs.divergence_quantile
    )
    return soft_or_score(normalized_entropy_for_ranking(inputs, "soft_or"), normalized_divergence)


@register_selection_rule("q3", reads=("entropy", "divergence"))
def q3_keys(inputs: SelectionInputs) -> torch.Tensor:
    """d_t (1 - h^_t), top-k: confident tokens where the teacher disagrees.

    The divergence stays raw, as in the paper's w = d (1 - h^): nothing normalises it over the batch, so an
    outlier only moves itself up its own rollout's ranking and leaves the other rollouts' picks as they were.
    """
    divergence = _require(inputs, "divergence", "q3")
    return q3_score(divergence.float(), normalized_entropy_for_ranking(inputs, "q3"))
