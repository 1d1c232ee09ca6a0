"""Probe of a world design: a student that learned a systematic, confident mistake, taught by a correct teacher.

The student is warm-started by `add3_scratch`'s student plan on the responses of `add3_scratch_flawed`'s teacher
(it drops the final carry of four-digit sums: `;078` for 1078), then trained by the local loop against
`add3_scratch`'s correct teacher: once with the demo's defaults (Soft-OR 50%, loss route) and once with GRPO.
Prints the student's warm-start card, each run's held-out accuracy curve, and the quadrant shares of the
distillation run's first batch (default median split): does the confident mistake populate Q3, and how fast is
it corrected?

    nice python benchmarks/probe_mistaken_student.py --out probe-mistaken-student
    nice python benchmarks/probe_mistaken_student.py --out probe-stop35 --stop-at 0.35   # a longer warm start
    nice python benchmarks/probe_mistaken_student.py --out probe-converged --converged    # the flawed teacher itself

--stop-at 0.45 makes the shipped student of the default task, add3_scratch_mistaken (the same file, bit for bit).
--stop-at ends the warm start at the first evaluation at or above it (the real task's checker, so at most about
50%: the flawed half is always wrong); --converged takes the shipped flawed teacher as the student (1000 steps,
right on every problem but the four-digit sums). The student is saved under --out and reused; each run resumes
from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from tip_verl.local.assets import MODEL_SEED, load_role, max_positions
from tip_verl.local.evaluate import evaluation
from tip_verl.local.loop import LoopConfig, train
from tip_verl.local.models import count_params, load_model, save_model
from tip_verl.local.pretrain import supervised_train
from tip_verl.local.tasks import get_task



def mistaken_student(out: Path, stop_at: Optional[float]):
    """The student plan of add3_scratch (stopped at `stop_at`, None: the plan's), trained on the flawed teacher's
    responses (saved once under `out`)."""
    path = out / "student"
    world, flawed = get_task("add3_scratch"), get_task("add3_scratch_flawed")
    if not path.with_suffix(".safetensors").exists():
        size, plan, _ = world.plan.role("student")
        if stop_at is not None:
            plan = replace(plan, stop_at=stop_at)
        torch.manual_seed(MODEL_SEED)
        model, card = supervised_train(flawed, size, plan, MODEL_SEED, max_positions(world), role="teacher")
        save_model(model, size, path, {"task": flawed.name, "role": "mistaken student", "params": count_params(model),
                                       **card})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=LoopConfig().steps, help="(default: the demo's, %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-at", type=float, default=None, help="end the warm start at this accuracy")
    parser.add_argument("--loss", default="reverse_kl", help="the distillation run's divergence")
    parser.add_argument("--converged", action="store_true", help="the shipped flawed teacher is the student")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    world = get_task("add3_scratch")
    flawed = get_task("add3_scratch_flawed")
    if args.converged:
        print("student: the shipped flawed teacher,", load_role(flawed, "teacher")[1], flush=True)
    else:
        student_path = mistaken_student(args.out, args.stop_at)
        print("student:", json.loads(student_path.with_suffix(".json").read_text()), flush=True)
    teacher, _ = load_role(world, "teacher")
    runs = {f"soft_or 50%, loss route, {args.loss}": {"loss": args.loss}, "GRPO": {"adv_estimator": "grpo"}}
    for name, overrides in runs.items():
        folder = args.out / name.replace(" ", "_").replace(",", "").replace("%", "pct")
        student = load_role(flawed, "teacher")[0] if args.converged else load_model(student_path, world.tokenizer())[0]
        config = LoopConfig(task=world.name, seed=args.seed, steps=args.steps, eval_every=max(1, args.steps // 6),
                            eval_size=512, **overrides)
        started = time.time()
        train(config, folder, teacher, student, resume=True)
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        curve = ", ".join(f"{r['step']}: {r['eval/accuracy']:.1%}" for r in records if "eval/accuracy" in r)
        print(f"{name}: {curve} ({time.time() - started:.0f} s)", flush=True)
        slices = evaluation(student, flawed, flawed.heldout(config.eval_size))
        print(f"  final, on the problems the flawed teacher gets wrong / right: "
              f"{slices['eval/accuracy_teacher_wrong']:.1%} / {slices['eval/accuracy_teacher_right']:.1%}", flush=True)
        first_step = next(r for r in records if r["step"] == 1)
        if "tip/quadrant/q3_share" in first_step:
            shares = {f"Q{k}": f"{first_step[f'tip/quadrant/q{k}_share']:.1%}" for k in (1, 2, 3, 4)}
            print(f"  quadrant shares at step 1: {shares}", flush=True)


if __name__ == "__main__":
    main()
