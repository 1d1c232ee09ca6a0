"""Where the teacher and the warm-started student of a task come from: user cache, shipped assets, or training.

Lookup order for each model: the user cache (written by a retrain), then the checkpoints shipped in
`tip_verl/assets/<task>/`, then supervised training from scratch (written to the user cache).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from tip_verl.local.models import count_params, load_model, save_model
from tip_verl.local.pretrain import supervised_train
from tip_verl.local.tasks import Task

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets"
MODEL_SEED = 0


class BelowTarget(RuntimeError):
    """A teacher or warm-started student whose held-out accuracy is below its task's target."""


def check_target(task: Task, role: str, card: dict, where: str) -> None:
    """Refuse a `role` model of `task` whose card's held-out accuracy is below the task plan's target."""
    size, plan, target = task.plan.role(role)
    accuracy = card["sft_accuracy"]
    if accuracy >= target:
        return
    key = "teacher_target" if role == "teacher" else "student.stop_at"
    raise BelowTarget(
        f"The {role} of {task.name} {where} reached {accuracy:.1%} held-out accuracy after {card['sft_steps']} "
        f"supervised steps, below its target {target:.1%} (TrainPlan.{key}). Change the task's TrainPlan in "
        f"tip_verl/local/tasks.py: more steps (TrainPlan.{role}.max_steps={plan.max_steps}), a larger model "
        f"(TrainPlan.{role}_size={size}) or another learning rate (TrainPlan.{role}.lr={plan.lr:g}, warm-up "
        f"TrainPlan.{role}.warmup={plan.warmup}), then `tip-verl prepare --task {task.name} --roles {role}`."
    )


def cache_dir() -> Path:
    """$TIP_VERL_CACHE, else $XDG_CACHE_HOME/tip-verl, else ~/.cache/tip-verl."""
    if os.environ.get("TIP_VERL_CACHE"):
        return Path(os.environ["TIP_VERL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tip-verl"


def max_positions(task: Task) -> int:
    """Room for BOS + the longest prompt + the response budget, rounded up."""
    longest_prompt = max(len(task.prompt(p)) for p in task.heldout(64))
    return 16 * ((1 + longest_prompt + task.max_new_tokens) // 16 + 1)


def train_and_save(task: Task, role: str, root: Path, log: Callable[[str], None] = print) -> Path:
    """Train the `role` (teacher or student) of `task` by its task's plan and save it under `root`.

    Raises BelowTarget, saving nothing, when the model ends below the plan's target accuracy.
    """
    size, plan, _ = task.plan.role(role)
    log(f"training the {role} of {task.name} ({size}) ...")
    torch.manual_seed(MODEL_SEED)
    model, card = supervised_train(task, size, plan, MODEL_SEED, max_positions(task), log=log, role=role)
    check_target(task, role, card, "just trained")
    path = root / task.name / role
    save_model(model, size, path, {"task": task.name, "role": role, "params": count_params(model), **card})
    return path


def load_role(task: Task, role: str, retrain: bool = False, log: Callable[[str], None] = print):
    """The `role` model of `task` in eval mode and its card; raises BelowTarget for one below the task's target."""
    candidates = [cache_dir() / task.name / role, SHIPPED_DIR / task.name / role]
    path = next((p for p in candidates if p.with_suffix(".safetensors").exists()), None)
    if retrain or path is None:
        path = train_and_save(task, role, cache_dir(), log)
    model, card = load_model(path, task.tokenizer())
    check_target(task, role, card, f"saved in {path}.safetensors")
    model.eval()
    return model, {**card, "path_kind": "cache" if path.is_relative_to(cache_dir()) else "shipped"}

