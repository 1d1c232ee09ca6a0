"""The same curve by two routes: the local loop (`tip-verl demo`) and verl's own trainer on the same world.

Both start from the task's shipped teacher and warm-started student with the local demo's settings (LoopConfig
defaults, `--steps` and `--eval-every` aside). The local loop runs once per `--seeds` entry (its seed-to-seed
spread is the yardstick); verl runs `examples/run_demo_world_cpu.sh` once, on the world
`python -m tip_verl.worlds.demo` writes (the local loop's seed-0 problems, in its order). One figure: held-out
greedy accuracy and KL to the teacher on the student's own samples (moving average over `--smooth` steps)
against the step: on the advantage route KL(student || teacher) per token, the sampled-token k1 (the local
`kl/teacher`, verl's `-tip/teacher_reward/mean`); on the loss route (`--route loss`, forward KL over the
vocabulary, verl's `tip_forward_kl_topk` at topk = vocabulary) the loss at the selected tokens (the local
`actor/loss`, verl's `actor/tip_loss/selected_loss_mean`).
Prints the accuracy at each evaluation, the gap between verl and the local mean, and whether it lies within the
local seeds' range.

    nice python experiments/compare_verl_local.py --out verl-vs-local --steps 200 --eval-every 25 --seeds 0 1 2

Finished runs are reused when the command is run again (a local run resumes from its checkpoint; the verl run is
skipped once its summary exists; --verl-metrics reads a finished verl run's metrics.jsonl instead).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "run_demo_world_cpu.sh"


def route_config(route: str) -> dict:
    """The LoopConfig keys of a route both drivers can run: tip_opd, or the loss route with forward KL (verl's
    top-k distillation loss over the whole vocabulary)."""
    return {"route": route, **({"loss": "forward_kl"} if route == "loss" else {})}


def local_run(task: str, route: str, seed: int, steps: int, eval_every: int, out: Path) -> list[dict]:
    """One local loop run (resumed if interrupted); its metrics.jsonl records."""
    import torch

    from tip_verl.local.assets import load_role
    from tip_verl.local.checkpoint import read_metrics
    from tip_verl.local.loop import LoopConfig, train
    from tip_verl.local.tasks import get_task

    config = LoopConfig(task=task, seed=seed, steps=steps, eval_every=eval_every, **route_config(route))
    torch.set_num_threads(config.threads)
    done = out / "done.json"
    if done.exists() and json.loads(done.read_text())["route"] != config.route:
        raise SystemExit(f"{out} holds a local run of another route; use another --out for --route {route}.")
    if not done.exists():
        world = get_task(task)
        teacher, _ = load_role(world, "teacher")
        student, _ = load_role(world, "student")
        if train(config, out, teacher, student, resume=True) != "completed":
            raise SystemExit(f"local run {out} interrupted; run the command again to resume it.")
        done.write_text(json.dumps(config.to_dict()))
    return read_metrics(out)


def verl_run(task: str, route: str, steps: int, eval_every: int, out: Path) -> Path:
    """examples/run_demo_world_cpu.sh at the same settings; returns its metrics.jsonl."""
    metrics, summary = out / "metrics.jsonl", out / "summary.txt"
    if summary.exists():
        return metrics
    env = {**os.environ, "TASK": task, "ROUTE": route, "STEPS": str(steps), "VAL_EVERY": str(eval_every),
           "WORLD_DIR": str(out / "world"), "OUT_DIR": str(out), "VERL_FILE_LOGGER_PATH": str(metrics),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "run.log", "w") as log:
        subprocess.run(["bash", str(SCRIPT)], env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    summary.write_text((out / "run.log").read_text().rstrip().splitlines()[-1] + "\n")
    return metrics


# The KL curve of each route, (local key, verl key, sign, label): on the advantage route the sampled-token k1 on
# every response token; on the loss route the loss itself, the forward KL over the vocabulary at the selected
# tokens (each driver ranks its own: the local loop on the exact reverse KL, verl on the current loss).
KL_CURVES = {
    "advantage": ("kl/teacher", "tip/teacher_reward/mean", -1.0, "KL(student || teacher), k1 per token"),
    "loss": ("actor/loss", "actor/tip_loss/selected_loss_mean", 1.0, "KL(teacher || student), selected tokens"),
}


def local_curves(records: list[dict], route: str) -> tuple[dict[int, float], dict[int, float]]:
    key = KL_CURVES[route][0]
    accuracy = {r["step"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}
    kl = {r["step"]: r[key] for r in records if key in r and r["step"] > 0}
    return accuracy, kl


def verl_curves(metrics: Path, world_dir: Path, route: str) -> tuple[dict[int, float], dict[int, float]]:
    from tip_verl.worlds.demo import WORLD_FILE, read_verl_metrics, validation_curve

    _, key, sign, _ = KL_CURVES[route]
    steps = read_verl_metrics(metrics)
    world = json.loads((world_dir / WORLD_FILE).read_text())
    kl = {step: sign * data[key] for step, data in steps.items() if key in data}
    if not kl:
        raise SystemExit(f"{metrics} has no {key!r}: the {route} route's KL curve needs it (is it a run of the {route} route?).")
    return validation_curve(world, steps), kl


def smooth(curve: dict[int, float], window: int) -> tuple[list[int], list[float]]:
    steps = sorted(curve)
    values = [statistics.mean(curve[s] for s in steps[max(0, i - window + 1) : i + 1]) for i in range(len(steps))]
    return steps, values


def plot(local: list[tuple[dict, dict]], verl: tuple[dict, dict], window: int, seeds: list[int], route: str,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (accuracy, kl) in enumerate(local):
        label = f"local loop, seeds {seeds[0]}-{seeds[-1]}" if i == 0 else None
        acc_ax.plot(sorted(accuracy), [accuracy[s] for s in sorted(accuracy)], color="tab:blue", alpha=0.5,
                    marker="o", label=label)
        kl_ax.plot(*smooth(kl, window), color="tab:blue", alpha=0.5, label=label)
    accuracy, kl = verl
    acc_ax.plot(sorted(accuracy), [accuracy[s] for s in sorted(accuracy)], color="tab:red", marker="s", lw=2,
                label="verl main_ppo (CPU)")
    kl_ax.plot(*smooth(kl, window), color="tab:red", lw=2, label="verl main_ppo (CPU)")
    acc_ax.set(xlabel="step", ylabel="held-out greedy accuracy", title="accuracy")
    kl_ax.set(xlabel="step", ylabel=f"{KL_CURVES[route][3]} ({window}-step mean)",
              title=f"KL to the teacher on the student's samples ({route} route)")
    for ax in (acc_ax, kl_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(local: list[tuple[dict, dict]], verl: tuple[dict, dict], window: int) -> str:
    """Markdown table: accuracy at each evaluation step (local mean and range over seeds, verl, gap), then the
    KL over the last `window` steps."""
    lines = ["| step | local mean | local min-max | verl | gap (verl - local mean) | within local range |",
             "|---|---|---|---|---|---|"]
    for step in sorted(set.intersection(*(set(a) for a, _ in local), set(verl[0]))):
        values = [accuracy[step] for accuracy, _ in local]
        mean, low, high = statistics.mean(values), min(values), max(values)
        lines.append(f"| {step} | {mean:.1%} | {low:.1%}-{high:.1%} | {verl[0][step]:.1%} | "
                     f"{verl[0][step] - mean:+.1%} | {'yes' if low <= verl[0][step] <= high else 'no'} |")

    def tail_mean(kl: dict[int, float]) -> float:
        return statistics.mean(kl[s] for s in sorted(kl)[-window:])

    local_kl = [tail_mean(kl) for _, kl in local]
    lines.append(f"\nKL to the teacher, last {window} steps: local {statistics.mean(local_kl):.3f} "
                 f"(seeds {min(local_kl):.3f}-{max(local_kl):.3f}), verl {tail_mean(verl[1]):.3f}")
    return "\n".join(lines)


def main() -> None:
    from tip_verl.local.loop import LoopConfig

    defaults = LoopConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", default=defaults.task)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--route", default="advantage", choices=["advantage", "loss"],
                        help="advantage: tip_opd; loss: the loss route with forward KL over the vocabulary (verl's "
                        "tip_forward_kl_topk at topk = vocabulary) (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="local loop seeds")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window of the KL curves, in steps")
    parser.add_argument("--verl-metrics", type=Path, default=None,
                        help="metrics.jsonl of a finished run_demo_world_cpu.sh run (its world in --out/verl/world)")
    args = parser.parse_args()

    started = time.time()
    local = [local_curves(local_run(args.task, args.route, seed, args.steps, args.eval_every,
                                    args.out / "local" / f"seed{seed}"), args.route)
             for seed in args.seeds]
    print(f"local loop: {len(args.seeds)} runs in {time.time() - started:.0f} s", flush=True)
    verl_dir = args.out / "verl"
    metrics = args.verl_metrics or verl_run(args.task, args.route, args.steps, args.eval_every, verl_dir)
    verl = verl_curves(metrics, verl_dir / "world", args.route)
    plot(local, verl, args.smooth, args.seeds, args.route, args.out / "verl_vs_local.png")
    table = report(local, verl, args.smooth)
    (args.out / "report.md").write_text(table + "\n")
    print(table)
    print(f"figure: {args.out / 'verl_vs_local.png'}")


if __name__ == "__main__":
    main()
