"""The `tip-verl` command line: `demo` and `prepare` (the CPU demo and its models), and `doctor` (checks a node
before a verl run)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from tip_verl.core.answer_gate import ANSWER_TEACHER_MODES
from tip_verl.core.config import DIVERGENCE_NAMES, MIX_NAMES, TEACHER_TRUST_NAMES
from tip_verl.core.selection import selection_rule_names

DEMO_HELP = """\
On-policy distillation on 2 CPU cores, end to end, in a few minutes.

A tiny Llama student samples answers to three-digit additions with a scratchpad; a Llama teacher of its size
(both trained by this package and shipped) scores every token. In the default world (--task
add3_scratch_mistaken) the student arrives with a confident, systematic mistake: it drops the final carry of
four-digit sums. TIP picks the tokens worth the teacher signal (entropy x divergence); on the default loss
route the full-vocabulary reverse KL to the teacher is backpropagated at those tokens only, on --route
advantage verl's `tip_opd` estimator and PPO policy loss update the student. With --adv-estimator grpo the
student learns from the checker's 0/1 reward only.

Writes to --out: metrics.jsonl (one line per step), learning_curves.png, quadrant_map.png (one batch's tokens on
the entropy x divergence plane, selected tokens marked), summary.json, checkpoint.pt. Ctrl-C stops after the
current step and checkpoints; run the same command with --resume to continue.

Teacher and student come from the package's shipped checkpoints, or from the user cache
(~/.cache/tip-verl, or $TIP_VERL_CACHE) when retrained; --retrain-teacher / --retrain-student train them again.
"""


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from tip_verl.core.distill_losses import NO_TEACHER_TERM, divergence_names
    from tip_verl.core.schedule import SCHEDULE_NAMES
    from tip_verl.local.loop import ADV_ESTIMATORS, RANK_BY, ROUTES, LoopConfig
    from tip_verl.local.tasks import TASKS

    defaults = LoopConfig()
    run = parser.add_argument_group("run")
    run.add_argument("--task", default=defaults.task, choices=sorted(TASKS), help="synthetic task (default: %(default)s)")
    run.add_argument("--adv-estimator", default=defaults.adv_estimator, choices=ADV_ESTIMATORS,
                     help="tip_opd: teacher signal on TIP-selected tokens; grpo: outcome reward only (default: %(default)s)")
    run.add_argument("--steps", type=int, default=None, help=f"on-policy steps (default: {defaults.steps}; "
                     "with --resume, the saved run's, or extend it)")
    run.add_argument("--seed", type=int, default=defaults.seed, help="seed of sampling and prompts (default: %(default)s)")
    run.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default: %(default)s)")
    run.add_argument("--prompts-per-step", type=int, default=defaults.prompts_per_step, help="(default: %(default)s)")
    run.add_argument("--group-size", type=int, default=defaults.group_size, help="rollouts per prompt (default: %(default)s)")
    run.add_argument("--eval-every", type=int, default=defaults.eval_every, help="(default: %(default)s)")
    run.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (default: %(default)s)")
    run.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                     help="linear learning-rate warm-up (default: %(default)s)")
    run.add_argument("--temperature", type=float, default=defaults.temperature,
                     help="sampling temperature; student and teacher distributions use it too (default: %(default)s)")
    route = parser.add_argument_group("route of the teacher signal")
    route.add_argument("--route", default=defaults.route, choices=ROUTES,
                       help="advantage: r_t = log pT - log pS as a per-token advantage in verl's policy loss (tip_opd, "
                       "what verl runs with a sampled-token teacher); loss: the paper's full-vocabulary divergence "
                       "backpropagated at the selected tokens (default: %(default)s)")
    route.add_argument("--loss", default=defaults.loss, choices=divergence_names("logits"),
                       help="divergence of the loss route (default: %(default)s)")
    route.add_argument("--rank-by", default=defaults.rank_by, choices=RANK_BY,
                       help="divergence axis of the rules on the loss route: exact_kl (full vocabulary, the paper's) "
                       "or sampled (the --divergence estimate from the sampled token) (default: %(default)s)")
    tip = parser.add_argument_group("TIP (the keys of verl's algorithm.tip)")
    tip.add_argument(
        "--rule", default=defaults.tip.rule, choices=selection_rule_names(), help="(default: %(default)s)"
    )
    tip.add_argument("--ratio", type=float, default=defaults.tip.ratio, help="share of each response's tokens "
                     "given the teacher signal (default: %(default)s)")
    tip.add_argument("--mix", default=defaults.tip.mix, choices=MIX_NAMES, help="teacher_only: pure OPD on the "
                     "selected tokens; replace / add: hybrid with GRPO (default: %(default)s)")
    tip.add_argument("--divergence", default=defaults.tip.divergence, choices=DIVERGENCE_NAMES, help="(default: %(default)s)")
    tip.add_argument("--coef", type=float, default=defaults.tip.coef, help="teacher reward weight (default: %(default)s)")
    tip.add_argument("--teacher-trust", default=defaults.tip.teacher_trust, choices=TEACHER_TRUST_NAMES,
                     help="checked: a prompt whose rollouts' checker outcomes contradict the teacher (it endorses a "
                     "wrong rollout, or prefers the wrong ones) gets GRPO alone (default: %(default)s)")
    tip.add_argument("--endorse-prob", type=float, default=defaults.tip.endorse_prob,
                     help="checked trust: the teacher endorses a rollout whose every token has pT >= this; "
                     "answer teacher: it confirms an answer token with pT >= this (default: %(default)s)")
    tip.add_argument("--answer-teacher", default=defaults.tip.answer_teacher, choices=ANSWER_TEACHER_MODES,
                     help="the checker over the teacher on the answer (the tokens after --answer-marker): confirm: "
                     "there the teacher keeps only the tokens of accepted rollouts it would write itself, the rest "
                     "get GRPO (needs --mix replace or add); confirm_on_evidence: the same, in the steps where an "
                     "accepted answer holds a token the teacher would not write; confirm_on_record: the same, while "
                     "the teacher refutes more than --answer-tolerance of the answers accepted so far in the run "
                     "(default: %(default)s)")
    tip.add_argument("--answer-tolerance", type=float, default=defaults.tip.answer_tolerance,
                     help="confirm_on_record: the share of accepted answers the teacher may refute and keep the "
                     "answer (default: %(default)s)")
    tip.add_argument("--answer-marker", default=None,
                     help="the text the answer follows (default: the task's answer separator, ';')")
    tip_loss = parser.add_argument_group("loss route outcome split and teacher schedule (verl's algorithm.tip_loss)")
    by_outcome = [NO_TEACHER_TERM, *divergence_names("logits")]
    tip_loss.add_argument("--correct-loss", default=None, choices=by_outcome,
                          help="divergence for rollouts the checker accepts; none: no teacher term, with --mix replace "
                          "their selected tokens get the GRPO advantage (TRACE's outcome split; default: --loss)")
    tip_loss.add_argument("--wrong-loss", default=None, choices=by_outcome,
                          help="the same for rollouts the checker rejects (default: --loss)")
    tip_loss.add_argument("--teacher-schedule", default="constant", choices=SCHEDULE_NAMES,
                          help="teacher-coefficient schedule: warmup_anneal keeps it for --teacher-warmup-steps, then "
                          "takes it linearly to 0 over --teacher-anneal-steps (default: %(default)s)")
    tip_loss.add_argument("--teacher-warmup-steps", type=int, default=0, help="(default: %(default)s)")
    tip_loss.add_argument("--teacher-anneal-steps", type=int, default=0, help="(default: %(default)s)")
    io = parser.add_argument_group("output and models")
    io.add_argument("--out", type=Path, default=Path("tip-verl-demo"), help="output folder (default: %(default)s)")
    io.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    io.add_argument("--retrain-teacher", action="store_true", help="train the teacher again (cached afterwards)")
    io.add_argument("--retrain-student", action="store_true", help="warm-start the student again (cached afterwards)")


def answer_marker(args: argparse.Namespace) -> Optional[str]:
    """--answer-marker, or the task's answer separator when --answer-teacher needs one."""
    if args.answer_marker is not None or args.answer_teacher == "always":
        return args.answer_marker
    from tip_verl.local.tasks import get_task

    return get_task(args.task).answer_separator


def demo_config(args: argparse.Namespace):
    from tip_verl.core.config import TipConfig
    from tip_verl.core.distill_losses import TipLossConfig
    from tip_verl.local.loop import LoopConfig

    saved = args.out / "config.json"
    if args.resume and saved.exists():
        config = LoopConfig(**json.loads(saved.read_text()))
    else:
        tip = TipConfig(rule=args.rule, ratio=args.ratio, mix=args.mix, divergence=args.divergence,
                        coef=args.coef, seed=args.seed, teacher_trust=args.teacher_trust,
                        endorse_prob=args.endorse_prob, answer_teacher=args.answer_teacher,
                        answer_marker=answer_marker(args), answer_tolerance=args.answer_tolerance)
        config = LoopConfig(task=args.task, adv_estimator=args.adv_estimator, tip=tip, seed=args.seed, lr=args.lr,
                            prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                            eval_every=args.eval_every, threads=args.threads, warmup_steps=args.warmup_steps,
                            temperature=args.temperature, route=args.route, loss=args.loss, rank_by=args.rank_by,
                            tip_loss=TipLossConfig(correct_loss=args.correct_loss, wrong_loss=args.wrong_loss,
                                                   schedule=args.teacher_schedule,
                                                   warmup_steps=args.teacher_warmup_steps,
                                                   anneal_steps=args.teacher_anneal_steps))
    if args.steps is not None:
        config.steps = args.steps
    return config


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from tip_verl.local.assets import load_role
    from tip_verl.local.checkpoint import checkpoint_step, read_metrics
    from tip_verl.local.loop import train
    from tip_verl.local.progress import progress
    from tip_verl.local.report import method_name, summarize, write_plots
    from tip_verl.local.tasks import get_task

    try:
        config = demo_config(args)
    except ValueError as error:  # a setting that cannot work: the message names it, no traceback needed
        print(f"tip-verl demo: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(config.threads)
    task = get_task(config.task)
    started = time.time()
    teacher, teacher_card = load_role(task, "teacher", retrain=args.retrain_teacher)
    student, _ = load_role(task, "student", retrain=args.retrain_student)
    start = checkpoint_step(args.out) if args.resume else 0
    with progress(config.steps, start, f"{method_name(config).split()[0]} {task.name}") as shown:
        status = train(config, args.out, teacher, student, resume=args.resume, on_step=shown.update)
    records = read_metrics(args.out)
    write_plots(records, args.out, config)
    summary = summarize(records, config, teacher_card, time.time() - started)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(summary["table"])
    if status == "interrupted":
        print(f"Interrupted after step {records[-1]['step']}: resume with `tip-verl demo --out {args.out} --resume`.")
        return 130
    print(f"Metrics, plots and checkpoint in {args.out}/")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    import torch

    from tip_verl.local.assets import BelowTarget, cache_dir, train_and_save
    from tip_verl.local.tasks import get_task

    torch.set_num_threads(args.threads)
    for role in args.roles:
        try:
            path = train_and_save(get_task(args.task), role, args.out or cache_dir())
        except BelowTarget as refused:
            print(f"not saved: {refused}", file=sys.stderr)
            return 1
        print(f"wrote {path}.safetensors")
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    from tip_verl.verl_ext.doctor import run_doctor as check_this_node

    return check_this_node(require_patch=args.require_patch)


def build_parser() -> argparse.ArgumentParser:
    from tip_verl.local.tasks import DEFAULT_TASK, TASKS

    parser = argparse.ArgumentParser(prog="tip-verl", description="Token-importance on-policy distillation (TIP) "
                                     "mixed with GRPO, as a verl plugin. Subcommands run its CPU demo "
                                     "(tip_verl.local) and check a verl install.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="distil a tiny student from a tiny teacher on CPU (a few minutes)",
                          description=DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_arguments(demo)
    demo.set_defaults(func=run_demo)
    prepare = sub.add_parser("prepare", help="train the teacher and warm-start the student of a task",
                             description="Supervised training of a task's teacher and warm-started student, "
                             "deterministic from a fixed seed. Written to the user cache unless --out is given.")
    prepare.add_argument("--task", default=DEFAULT_TASK, choices=sorted(TASKS))
    prepare.add_argument("--roles", nargs="+", default=["teacher", "student"], choices=["teacher", "student"])
    prepare.add_argument("--out", type=Path, default=None, help="root folder; a task's models go to <out>/<task>/")
    prepare.add_argument("--threads", type=int, default=1)
    prepare.set_defaults(func=run_prepare)
    doctor = sub.add_parser("doctor", help="check this node before a verl run: versions, registrations, patch",
                            description="Run on every node: prints the versions of verl, torch, transformers, ray "
                            "(and vLLM / SGLang / Megatron-Core if installed), whether `import verl` registers "
                            "tip_opd, tip_sync and the tip_* losses, and whether patches/"
                            "verl-0.9.1-tip-selected-logprobs.patch is applied to this node's verl. Exits 1, "
                            "with the fix, when something is missing.")
    doctor.add_argument("--require-patch", action="store_true",
                        help="fail (not only warn) when the selected-token patch is not applied")
    doctor.set_defaults(func=run_doctor)
    return parser


def quiet_verl_import() -> None:
    """verl warns at import about GPU engines and accelerators a CPU demo never uses."""
    warnings.filterwarnings("ignore", message=".*engine is not available.*")
    os.environ.setdefault("VERL_LOGGING_LEVEL", "ERROR")


def main(argv: list[str] | None = None) -> int:
    quiet_verl_import()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
