"""Export a task of the local demo (``tip-verl demo``) to verl's trainer: same models, same prompts, same reward.

Writes into ``--out``::

    teacher/, student/      the task's teacher and warm-started student (``tip_verl.local.assets.load_role``) as
                            Hugging Face checkpoints (LlamaForCausalLM, safetensors, float32) with a tokenizer
    data/train.parquet      verl RL rows: the problems the local loop draws, in its order (``data.shuffle=false``)
    data/val.parquet        the task's held-out problems the local loop evaluates on
    verl_overrides.txt      hydra overrides, one per line, that give verl the local loop's settings (LoopConfig)
    world.json              the task, paths, the LoopConfig the overrides come from, the teacher's and the student's
                            held-out greedy accuracy

The tokenizer maps each character to the id the local models were trained with (``CharTokenizer``), and its
chat template renders a one-message chat as ``<bos>`` + the prompt, with no generation prompt: verl's agent loop
always applies the chat template, and this makes the ids it feeds the model the local loop's ``BOS + prompt``.
The reward is the task's own checker (``tip_verl/worlds/reward.py:task_score``).

    python -m tip_verl.worlds.demo --task add3_scratch --out DIR
    python -m tip_verl.worlds.demo --out DIR --report METRICS.jsonl --seconds S   # the run's summary line
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path
from typing import Optional

import pandas as pd

from tip_verl.local.assets import load_role
from tip_verl.local.evaluate import greedy_accuracy
from tip_verl.local.loop import LoopConfig
from tip_verl.local.tasks import DEFAULT_TASK, TASKS, Problem, Task, get_task
from tip_verl.local.tokenizer import CharTokenizer

REWARD_PATH = Path(__file__).with_name("reward.py")
REWARD_NAME = "task_score"
WORLD_FILE = "world.json"
OVERRIDES_FILE = "verl_overrides.txt"
ROLES = ("teacher", "student")
# A one-message chat -> "<bos>" + the message: the ids the local models saw (no role tags, no generation prompt).
CHAT_TEMPLATE = (
    "{% if messages | length != 1 or messages[0]['role'] != 'user' %}"
    "{{ raise_exception('this tokenizer renders one user message (the task prompt)') }}{% endif %}"
    "{{ bos_token }}{{ messages[0]['content'] }}"
)


def data_source(task: Task) -> str:
    return f"tip_verl/{task.name}"


def hf_tokenizer(tokenizer: CharTokenizer):
    """A ``PreTrainedTokenizerFast`` with the ids of ``tokenizer``: PAD, BOS, EOS, then one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = tokenizer.specials + list(tokenizer.alphabet)
    pad, bos, eos = (words[i] for i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id))
    backend = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(words)}, unk_token=pad))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one piece per character
    backend.decoder = decoders.Fuse()  # characters back together, no spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos, chat_template=CHAT_TEMPLATE
    )


def prompt_length(task: Task) -> int:
    """BOS + the longest prompt of the task (its prompts have a fixed width)."""
    return 1 + max(len(task.prompt(p)) for p in task.heldout(64))


def train_problems(task: Task, config: LoopConfig) -> list[Problem]:
    """The problems the local loop trains on, in its order: `prompts_per_step` a step from Random(seed)."""
    rng = random.Random(config.seed)
    return [task.sample(rng) for _ in range(config.steps * config.prompts_per_step)]


def rows(task: Task, problems: list[Problem], split: str) -> list[dict]:
    """verl RL dataset rows: the prompt as a one-message chat, the answer, and the problem for the checker."""
    return [
        {
            "data_source": data_source(task),
            "prompt": [{"role": "user", "content": task.prompt(problem)}],
            "ability": "arithmetic",
            "reward_model": {"style": "rule", "ground_truth": task.answer(problem)},
            "extra_info": {"task": task.name, "problem": list(problem), "split": split, "index": index},
        }
        for index, problem in enumerate(problems)
    ]


def hydra_value(value) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def tip_overrides(config: LoopConfig) -> list[str]:
    return [f"+algorithm.tip.{key}={hydra_value(value)}" for key, value in dataclasses.asdict(config.tip).items()]


def route_overrides(config: LoopConfig, vocab_size: int) -> list[str]:
    """How verl gets the local loop's teacher signal (adv_estimator, route, loss, mix)."""
    if config.adv_estimator == "grpo":
        # the teacher still scores (its k3 is logged as actor/distillation/loss) but adds nothing to the loss
        return ["algorithm.adv_estimator=grpo", "distillation.distillation_loss.loss_mode=k3",
                "distillation.distillation_loss.use_task_rewards=true",
                "distillation.distillation_loss.distillation_loss_coef=0.0"]
    if config.route == "advantage":  # verl's own loss term at coef 0; the teacher enters through the advantage
        return ["algorithm.adv_estimator=tip_opd", "trainer.v1.trainer_mode=tip_sync", *tip_overrides(config),
                "distillation.distillation_loss.loss_mode=k3",
                "distillation.distillation_loss.use_task_rewards=true",
                "distillation.distillation_loss.distillation_loss_coef=0.0",
                "distillation.distillation_loss.use_policy_gradient=false"]
    if config.loss != "forward_kl":
        raise ValueError(
            f"LoopConfig.loss={config.loss!r} on the loss route has no verl counterpart: verl's teacher gives top-k "
            "log-probs and its top-k loss is the forward KL (with topk = the vocabulary, the exact one). Export "
            "with loss=forward_kl (--loss forward_kl)."
        )
    if config.tip.mix == "replace":
        raise ValueError(
            "LoopConfig.tip.mix='replace' on the loss route has no verl counterpart (verl adds its task loss on "
            "every token or on none): export with mix=teacher_only or add (--mix)."
        )
    with_task_loss = config.tip.mix == "add"
    return ["algorithm.adv_estimator=grpo", "trainer.v1.trainer_mode=tip_sync", *tip_overrides(config),
            "actor_rollout_ref.actor.calculate_entropy=true",
            "distillation.distillation_loss.loss_mode=tip_forward_kl_topk",
            f"distillation.distillation_loss.topk={vocab_size}",
            f"distillation.distillation_loss.use_task_rewards={hydra_value(with_task_loss)}",
            f"distillation.distillation_loss.distillation_loss_coef={config.tip.coef}",
            "distillation.distillation_loss.use_policy_gradient=false",
            "distillation.distillation_loss.loss_max_clamp=null"]


def verl_overrides(config: LoopConfig, task: Task) -> list[str]:
    """Hydra overrides for ``verl.trainer.main_ppo`` that match the local loop run by `config` on `task`.

    One update per step on the whole batch (mini-batch = batch, one epoch), as the local loop; its learning rate
    (a linear warm-up reaching `lr` at step `warmup_steps`, the first step at lr / warmup_steps, then constant)
    is verl's cosine schedule with min_lr_ratio=1 (flat) and 1-indexed steps.
    """
    return [
        f"data.train_batch_size={config.prompts_per_step}",
        f"data.max_prompt_length={prompt_length(task)}",
        f"data.max_response_length={task.max_new_tokens}",
        "data.shuffle=false",
        f"actor_rollout_ref.rollout.n={config.group_size}",
        f"actor_rollout_ref.rollout.temperature={config.temperature}",
        "actor_rollout_ref.rollout.top_k=-1",
        "actor_rollout_ref.rollout.top_p=1.0",
        "actor_rollout_ref.rollout.val_kwargs.temperature=0",  # greedy, as the local evaluation
        "actor_rollout_ref.rollout.val_kwargs.n=1",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={config.prompts_per_step}",
        "actor_rollout_ref.actor.ppo_epochs=1",
        f"actor_rollout_ref.actor.optim.lr={config.lr}",
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
        f"actor_rollout_ref.actor.optim.clip_grad={config.grad_clip}",
        f"actor_rollout_ref.actor.optim.lr_warmup_steps={config.warmup_steps}",
        "actor_rollout_ref.actor.optim.lr_scheduler_type=cosine",
        "actor_rollout_ref.actor.optim.min_lr_ratio=1.0",
        "actor_rollout_ref.actor.optim.zero_indexed_step=false",
        f"actor_rollout_ref.actor.clip_ratio={config.clip_ratio}",
        f"actor_rollout_ref.actor.clip_ratio_low={config.clip_ratio}",
        f"actor_rollout_ref.actor.clip_ratio_high={config.clip_ratio}",
        f"actor_rollout_ref.actor.loss_agg_mode={config.loss_agg_mode}",
        "actor_rollout_ref.actor.use_kl_loss=false",
        "actor_rollout_ref.actor.entropy_coeff=0",
        f"algorithm.norm_adv_by_std_in_grpo={hydra_value(config.norm_adv_by_std_in_grpo)}",
        "algorithm.use_kl_in_reward=false",
        *route_overrides(config, task.tokenizer().vocab_size),
        f"trainer.total_training_steps={config.steps}",
        f"trainer.test_freq={config.eval_every}",
        "trainer.val_before_train=true",
    ]


def export_models(task: Task, out: Path) -> dict:
    """Save the task's teacher and student (float32) with the tokenizer under out/<role>; return the models."""
    tokenizer = hf_tokenizer(task.tokenizer())
    models = {}
    for role in ROLES:
        model, _ = load_role(task, role)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
        models[role] = model
    return models


def export(out: Path, config: Optional[LoopConfig] = None) -> dict:
    """Write the world of `config` (default: the local demo's defaults on the advantage route, the one verl runs)
    under `out`; return world.json's content."""
    config = config or LoopConfig(route="advantage")
    task = get_task(config.task)
    out = Path(out)
    models = export_models(task, out)
    heldout = task.heldout(config.eval_size)
    paths = {"teacher": out / "teacher", "student": out / "student",
             "train": out / "data" / "train.parquet", "val": out / "data" / "val.parquet"}
    paths["train"].parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows(task, train_problems(task, config), "train")).to_parquet(paths["train"])
    pd.DataFrame(rows(task, heldout, "val")).to_parquet(paths["val"])
    overrides = verl_overrides(config, task)
    (out / OVERRIDES_FILE).write_text("\n".join(overrides) + "\n")
    world = {
        "task": task.name,
        "data_source": data_source(task),
        "paths": {name: str(path) for name, path in paths.items()},
        "reward": {"path": str(REWARD_PATH), "name": REWARD_NAME},
        "loop_config": config.to_dict(),
        "accuracy": {role: greedy_accuracy(model, task, heldout) for role, model in models.items()},
    }
    (out / WORLD_FILE).write_text(json.dumps(world, indent=2))
    return world


def read_verl_metrics(path: Path) -> dict[int, dict]:
    """verl's file-logger lines ({"step": k, "data": {...}}) merged per step (validation and training log apart)."""
    steps: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            steps.setdefault(record["step"], {}).update(record["data"])
    return steps


def validation_key(world: dict) -> str:
    """verl's greedy validation accuracy of the world's data source (the checker's score is its `acc`)."""
    return f"val-core/{world['data_source']}/acc/mean@1"


def validation_curve(world: dict, steps: dict[int, dict]) -> dict[int, float]:
    key = validation_key(world)
    return {step: data[key] for step, data in sorted(steps.items()) if key in data}


def summary_line(world: dict, steps: dict[int, dict], seconds: float) -> str:
    """`validation accuracy: <start> -> <end> (teacher <t>) in <N> steps, <S> s` of a finished verl run."""
    curve = validation_curve(world, steps)
    if not curve:
        raise ValueError(f"no {validation_key(world)} in the metrics: run with trainer.val_before_train=true and "
                         "trainer.test_freq > 0.")
    trained = max((step for step in steps if step > 0), default=0)
    start, end = curve[min(curve)], curve[max(curve)]
    return (f"validation accuracy: {start:.1%} -> {end:.1%} (teacher {world['accuracy']['teacher']:.1%}) "
            f"in {trained} steps, {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory of the exported world")
    parser.add_argument("--task", default=DEFAULT_TASK, choices=sorted(TASKS), help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of training data to write (default: the local loop's steps)")
    parser.add_argument("--route", default="advantage", choices=["advantage", "loss"],
                        help="advantage: verl's tip_opd, the route verl runs with a sampled-token teacher; loss: the "
                        "local loss route as verl's top-k forward KL (default: %(default)s; the local demo's "
                        "default is the loss route with reverse KL, which verl's teacher cannot give)")
    parser.add_argument("--report", type=Path, default=None, metavar="METRICS_JSONL",
                        help="print the summary line of a finished verl run of the world in --out instead")
    parser.add_argument("--seconds", type=float, default=0.0, help="with --report: the run's wall time")
    args = parser.parse_args()
    if args.report is not None:
        world = json.loads((args.out / WORLD_FILE).read_text())
        print(summary_line(world, read_verl_metrics(args.report), args.seconds))
        return
    config = LoopConfig(task=args.task, route=args.route, **({"loss": "forward_kl"} if args.route == "loss" else {}))
    if args.steps is not None:
        config.steps = args.steps
    world = export(args.out, config)
    loop = world["loop_config"]
    print(f"task {world['task']}: teacher {world['accuracy']['teacher']:.1%}, "
          f"student {world['accuracy']['student']:.1%} held-out greedy accuracy")
    print("local loop settings (LoopConfig): " + ", ".join(
        f"{key}={loop[key]}" for key in ("adv_estimator", "route", "lr", "warmup_steps", "temperature",
                                         "prompts_per_step", "group_size", "steps", "eval_every", "eval_size")
    ) + ", tip=" + json.dumps(loop["tip"]))
    print(f"verl overrides: {args.out / OVERRIDES_FILE}")


if __name__ == "__main__":
    main()
