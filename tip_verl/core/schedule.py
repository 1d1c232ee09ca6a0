"""Schedule of the teacher coefficient: a pure function of the training step.

The loss route multiplies its per-token distillation losses by `teacher_coef_multiplier(step, ...)`, on top
of verl's own `distillation.distillation_loss.distillation_loss_coef`. TRACE-style hybrids keep the teacher
at full weight during a warm-up and then anneal it away, leaving the outcome reward (GRPO) alone.
"""

from __future__ import annotations

import math

SCHEDULE_NAMES = ("constant", "linear", "warmup_anneal")


def teacher_coef_multiplier(
    step: int, schedule: str = "constant", warmup_steps: int = 0, anneal_steps: int = 0, final_coef: float = 0.0
) -> float:
    """Multiplier of the teacher term at `step` (0-based: verl's global_steps - 1).

    constant: 1 at every step.
    linear: 1 at step 0, linearly to `final_coef` at step `anneal_steps`, then `final_coef`.
    warmup_anneal: 1 for the first `warmup_steps` steps, then linearly to `final_coef` over `anneal_steps`
        steps, then `final_coef`.
    """
    check_schedule(schedule, warmup_steps, anneal_steps, final_coef)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"Training step {step!r} must be a non-negative integer (verl's global_steps - 1).")
    if schedule == "constant":
        return 1.0
    start = warmup_steps if schedule == "warmup_anneal" else 0
    progress = min(max(step - start, 0) / anneal_steps, 1.0)
    return 1.0 + (final_coef - 1.0) * progress


def check_schedule(schedule: str, warmup_steps: int, anneal_steps: int, final_coef: float) -> None:
    """Raise a clear error for an unknown schedule or out-of-range settings."""
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"algorithm.tip_loss.schedule={schedule!r} is not known; set one of {list(SCHEDULE_NAMES)}.")
    for name, value in (("warmup_steps", warmup_steps), ("anneal_steps", anneal_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"algorithm.tip_loss.{name}={value!r} must be a non-negative integer (steps).")
    if schedule != "constant" and anneal_steps < 1:
        raise ValueError(
            f"algorithm.tip_loss.schedule={schedule} needs algorithm.tip_loss.anneal_steps >= 1 "
            "(the number of steps over which the teacher coefficient goes from 1 to final_coef)."
        )
    if isinstance(final_coef, bool) or not isinstance(final_coef, (int, float)) or not math.isfinite(final_coef):
        raise ValueError(f"algorithm.tip_loss.final_coef={final_coef!r} must be a finite number, e.g. 0.0.")
    if final_coef < 0:
        raise ValueError(f"algorithm.tip_loss.final_coef={final_coef!r} must be >= 0: a negative one trains away.")
