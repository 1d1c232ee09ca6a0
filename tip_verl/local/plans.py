"""How a task's teacher and student are made: model sizes, supervised plans, and the accuracy each must reach.

Each registered task carries a `TrainPlan` (`Task.plan`), by default a 3 x 96 teacher and a 3 x 96 student; a
task that the default plan does not fit gets its own, e.g.
`TrainPlan(teacher=replace(DEFAULT_TEACHER_PLAN, max_steps=3000))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelSize:
    layers: int
    hidden: int
    heads: int


@dataclass(frozen=True)
class SftPlan:
    """max_steps of AdamW at lr (linear warm-up over `warmup` steps, cosine decay to 0 at max_steps), batch_size
    problems per step, easy_share of them from the task's `draw_easy`; evaluate every eval_every steps (and at
    the last) on eval_size held-out problems; stop when accuracy >= stop_at (None: never)."""

    max_steps: int
    lr: float
    batch_size: int
    eval_every: int
    eval_size: int
    stop_at: Optional[float]
    warmup: int = 50
    weight_decay: float = 0.0
    easy_share: float = 0.0


DEFAULT_TEACHER_PLAN = SftPlan(max_steps=1000, lr=2e-3, batch_size=64, eval_every=100, eval_size=256, stop_at=0.985)
DEFAULT_STUDENT_PLAN = SftPlan(max_steps=3000, lr=1e-3, batch_size=32, eval_every=25, eval_size=256, stop_at=0.15)


@dataclass(frozen=True)
class TrainPlan:
    """The teacher's and the student's size and supervised plan.

    Both models are 3 layers x 96 hidden (3 heads) by default: a 2 x 48 student barely moves in the demo loop
    where a 3 x 96 one, warm-started alike, learns from its teacher.
    teacher_target: the least held-out accuracy a teacher may be saved or used with. The student's target is
    `student.stop_at`: its warm start stops at the first evaluation that reaches it.
    """

    teacher_size: ModelSize = ModelSize(layers=3, hidden=96, heads=3)
    teacher: SftPlan = DEFAULT_TEACHER_PLAN
    student_size: ModelSize = ModelSize(layers=3, hidden=96, heads=3)
    student: SftPlan = DEFAULT_STUDENT_PLAN
    teacher_target: float = 0.95

    def role(self, role: str) -> tuple[ModelSize, SftPlan, float]:
        """Size, supervised plan and target accuracy of `role` ("teacher" or "student")."""
        if role == "teacher":
            return self.teacher_size, self.teacher, self.teacher_target
        if role == "student":
            return self.student_size, self.student, self.student.stop_at or 0.0
        raise ValueError(f"role={role!r}; choose 'teacher' or 'student'.")
