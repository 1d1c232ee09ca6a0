"""The local loop's loss route: the paper's full-vocabulary divergence at the selected tokens, ranked on the exact
KL; which tokens each route hands to verl's policy loss; every distribution at the sampling temperature."""

import dataclasses
import json
import math

import pytest
import torch

from tip_verl.core.advantages import TipTokens, select_and_reward
from tip_verl.core.config import TipConfig
from tip_verl.local.loop import LoopConfig, policy_loss_mask, train
from tip_verl.local.rollout import head_logprobs_and_entropy, response_hidden, sample

from test_local_loop import SMOKE, _copy, reverse_kl_to_teacher, task_and_models  # noqa: F401  (fixture)

LOSS_SMOKE = dataclasses.replace(SMOKE, route="loss", warmup_steps=1)


def test_loss_route_moves_the_student_toward_the_teacher(task_and_models, tmp_path):
    task, teacher, student = task_and_models
    student = _copy(student)
    before = reverse_kl_to_teacher(task, teacher, student)
    assert train(LOSS_SMOKE, tmp_path, teacher, student) == "completed"
    after = reverse_kl_to_teacher(task, teacher, student)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 0.45 <= records[1]["tokens/trained_fraction"] <= 0.55
    assert records[1]["tokens/nonzero_advantage_fraction"] == 0.0  # teacher_only: no policy-loss token
    assert math.isfinite(records[-1]["actor/loss"])
    assert after < 0.85 * before, (before, after)  # 0.44 -> 0.30 on the shipped models


def _tokens(selected: torch.Tensor) -> TipTokens:
    zeros = torch.zeros(selected.shape)
    return TipTokens(selected=selected, teacher_reward=zeros, divergence=zeros, quadrant=None)


@pytest.mark.parametrize(
    "route, mix, expected",
    [
        ("advantage", "teacher_only", [[1, 0, 0, 0], [0, 1, 0, 0]]),
        ("advantage", "replace", [[1, 1, 1, 0], [1, 1, 0, 0]]),
        ("advantage", "add", [[1, 1, 1, 0], [1, 1, 0, 0]]),
        ("loss", "teacher_only", [[0, 0, 0, 0], [0, 0, 0, 0]]),
        ("loss", "replace", [[0, 1, 1, 0], [1, 0, 0, 0]]),
        ("loss", "add", [[1, 1, 1, 0], [1, 1, 0, 0]]),
    ],
)
def test_policy_loss_covers_the_tokens_each_route_gives_it(route, mix, expected):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    selected = torch.tensor([[True, False, False, False], [False, True, False, False]])
    config = LoopConfig(route=route, tip=TipConfig(mix=mix))
    assert policy_loss_mask(config, mask, _tokens(selected)).tolist() == expected
    assert policy_loss_mask(dataclasses.replace(config, adv_estimator="grpo"), mask, None).tolist() == mask.tolist()


def test_student_logprobs_use_the_sampling_temperature(task_and_models):
    task, _, student = task_and_models
    rollout = sample(student, task.tokenizer(), [task.prompt(p) for p in task.heldout(4)], task.max_new_tokens)
    with torch.no_grad():
        hidden = response_hidden(student, rollout)
        logits = student.lm_head(hidden).float()
    logp, entropy = head_logprobs_and_entropy(student, hidden, rollout, temperature=2.0)
    by_hand = torch.log_softmax(logits / 2.0, dim=-1)
    expected = by_hand.gather(-1, rollout.responses.unsqueeze(-1)).squeeze(-1) * rollout.response_mask
    torch.testing.assert_close(logp, expected)
    expected_entropy = -(by_hand.exp() * by_hand).sum(-1) * rollout.response_mask
    torch.testing.assert_close(entropy, expected_entropy)


@pytest.mark.parametrize("field, value", [("route", "gradient"), ("loss", "kl"), ("rank_by", "k3"), ("temperature", 0.0)])
def test_bad_loop_settings_are_refused_with_the_choices(field, value):
    with pytest.raises(ValueError, match=field):
        LoopConfig(**{field: value})


def test_a_given_exact_divergence_is_what_the_rules_rank_on():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    logp = torch.full(mask.shape, -1.0)  # the sampled-token estimate is 0 everywhere: it would rank nothing
    exact = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.0, 0.7, 9.0]])
    config = TipConfig(rule="divergence", ratio=0.5)
    tokens = select_and_reward(config, mask, old_log_probs=logp, teacher_logprobs=logp, entropy=None, divergence=exact)
    assert tokens.selected.tolist() == [[False, True, True, False], [False, False, True, False]]
    torch.testing.assert_close(tokens.divergence, exact * mask)  # padding zeroed
