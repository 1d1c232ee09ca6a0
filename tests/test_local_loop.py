"""The local on-policy loop learns: a few TIP-OPD steps make the student more likely to say what the teacher
says (the exact
reverse KL to the teacher falls). Uses the shipped teacher and student of the default task (no training here)."""

import dataclasses
import json

import pytest
import torch

from tip_verl.core.config import TipConfig
from tip_verl.local.assets import load_role
from tip_verl.local.loop import LoopConfig, train
from tip_verl.local.rollout import response_logits, sample
from tip_verl.local.tasks import DEFAULT_TASK, get_task

SMOKE = LoopConfig(
    task=DEFAULT_TASK,
    adv_estimator="tip_opd",
    route="advantage",
    tip=TipConfig(rule="soft_or", ratio=0.5, mix="teacher_only"),
    steps=20,
    lr=1e-4,
    eval_every=1000,
    eval_size=16,
    checkpoint_every=1000,
)


@pytest.fixture(scope="module")
def task_and_models():
    torch.set_num_threads(1)
    task = get_task(DEFAULT_TASK)
    teacher, _ = load_role(task, "teacher")
    student, _ = load_role(task, "student")
    return task, teacher, student


def reverse_kl_to_teacher(task, teacher, student) -> float:
    """Exact KL(student || teacher) per token, full vocabulary, along the teacher's greedy responses to 64
    held-out problems: what on-policy distillation minimises, on fixed contexts."""
    problems = task.heldout(64, seed=7)
    probe = sample(teacher, task.tokenizer(), [task.prompt(p) for p in problems], task.max_new_tokens, greedy=True)
    with torch.no_grad():
        log_ps = torch.log_softmax(response_logits(student, probe), dim=-1)
        log_pt = torch.log_softmax(response_logits(teacher, probe), dim=-1)
    kl = (log_ps.exp() * (log_ps - log_pt)).sum(dim=-1)
    return ((kl * probe.response_mask).sum() / probe.response_mask.sum()).item()


def train_a_copy(config: LoopConfig, task_and_models, out_dir) -> tuple[float, float, list[dict]]:
    """Train a copy of the shipped student with `config`: its KL to the teacher before and after, and the records."""
    task, teacher, student = task_and_models
    student = _copy(student)
    before = reverse_kl_to_teacher(task, teacher, student)
    assert train(config, out_dir, teacher, student) == "completed"
    after = reverse_kl_to_teacher(task, teacher, student)
    return before, after, [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_tip_opd_moves_the_student_toward_the_teacher(task_and_models, tmp_path):
    before, after, records = train_a_copy(SMOKE, task_and_models, tmp_path)
    assert [r["step"] for r in records] == list(range(SMOKE.steps + 1))
    assert 0.45 <= records[1]["tokens/trained_fraction"] <= 0.55
    assert after < 0.95 * before, (before, after)  # 0.794 -> 0.718 on the shipped models


def test_grpo_runs_and_resumes_without_losing_or_repeating_steps(task_and_models, tmp_path):
    task, teacher, student = task_and_models
    config = dataclasses.replace(SMOKE, adv_estimator="grpo", steps=2)
    assert train(config, tmp_path, teacher, _copy(student)) == "completed"
    resumed = dataclasses.replace(config, steps=3)
    assert train(resumed, tmp_path, teacher, _copy(student), resume=True) == "completed"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["tokens/trained_fraction"] == 1.0


def _copy(model):
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    return clone


def test_resumed_random_rule_run_repeats_the_uninterrupted_one(task_and_models, tmp_path):
    task, teacher, student = task_and_models
    config = dataclasses.replace(SMOKE, tip=TipConfig(rule="random", ratio=0.3, mix="teacher_only"), steps=3)
    assert train(config, tmp_path / "whole", teacher, _copy(student)) == "completed"
    first_two = dataclasses.replace(config, steps=2)
    assert train(first_two, tmp_path / "split", teacher, _copy(student)) == "completed"
    assert train(config, tmp_path / "split", teacher, _copy(student), resume=True) == "completed"

    def last_step(run):
        record = json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1])
        # time and process memory are measurements of the run, not of what it trained
        return {key: value for key, value in record.items() if not key.startswith(("time", "mem/max_rss"))}

    whole, split = last_step("whole"), last_step("split")
    assert whole["step"] == 3 and whole == split  # same tokens drawn, same update, same metrics
