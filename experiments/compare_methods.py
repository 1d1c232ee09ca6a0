"""The paper's comparison at toy scale: GRPO, full OPD, TIP rules and ratios, and the hybrid, several seeds each.

Every run is the local loop (`tip_verl.local.loop.train`) in its own process with one torch thread, from the
same teacher and warm-started student, with the same step budget. Per method it reports held-out greedy accuracy
at 25% and 50% of the budget and at the end ("final acc", the result, as in the demo's summary: the best over
evaluations of one held-out set is biased upward, so it is not reported), the area under the accuracy curve
(mean accuracy over the evaluations, step 0 included), KL(student || teacher) per token over the last 10% of
steps, the share of response tokens in the loss, the peak activation memory of a training step and the process'
peak RSS, as mean +- the half-width of the 95% interval of the mean over seeds (Student's t).

    nice python experiments/compare_methods.py --out bench-out --route loss --steps 300 --seeds 0 1 2 3 4 --workers 2

Each (route, method, seed) is its own resumable run under <out>/<route>/ (<out>/<task>/<route>/ for a
--task other than the default): run the same command again, in this
session or the next, and finished runs are skipped, unfinished ones resume from their last checkpoint;
--report-only only aggregates what has finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from tip_verl.local.tasks import DEFAULT_TASK, TASKS

METHODS = {
    "GRPO": {"adv_estimator": "grpo"},
    "OPD all tokens": {"tip": {"rule": "all", "ratio": 1.0, "mix": "teacher_only"}},
    "entropy 50%": {"tip": {"rule": "entropy", "ratio": 0.5, "mix": "teacher_only"}},
    "entropy_sample 50%": {"tip": {"rule": "entropy_sample", "ratio": 0.5, "mix": "teacher_only"}},
    "soft_or 50%": {"tip": {"rule": "soft_or", "ratio": 0.5, "mix": "teacher_only"}},
    "soft_or 20%": {"tip": {"rule": "soft_or", "ratio": 0.2, "mix": "teacher_only"}},
    "q3 10%": {"tip": {"rule": "q3", "ratio": 0.1, "mix": "teacher_only"}},
    "random 50%": {"tip": {"rule": "random", "ratio": 0.5, "mix": "teacher_only"}},
    "soft_or 50% + GRPO (replace)": {"tip": {"rule": "soft_or", "ratio": 0.5, "mix": "replace"}},
    "soft_or 50% + GRPO (add)": {"tip": {"rule": "soft_or", "ratio": 0.5, "mix": "add"}},
}
TRACE_METHODS = {  # for --task add3_scratch_flawed, where the outcome reward has to overrule the teacher
    # TRACE's outcome split (loss route): no teacher term on rollouts the checker accepts, GRPO there instead
    "soft_or 50% + GRPO (replace), no teacher on correct": {
        "tip": {"rule": "soft_or", "ratio": 0.5, "mix": "replace"}, "tip_loss": {"correct_loss": "none"}},
    # TRACE's annealed teacher: full weight for 50 steps, then linearly to 0 over 100, GRPO alone after
    "soft_or 50% + GRPO (replace), teacher annealed": {
        "tip": {"rule": "soft_or", "ratio": 0.5, "mix": "replace"},
        "tip_loss": {"schedule": "warmup_anneal", "warmup_steps": 50, "anneal_steps": 100}},
}
TRUST_METHODS = {  # the checker-verified teacher (tip_verl.core.trust): GRPO alone where outcomes contradict it
    "soft_or 50% + GRPO (replace), checked teacher": {
        "tip": {"rule": "soft_or", "ratio": 0.5, "mix": "replace", "teacher_trust": "checked"}},
    "OPD all tokens, checked teacher": {
        "tip": {"rule": "all", "ratio": 1.0, "mix": "teacher_only", "teacher_trust": "checked"}},
    # and the teacher's own greedy answer to each prompt graded by the checker (the demo loop only)
    "soft_or 50% + GRPO (replace), verified teacher": {
        "tip": {"rule": "soft_or", "ratio": 0.5, "mix": "replace", "teacher_trust": "verified"}},
}
LOSS_METHODS = {  # issue: does Q3's small budget fail under reverse KL, and hold up with a mass-covering loss?
    "q3 10%, forward KL": {"tip": {"rule": "q3", "ratio": 0.1, "mix": "teacher_only"}, "loss": "forward_kl"},
    "q3 10%, JSD": {"tip": {"rule": "q3", "ratio": 0.1, "mix": "teacher_only"}, "loss": "jsd"},
    "OPD all tokens, forward KL": {"tip": {"rule": "all", "ratio": 1.0, "mix": "teacher_only"}, "loss": "forward_kl"},
}
HYBRID = {"rule": "soft_or", "ratio": 0.5, "mix": "replace"}
ANSWER_METHODS = {  # the checker over the teacher on the answer (algorithm.tip.answer_teacher), for add3_scratch_flawed
    "soft_or 50% + GRPO (replace), answer gate confirmed": {
        "tip": {**HYBRID, "answer_teacher": "confirm", "answer_marker": ";"}},
    "soft_or 50% + GRPO (replace), answer gate evidence": {
        "tip": {**HYBRID, "answer_teacher": "confirm_on_evidence", "answer_marker": ";"}},
    "soft_or 50% + GRPO (replace), answer gate record": {
        "tip": {**HYBRID, "answer_teacher": "confirm_on_record", "answer_marker": ";"}},
    # and gates the package does not offer (answer_gates.py: experiment code)
    **{f"soft_or 50% + GRPO (replace), answer gate {gate}": {"tip": HYBRID, "answer_gate": gate}
       for gate in ("first", "answer", "verified_answer")},
}
ALL_METHODS = {**METHODS, **TRACE_METHODS, **TRUST_METHODS, **LOSS_METHODS, **ANSWER_METHODS}
T_975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}  # Student's t, 95%
BUDGETS = (0.25, 0.5, 1.0)
# final accuracy by slice, for a task whose teacher (student) was taught a known mistake
SLICES = ("teacher_wrong", "teacher_right", "student_wrong", "student_right")


def table_dir(out: Path, route: str, task: str) -> Path:
    """<out>/<route> on the default task, <out>/<task>/<route> on another: a resumed table never mixes worlds."""
    return out / ("" if task == DEFAULT_TASK else task) / route


def run_dir(out: Path, method: str, seed: int, route: str, task: str) -> Path:
    name = method.replace(" ", "_").replace("%", "pct").replace("(", "").replace(")", "").replace("+", "plus")
    return table_dir(out, route, task) / name / f"seed{seed}"


def run_one(method: str, seed: int, steps: int, out: str, route: str, task_name: str) -> str:
    """One run in a fresh process; returns its folder. Writes done.json last, so a folder without it reruns."""
    import torch

    from tip_verl.local.assets import load_role
    from tip_verl.local.loop import LoopConfig, train
    from tip_verl.local.tasks import get_task

    torch.set_num_threads(1)
    folder = run_dir(Path(out), method, seed, route, task_name)
    overrides = dict(ALL_METHODS[method])
    tip = {"seed": seed, **overrides.pop("tip", {})}
    gate = overrides.pop("answer_gate", None)
    config = LoopConfig(task=task_name, seed=seed, steps=steps, eval_every=max(1, steps // 8), eval_size=512,
                        checkpoint_every=max(1, steps // 4), tip=tip, route=route, **overrides)
    task = get_task(config.task)
    teacher, _ = load_role(task, "teacher")
    student, _ = load_role(task, "student")
    if gate:
        from answer_gates import install

        install(gate, task.tokenizer().encode(task.answer_separator)[0], teacher.lm_head.weight.detach())
    status = train(config, folder, teacher, student, resume=True)
    if status == "completed":
        (folder / "done.json").write_text(json.dumps({"method": method, "seed": seed, "steps": steps}))
    return str(folder)


def summarize_run(folder: Path, steps: int) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = {r["step"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}
    trained = [r for r in records if r["step"] > 0]
    at = {b: evals[max(s for s in evals if s <= b * steps)] for b in BUDGETS}
    final = next(r for r in reversed(records) if "eval/accuracy" in r)
    return {
        **{f"acc@{int(b * 100)}%": v for b, v in at.items()},
        **{key: final[f"eval/accuracy_{key}"] for key in SLICES if f"eval/accuracy_{key}" in final},
        "auc": sum(evals.values()) / len(evals),
        "start": evals[0],
        "kl_end": statistics.mean(r["kl/teacher"] for r in trained[-len(trained) // 10 :]),
        "tokens_in_loss": statistics.mean(r["tokens/trained_fraction"] for r in trained),
        "activations_mb": max(r["mem/saved_activations_mb"] for r in trained),
        "rss_mb": max(r["mem/max_rss_mb"] for r in trained),
        "s_per_step": statistics.median(r["time/step"] for r in trained),  # robust to a pause or a load burst
        "curve": sorted(evals.items()),
    }


def fmt(values: list[float], pct: bool = True, digits: int = 1) -> str:
    """mean ± half-width of the 95% confidence interval of the mean (Student's t), in percent when `pct`."""
    scale = 100 if pct else 1
    mean = scale * statistics.mean(values)
    half = scale * t_975(len(values)) * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def t_975(n: int) -> float:
    """Student's t for a 95% interval of a mean over n values (n - 1 degrees of freedom; beyond the table, the
    1.96 + 2.5 / df approximation, within 0.01 of the exact value)."""
    return T_975.get(n, 1.96 + 2.5 / (n - 1))


def seeds_to_resolve(differences: list[float]) -> str:
    """How many seeds would put 0 outside the 95% interval of the mean paired difference, if the differences
    kept their mean and spread: the smallest n with t(n) * sd / sqrt(n) < |mean|."""
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    if sd == 0:
        return "resolved" if mean != 0 else "never (no difference)"
    for n in range(2, 1001):
        if t_975(n) * sd / n**0.5 < abs(mean):
            return "resolved" if n <= len(differences) else str(n)
    return "> 1000"


def paired_report(summaries: dict, baseline: str) -> str:
    """Each method against `baseline` on the seeds both finished, difference by seed (the same seed draws the
    same problems from the same start): mean ± 95% interval of the differences in AUC, final accuracy and final
    accuracy by slice, and how many seeds would resolve the AUC difference."""
    keys = ["auc", "acc@100%"] + [key for key in SLICES if any(key in r for r in summaries[baseline].values())]
    names = ["AUC", "final"] + [f"final, {key.replace('_', ' ')}" for key in keys[2:]]
    lines = ["| method | seeds | " + " | ".join(f"{name} − {baseline}" for name in names)
             + " | seeds to resolve the AUC difference |", "|---|---|" + "---|" * (len(keys) + 1)]
    for method, runs in summaries.items():
        seeds = sorted(set(runs) & set(summaries[baseline]))
        if method == baseline or len(seeds) < 2:
            continue
        diff = {key: [runs[s][key] - summaries[baseline][s][key] for s in seeds] for key in keys}
        lines.append(f"| {method} | {len(seeds)} | " + " | ".join(fmt(diff[key]) for key in keys)
                     + f" | {seeds_to_resolve(diff['auc'])} |")
    return "\n".join(lines)


def report(out: Path, steps: int, seeds: list[int], route: str, task: str, paired_against: str | None = None) -> str:
    """Markdown table over methods (mean ± 95% interval over the finished seeds) and curves.png; with
    `paired_against`, a second table of each method's differences from that one, seed by seed."""
    by_seed = {method: {s: summarize_run(run_dir(out, method, s, route, task), steps) for s in seeds
                        if (run_dir(out, method, s, route, task) / "done.json").exists()} for method in ALL_METHODS}
    summaries = {method: list(runs.values()) for method, runs in by_seed.items()}
    slices = [key for key in SLICES if any(key in r for runs in summaries.values() for r in runs)]
    header = ("| method | seeds | acc @25% | acc @50% | final acc | " + "".join(
        f"final, {key.replace('_', ' ')} | " for key in slices) + "AUC | KL end | tokens in loss | "
        "activations MB | peak RSS MB | s/step |")
    lines = [header, "|" + "---|" * (11 + len(slices))]
    curves = {}
    for method, runs in summaries.items():
        if not runs:
            continue
        col = lambda key: [r[key] for r in runs]  # noqa: E731
        lines.append(
            f"| {method} | {len(runs)} | {fmt(col('acc@25%'))} | {fmt(col('acc@50%'))} | {fmt(col('acc@100%'))} | "
            + "".join(f"{fmt(col(key))} | " for key in slices)
            + f"{fmt(col('auc'))} | {fmt(col('kl_end'), pct=False, digits=2)} | "
            f"{100 * statistics.mean(col('tokens_in_loss')):.0f}% | "
            f"{max(col('activations_mb')):.1f} | {max(col('rss_mb')):.0f} | {statistics.mean(col('s_per_step')):.2f} |"
        )
        curves[method] = runs
    plot_curves(curves, table_dir(out, route, task) / "curves.png", route)
    if paired_against:
        lines += ["", paired_report(by_seed, paired_against)]
    return "\n".join(lines)


def plot_curves(curves: dict, path: Path, route: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for method, runs in curves.items():
        steps = [s for s, _ in runs[0]["curve"]]
        values = [[acc for _, acc in r["curve"]] for r in runs]
        mean = [statistics.mean(v) for v in zip(*values)]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*values)]
        style = "--" if method == "GRPO" else "-"
        (line,) = ax.plot(steps, mean, style, marker="o", ms=3, label=method)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.12)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"Student accuracy by method, {route} route (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one torch thread each")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(ALL_METHODS),
                        help="(default: all but the TRACE variants, which are for --task add3_scratch_flawed)")
    parser.add_argument("--task", default=DEFAULT_TASK, choices=sorted(TASKS),
                        help="the world (default: %(default)s); add3_scratch_flawed: a teacher that drops the final "
                        "carry of four-digit sums, add3_scratch_mistaken: a student that does (the table then adds "
                        "the final accuracy on the problems that model was taught wrong and right)")
    parser.add_argument("--route", default="advantage", choices=["advantage", "loss"],
                        help="how the teacher signal reaches the student (LoopConfig.route)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--paired-against", choices=list(ALL_METHODS), metavar="METHOD",
                        help="also report each method's difference from METHOD, seed by seed (AUC and final "
                        "accuracy, with how many seeds would resolve the AUC difference)")
    args = parser.parse_args()
    if not args.report_only:
        jobs = [(m, s) for s in args.seeds for m in args.methods
                if not (run_dir(args.out, m, s, args.route, args.task) / "done.json").exists()]
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
            futures = [pool.submit(run_one, m, s, args.steps, str(args.out), args.route, args.task) for m, s in jobs]
            for future in futures:
                print("finished", future.result(), flush=True)
    folder = table_dir(args.out, args.route, args.task)
    folder.mkdir(parents=True, exist_ok=True)
    table = report(args.out, args.steps, args.seeds, args.route, args.task, args.paired_against)
    (folder / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
