"""What a finished (or interrupted) run leaves behind: plots and the final table."""

from __future__ import annotations

from pathlib import Path

from tip_verl.local.loop import LoopConfig
from tip_verl.local.plots import learning_curves, load_batch, quadrant_map


def method_name(config: LoopConfig) -> str:
    if config.adv_estimator == "grpo":
        return "GRPO"
    tip = config.tip
    route = "tip_opd" if config.route == "advantage" else f"{config.loss} loss"
    name = f"{route} rule={tip.rule} ratio={tip.ratio:g} mix={tip.mix}"
    extras = [f"teacher_trust={tip.teacher_trust}"] if tip.teacher_trust != "always" else []
    if tip.answer_teacher != "always":
        extras.append(f"answer_teacher={tip.answer_teacher} after {tip.answer_marker!r}")
    return " ".join([name, *extras])


def divergence_label(config: LoopConfig) -> str:
    """What the divergence axis of the run's TIP scores is."""
    if config.route == "loss" and config.rank_by == "exact_kl":
        return "exact KL(student || teacher) over the vocabulary"
    return f"{config.tip.divergence} estimate of KL(student || teacher)"


def write_plots(records: list[dict], out: Path, config: LoopConfig) -> None:
    """learning_curves.png, and quadrant_map.png when a TIP batch was saved."""
    learning_curves(records, out / "learning_curves.png", f"{config.task}: {method_name(config)}")
    batch_path = out / f"batch_step{config.dump_batch_at}.pt"
    if batch_path.exists():
        batch = load_batch(batch_path)
        if "selected" in batch:
            quadrant_map(batch, out / "quadrant_map.png",
                         f"Student tokens of step {config.dump_batch_at}: {method_name(config)}", config.tip,
                         divergence_label(config))


def _mean(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values) if values else float("nan")


def summarize(records: list[dict], config: LoopConfig, teacher_card: dict, seconds: float) -> dict:
    """Accuracy before and at the end, teacher accuracy, share of tokens trained, timings; with a text table.

    The result is the held-out accuracy of the LAST evaluation. The best over evaluations is not reported: the
    evaluations share one held-out set, so their maximum is biased upward (a best checkpoint would need its own
    selection split).
    """
    evals = [r for r in records if "eval/accuracy" in r]
    steps = [r for r in records if r["step"] > 0]
    summary = {
        "task": config.task,
        "method": method_name(config),
        "steps": steps[-1]["step"] if steps else 0,
        "teacher_accuracy": records[0].get("eval/teacher_accuracy") if records else None,
        "teacher_params": teacher_card.get("params"),
        "student_accuracy_before": evals[0]["eval/accuracy"] if evals else None,
        "student_accuracy_final": evals[-1]["eval/accuracy"] if evals else None,
        "student_accuracy_final_step": evals[-1]["step"] if evals else None,
        "tokens_in_loss_fraction": _mean(steps, "tokens/trained_fraction"),
        "tokens_with_signal_fraction": _mean(steps, "tokens/nonzero_advantage_fraction"),
        "seconds_per_step": _mean(steps, "time/step"),
        "wall_seconds": round(seconds, 1),
    }
    rows = [
        ("task", summary["task"]),
        ("method", summary["method"]),
        ("steps", f"{summary['steps']} ({summary['seconds_per_step']:.2f} s/step, {seconds:.0f} s this session)"),
        ("teacher accuracy", f"{summary['teacher_accuracy']:.3f}"),
        ("student accuracy before", f"{summary['student_accuracy_before']:.3f}"),
        ("student accuracy final", f"{summary['student_accuracy_final']:.3f} "
                                   f"(step {summary['student_accuracy_final_step']}, last evaluation)"),
        ("tokens in the loss", f"{summary['tokens_in_loss_fraction']:.1%}"),
        ("tokens with a non-zero advantage", f"{summary['tokens_with_signal_fraction']:.1%}"),
    ]
    width = max(len(k) for k, _ in rows)
    summary["table"] = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return summary
