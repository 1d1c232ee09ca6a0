"""Probe of the default world's design: how confident the student's mistake is, against how fast it is fixed.

`add3_scratch_mistaken`'s student is warm-started on the responses of `add3_scratch_flawed`'s teacher (it drops
the final carry of four-digit sums: `;078` for 1078) and stopped at its first evaluation at or above --stop-at;
the shipped student is the one of --stop-at 0.45 (the same file, bit for bit). This script warm-starts the student
at another --stop-at (or, with --converged, takes the shipped flawed teacher, 1000 steps, as the student), then
trains it with the local loop against the correct teacher: once with the demo's defaults (Soft-OR 50%, loss
route, --loss) and once with GRPO. Prints the student's warm-start card, each run's held-out accuracy curve, its
final accuracy on the problems the student was taught wrong and on the others, and the quadrant shares of the
distillation run's first batch (default median split): does the confident mistake populate Q3, and how fast is
it corrected?

    nice python experiments/probe_mistaken_student.py --out probe20 --stop-at 0.20 --steps 300
    nice python experiments/probe_mistaken_student.py --out probe35 --stop-at 0.35
    nice python experiments/probe_mistaken_student.py --out probe-converged --converged --steps 300

--stop-at is on the real task's checker, so at most about 50% (the flawed half is always wrong). The student is
saved under --out and reused; each run resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from tip_verl.local.assets import MODEL_SEED, load_role, max_positions
from tip_verl.local.loop import LoopConfig, train
from tip_verl.local.models import count_params, load_model, save_model
from tip_verl.local.pretrain import supervised_train
from tip_verl.local.tasks import get_task

WORLD = get_task("add3_scratch_mistaken")


def warm_started_student(out: Path, stop_at: float) -> Path:
    """The default world's student plan, stopped at `stop_at` (trained once, saved under `out`)."""
    path = out / "student"
    if not path.with_suffix(".safetensors").exists():
        size, plan, _ = WORLD.plan.role("student")
        torch.manual_seed(MODEL_SEED)
        model, card = supervised_train(WORLD, size, replace(plan, stop_at=stop_at), MODEL_SEED, max_positions(WORLD),
                                       role="student")
        save_model(model, size, path, {"task": WORLD.name, "role": "student", "params": count_params(model), **card})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=LoopConfig().steps, help="(default: the demo's, %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-at", type=float, default=WORLD.plan.student.stop_at,
                        help="end the warm start at this accuracy (default: the shipped student's, %(default)s)")
    parser.add_argument("--loss", default="reverse_kl", help="the distillation run's divergence")
    parser.add_argument("--converged", action="store_true", help="the shipped flawed teacher is the student")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    flawed = get_task("add3_scratch_flawed")
    if args.converged:
        print("student: the shipped flawed teacher,", load_role(flawed, "teacher")[1], flush=True)
    else:
        student_path = warm_started_student(args.out, args.stop_at)
        print("student:", json.loads(student_path.with_suffix(".json").read_text()), flush=True)
    teacher, _ = load_role(WORLD, "teacher")
    runs = {f"soft_or 50%, loss route, {args.loss}": {"loss": args.loss}, "GRPO": {"adv_estimator": "grpo"}}
    for name, overrides in runs.items():
        folder = args.out / name.replace(" ", "_").replace(",", "").replace("%", "pct")
        student = load_role(flawed, "teacher")[0] if args.converged else load_model(student_path, WORLD.tokenizer())[0]
        config = LoopConfig(task=WORLD.name, seed=args.seed, steps=args.steps, eval_every=max(1, args.steps // 6),
                            eval_size=512, **overrides)
        started = time.time()
        train(config, folder, teacher, student, resume=True)
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evals = [r for r in records if "eval/accuracy" in r]
        curve = ", ".join(f"{r['step']}: {r['eval/accuracy']:.1%}" for r in evals)
        print(f"{name}: {curve} ({time.time() - started:.0f} s)", flush=True)
        print(f"  final, on the problems the student was taught wrong / right: "
              f"{evals[-1]['eval/accuracy_student_wrong']:.1%} / {evals[-1]['eval/accuracy_student_right']:.1%}",
              flush=True)
        first_step = next(r for r in records if r["step"] == 1)
        if "tip/quadrant/q3_share" in first_step:
            shares = {f"Q{k}": f"{first_step[f'tip/quadrant/q{k}_share']:.1%}" for k in (1, 2, 3, 4)}
            print(f"  quadrant shares at step 1: {shares}", flush=True)


if __name__ == "__main__":
    main()
