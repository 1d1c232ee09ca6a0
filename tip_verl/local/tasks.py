"""Synthetic, verifiable tasks behind a registry: a prompt, a reference response, and a checker (the reward).

A problem is a tuple of ints. Problems whose hash falls in the held-out bucket are never sampled for training,
so the greedy evaluation runs on problems neither model saw.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, replace
from typing import Callable, Optional

from tip_verl.local.plans import DEFAULT_STUDENT_PLAN, DEFAULT_TEACHER_PLAN, ModelSize, TrainPlan
from tip_verl.local.tokenizer import CharTokenizer

Problem = tuple[int, ...]
HELDOUT_BUCKETS = 20  # one problem in 20 is held out
# Draws in a row without a new held-out problem after which `Task.heldout` concludes the task has no more:
# with uniform draws, all 34 held-out problems of a 720-problem space turn up within a few thousand draws.
HELDOUT_STALL_DRAWS = 100_000


@dataclass(frozen=True)
class Task:
    """A verifiable task.

    name: registry key. alphabet: every character prompts and responses use.
    max_new_tokens: generation budget, enough for the longest reference response plus EOS.
    draw: a random problem. prompt / solution: the texts of a problem (solution: the reference response
    the teacher learns, without EOS). answer: the string the checker expects at the end of the response.
    plan: how the task's teacher and student are trained, and the accuracy each must reach.
    teacher_solution: the response the teacher learns instead of `solution` (None: `solution`): a teacher with a
    known, systematic mistake on the problems where the two differ (`teacher_is_wrong`).
    student_solution: the same for the student's warm start (`student_is_wrong`): a student that arrives with a
    systematic, confident mistake for the teacher to correct.
    draw_easy: an easier problem that shows the model where to look (None: the task has none); the plan's
    `easy_share` of each supervised batch is drawn from it.
    """

    name: str
    alphabet: str
    max_new_tokens: int
    draw: Callable[[random.Random], Problem]
    prompt: Callable[[Problem], str]
    solution: Callable[[Problem], str]
    answer: Callable[[Problem], str]
    answer_separator: str
    plan: TrainPlan = TrainPlan()
    draw_easy: Optional[Callable[[random.Random], Problem]] = None
    teacher_solution: Optional[Callable[[Problem], str]] = None
    student_solution: Optional[Callable[[Problem], str]] = None

    def taught(self, role: str) -> Optional[Callable[[Problem], str]]:
        """The flawed response `role` ("teacher" or "student") is taught instead of `solution`, if any."""
        if role not in ("teacher", "student"):
            raise ValueError(f"role={role!r}; choose 'teacher' or 'student'.")
        return self.teacher_solution if role == "teacher" else self.student_solution

    def reference(self, role: str) -> Callable[[Problem], str]:
        """The response `role` ("teacher" or "student") is trained to write."""
        return self.taught(role) or self.solution

    def taught_wrong(self, role: str, problem: Problem) -> bool:
        """Whether `role` was taught a wrong response for `problem` (never, without a flawed reference)."""
        flawed = self.taught(role)
        return flawed is not None and flawed(problem) != self.solution(problem)

    def teacher_is_wrong(self, problem: Problem) -> bool:
        return self.taught_wrong("teacher", problem)

    def student_is_wrong(self, problem: Problem) -> bool:
        return self.taught_wrong("student", problem)

    def check(self, problem: Problem, response: str) -> float:
        """Outcome reward: 1.0 if the text after the last answer separator is the right answer, else 0.0."""
        if self.answer_separator not in response:
            return 0.0
        return float(response.rsplit(self.answer_separator, 1)[1] == self.answer(problem))

    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer(self.alphabet)

    def sample(self, rng: random.Random, easy: bool = False) -> Problem:
        """A training problem (never a held-out one), from `draw_easy` when `easy`."""
        draw = self.draw_easy if easy else self.draw
        if draw is None:
            raise ValueError(f"Task {self.name} has no draw_easy; set its plan's easy_share to 0.")
        while True:
            problem = draw(rng)
            if not is_heldout(problem):
                return problem

    def heldout(self, n: int, seed: int = 12345) -> list[Problem]:
        """`n` distinct held-out problems, the same for every run of a given seed.

        Raises ValueError when the task has fewer than `n`: HELDOUT_STALL_DRAWS draws in a row found no new one.
        """
        rng, found, draws_since_new = random.Random(seed), {}, 0
        while len(found) < n:
            problem = self.draw(rng)
            if is_heldout(problem) and problem not in found:
                found[problem] = None
                draws_since_new = 0
            else:
                draws_since_new += 1
                if draws_since_new == HELDOUT_STALL_DRAWS:
                    raise ValueError(
                        f"Task {self.name!r} has only {len(found)} held-out problems (those whose hash falls in one "
                        f"bucket of {HELDOUT_BUCKETS}; no new one in {HELDOUT_STALL_DRAWS} draws) but {n} are asked "
                        f"for. Widen the problems its `draw` covers to about {HELDOUT_BUCKETS} x {n} = "
                        f"{HELDOUT_BUCKETS * n} or more (e.g. more digits), or lower the evaluation sizes to at most "
                        f"{len(found)}: TrainPlan.teacher.eval_size, TrainPlan.student.eval_size and "
                        "LoopConfig.eval_size (the models' max_positions also reads 64 held-out problems)."
                    )
        return list(found)


def is_heldout(problem: Problem) -> bool:
    return zlib.crc32(repr(problem).encode()) % HELDOUT_BUCKETS == 0


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task` to TASKS; refused (ValueError) when it has fewer held-out problems than its plan evaluates on."""
    task.heldout(max(task.plan.teacher.eval_size, task.plan.student.eval_size))
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[name]


def _digits(n: int, width: int) -> list[int]:
    """Digits of n, least significant first, `width` of them."""
    return [(n // 10**i) % 10 for i in range(width)]


def addition_scratchpad(width: int) -> Task:
    """`width`-digit addition with a column-by-column scratchpad, then the sum.

    "482+596=" -> "2+6=8,8+9=17,4+5+1=10;1078": each column from the least significant one, "+1" when the
    previous column carried. Most tokens copy a digit of the prompt or a separator; the decisive ones are the
    column sums, whether a carry is written, and the answer read back from the sums.

    The student has the default plan's size, the teacher's (a smaller one learns this scratchpad too slowly for a
    demo, docs/demo.md), and its warm start stops at its first evaluation at 20%.
    """
    student = replace(DEFAULT_STUDENT_PLAN, stop_at=0.2)

    def solution(p: Problem) -> str:
        a, b = p
        carry, steps = 0, []
        for x, y in zip(_digits(a, width), _digits(b, width)):
            steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={x + y + carry}")
            carry = (x + y + carry) // 10
        return ",".join(steps) + ";" + str(a + b)

    return Task(
        name=f"add{width}_scratch",
        alphabet="0123456789+=,;",
        max_new_tokens=len(solution((10**width - 1, 10**width - 1))) + 1,
        draw=lambda rng: (rng.randrange(10**width), rng.randrange(10**width)),
        prompt=lambda p: f"{p[0]:0{width}d}+{p[1]:0{width}d}=",
        solution=solution,
        answer=lambda p: str(p[0] + p[1]),
        answer_separator=";",
        plan=TrainPlan(student=student),
    )


def addition_reversed(width: int) -> Task:
    """`width`-digit addition, the sum written least significant digit first: "482+596=" -> ";8701".

    Short responses (width + 2 tokens with the EOS): fast, and easy for every method once the model knows
    where to look. Trained on uniform problems only, a teacher stays at chance on the first two answer digits:
    a units digit (a0 + b0) % 10 tells nothing about a0 alone nor b0 alone, so nothing rewards attending to
    either until the model attends to both; only the last column is found, through its carry out, whose
    chance grows with each of its digits. So 30% of each supervised batch has one operand 0 ("482+000="
    -> ";284"), whose answer copies the other one digit by digit, and shows where each column is.

    Its student is smaller than the default, 2 x 48: the size its shipped model was trained at.
    """
    teacher = replace(DEFAULT_TEACHER_PLAN, easy_share=0.3)
    student = replace(DEFAULT_STUDENT_PLAN, easy_share=0.3)

    def one_operand_zero(rng: random.Random) -> Problem:
        operand = rng.randrange(10**width)
        return (operand, 0) if rng.random() < 0.5 else (0, operand)

    return Task(
        name=f"add{width}_reversed",
        alphabet="0123456789+=;",
        max_new_tokens=width + 3,
        draw=lambda rng: (rng.randrange(10**width), rng.randrange(10**width)),
        prompt=lambda p: f"{p[0]:0{width}d}+{p[1]:0{width}d}=",
        solution=lambda p: ";" + str(p[0] + p[1])[::-1],
        answer=lambda p: str(p[0] + p[1])[::-1],
        answer_separator=";",
        plan=TrainPlan(teacher=teacher, student_size=ModelSize(layers=2, hidden=48, heads=2), student=student),
        draw_easy=one_operand_zero,
    )


def addition_scratchpad_flawed_teacher(width: int) -> Task:
    """`add{width}_scratch` with a teacher that has a known, systematic mistake: when the sum has `width` + 1
    digits, it drops the final carry from the answer ("4+5+1=10;1078" -> "4+5+1=10;078"). Its scratchpad is
    right everywhere; its answer is wrong on about half of the problems (those whose sum is >= 10**width).

    On-policy distillation from it inherits the mistake; only the outcome reward can take the student past it.
    The student is `add{width}_scratch`'s (same plan, same seed). The teacher is trained on its flawed responses
    for the whole plan (no early stop); its target is on the real task's checker, so about 50%.
    """
    base = addition_scratchpad(width)
    teacher = replace(DEFAULT_TEACHER_PLAN, stop_at=None)
    return replace(base, name=f"add{width}_scratch_flawed", teacher_solution=dropped_final_carry(base, width),
                   plan=replace(base.plan, teacher=teacher, teacher_target=0.45))


# Where the mistaken student's warm start stops: later, it is more confident (more Q3 tokens at step 1) and
# slower to correct; sooner, it has not learned the mistake yet (docs/demo.md, "Why this world").
MISTAKEN_STUDENT_STOP_AT = 0.45


def addition_scratchpad_mistaken_student(width: int) -> Task:
    """`add{width}_scratch` with the correct teacher and a student warm-started on `add{width}_scratch_flawed`'s
    mistake: it drops the final carry of sums with `width` + 1 digits, confidently ("...=10;078" for 1078).

    The warm start stops at its first evaluation at or above STOP_AT on the real checker (it can reach about 50%:
    the other half is always wrong). The student then meets each four-digit sum with a confident wrong token
    that the teacher contradicts (Q3, "overconfident and wrong"), which an outcome reward rarely sees corrected:
    the student almost never samples the right digit there (docs/demo.md).
    """
    base = addition_scratchpad(width)
    student = replace(base.plan.student, stop_at=MISTAKEN_STUDENT_STOP_AT)
    return replace(base, name=f"add{width}_scratch_mistaken", student_solution=dropped_final_carry(base, width),
                   plan=replace(base.plan, student=student))


def dropped_final_carry(base: Task, width: int) -> Callable[[Problem], str]:
    """`base`'s scratchpad solution, with the final carry dropped from the answer of sums >= 10**width."""

    def solution(p: Problem) -> str:
        total = p[0] + p[1]
        if total < 10**width:
            return base.solution(p)
        return base.solution(p).rsplit(";", 1)[0] + f";{total % 10**width:0{width}d}"

    return solution


register_task(addition_scratchpad(3))
register_task(addition_reversed(3))
register_task(addition_scratchpad_flawed_teacher(3))
register_task(addition_scratchpad_mistaken_student(3))
DEFAULT_TASK = "add3_scratch_mistaken"
