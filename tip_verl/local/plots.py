"""PNG plots of a run: learning curves, and the entropy x divergence quadrant map of one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from tip_verl.core.config import TipConfig  # noqa: E402
from tip_verl.core.scores import masked_quantile  # noqa: E402

QUADRANT_COLORS = {1: "#d62728", 2: "#ff7f0e", 3: "#9467bd", 4: "#7f7f7f"}
QUADRANT_NAMES = {
    1: "Q1 high H, high D",
    2: "Q2 high H, low D",
    3: "Q3 low H, high D",
    4: "Q4 low H, low D",
}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def _moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def learning_curves(records: list[dict], path: Path, title: str) -> None:
    """Held-out greedy accuracy, sampled reward and KL to the teacher against the step."""
    panels = [
        ("eval/accuracy", "held-out accuracy (greedy)"),
        ("reward/mean", "rollout reward (sampled)"),
        ("kl/teacher", "KL(student || teacher) per token"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (key, label) in zip(axes, panels):
        steps, values = _series(records, key)
        if key.startswith("eval"):
            ax.plot(steps, values, marker="o", ms=3)
        else:  # per-step values are noisy: raw faint, a moving average on top
            ax.plot(steps, values, alpha=0.25, color="C0")
            ax.plot(steps, _moving_average(values, 20), color="C0", label="mean of 20 steps")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    teacher = [r["eval/teacher_accuracy"] for r in records if "eval/teacher_accuracy" in r]
    if teacher:
        axes[0].axhline(teacher[0], color="k", ls="--", lw=1, label=f"teacher {teacher[0]:.2f}")
        axes[0].legend(loc="lower right")
    axes[0].set_ylim(-0.02, 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quadrant_thresholds(batch: dict, tip: TipConfig) -> tuple[float, float]:
    """The entropy and divergence thresholds the batch's quadrant labels were computed with
    (`tip_verl.core.scores.quadrant_labels`): the absolute ones of `tip` when set, else the batch
    `quadrant_quantile` over valid tokens. batch holds response_mask, entropy and divergence, each (N, T)."""
    mask = batch["response_mask"]

    def threshold(absolute: Optional[float], values: torch.Tensor) -> float:
        return absolute if absolute is not None else masked_quantile(values, mask, tip.quadrant_quantile).item()

    return threshold(tip.entropy_threshold, batch["entropy"]), threshold(tip.divergence_threshold, batch["divergence"])


def threshold_source(tip: TipConfig) -> str:
    """How the quadrant thresholds were chosen, for the legend."""
    quantile = f"batch quantile {tip.quadrant_quantile:g}"
    entropy = f"H = {tip.entropy_threshold:g}" if tip.entropy_threshold is not None else f"H at {quantile}"
    divergence = f"D = {tip.divergence_threshold:g}" if tip.divergence_threshold is not None else f"D at {quantile}"
    return f"{entropy}, {divergence}"


def quadrant_map(batch: dict, path: Path, title: str, tip: TipConfig, divergence_label: Optional[str] = None) -> None:
    """Every valid response token of one batch on the entropy x divergence plane, coloured by quadrant;
    the tokens TIP selected are drawn filled, the others hollow. Dashed lines: the quadrant thresholds of `tip`,
    the config the batch was scored with (its divergence estimate names the vertical axis, unless
    `divergence_label` says what the batch's divergence is, e.g. the exact KL of the loss route)."""
    mask = batch["response_mask"].bool()
    entropy = batch["entropy"][mask]
    divergence = batch["divergence"][mask]
    selected = batch["selected"][mask]
    quadrant = batch["quadrant"][mask]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for q in (4, 2, 1, 3):
        in_q = quadrant == q
        share = in_q.float().mean().item()
        picked = in_q & selected
        ax.scatter(entropy[in_q & ~selected], divergence[in_q & ~selected], s=14, facecolors="none",
                   edgecolors=QUADRANT_COLORS[q], linewidths=0.7, alpha=0.6)
        ax.scatter(entropy[picked], divergence[picked], s=14, color=QUADRANT_COLORS[q], alpha=0.9,
                   label=f"{QUADRANT_NAMES[q]}: {share:.0%} of tokens, {picked.sum().item() / max(1, in_q.sum().item()):.0%} selected")
    entropy_cut, divergence_cut = quadrant_thresholds(batch, tip)
    ax.axvline(entropy_cut, color="k", ls="--", lw=0.8, label=f"thresholds: {threshold_source(tip)}")
    ax.axhline(divergence_cut, color="k", ls="--", lw=0.8)
    ax.scatter([], [], s=14, color="k", label="filled: selected by TIP")
    ax.scatter([], [], s=14, facecolors="none", edgecolors="k", label="hollow: dropped")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xscale("symlog", linthresh=1e-2)
    ax.set_xlabel("student entropy H (nats, linear below 0.01)")
    label = divergence_label or f"{tip.divergence} estimate of KL(student || teacher)"
    ax.set_ylabel(f"divergence D ({label}, linear below 0.001)")
    ax.set_title(f"{title}\n{int(selected.sum())} of {int(mask.sum())} tokens selected")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # keeps the outside legend and the long axis label
    plt.close(fig)


def load_batch(path: Path) -> dict:
    return torch.load(path, weights_only=True)
