"""The local loop's loss route: the paper's full-vocabulary divergence at the selected tokens, ranked on the exact
KL; which tokens each route hands to verl's policy loss; every distribution at the sampling temperature."""

import dataclasses
import json
import math

import pytest
import torch

from tip_verl.core.advantages import TipTokens, select_and_reward
from tip_verl.core.config import TipConfig
from tip_verl.core.distill_losses import TipLossConfig
from tip_verl.core.trust import TeacherTrust
from tip_verl.local.loop import LoopConfig, distilled_mask, divergences_by_outcome, policy_loss_mask, train
from tip_verl.local.rollout import head_logprobs_and_entropy, response_hidden, sample

from test_local_loop import SMOKE, _copy, reverse_kl_to_teacher, task_and_models, train_a_copy  # noqa: F401  (fixture)

LOSS_SMOKE = dataclasses.replace(SMOKE, route="loss", warmup_steps=1)


def test_loss_route_moves_the_student_toward_the_teacher(task_and_models, tmp_path):
    before, after, records = train_a_copy(LOSS_SMOKE, task_and_models, tmp_path)
    assert 0.45 <= records[1]["tokens/trained_fraction"] <= 0.55
    assert records[1]["tokens/nonzero_advantage_fraction"] == 0.0  # teacher_only: no policy-loss token
    assert math.isfinite(records[-1]["actor/loss"])
    assert after < 0.95 * before, (before, after)  # 0.794 -> 0.700 on the shipped models


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
    tokens = _tokens(selected)
    distilled = distilled_mask(config, mask, tokens, divergences_by_outcome(config, torch.tensor([[1.0], [0.0]])))
    assert distilled.tolist() == ((mask * selected).tolist() if route == "loss" else [[0] * 4] * 2)
    assert policy_loss_mask(config, mask, tokens, distilled).tolist() == expected
    grpo = dataclasses.replace(config, adv_estimator="grpo")
    assert policy_loss_mask(grpo, mask, None, torch.zeros_like(mask)).tolist() == mask.tolist()


@pytest.mark.parametrize(
    "correct_loss, wrong_loss, expected",
    [
        (None, None, {"reverse_kl": [True, True, True]}),
        ("reverse_kl", None, {"reverse_kl": [True, True, True]}),
        ("none", None, {"reverse_kl": [False, True, False]}),
        ("forward_kl", "jsd", {"forward_kl": [True, False, True], "jsd": [False, True, False]}),
        ("forward_kl", "none", {"forward_kl": [True, False, True]}),
    ],
)
def test_outcome_split_gives_each_rollout_the_divergence_of_its_outcome(correct_loss, wrong_loss, expected):
    config = LoopConfig(tip_loss=TipLossConfig(correct_loss=correct_loss, wrong_loss=wrong_loss))
    rows_by_divergence = divergences_by_outcome(config, torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]))  # 0, 2 correct
    assert {name: rows.tolist() for name, rows in rows_by_divergence.items()} == expected


def test_selected_tokens_of_a_rollout_split_to_none_get_the_grpo_advantage_under_replace():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    selected = torch.tensor([[True, False, True, False], [False, True, False, False]])
    config = LoopConfig(tip=TipConfig(mix="replace"), tip_loss=TipLossConfig(correct_loss="none"))
    rows_by_divergence = divergences_by_outcome(config, torch.tensor([[1.0], [0.0]]))  # rollout 0 correct: no teacher term
    distilled = distilled_mask(config, mask, _tokens(selected), rows_by_divergence)
    assert distilled.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0]]
    assert policy_loss_mask(config, mask, _tokens(selected), distilled).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    teacher_only = dataclasses.replace(config, tip=TipConfig(mix="teacher_only"))
    assert policy_loss_mask(teacher_only, mask, _tokens(selected), distilled).tolist() == [[0] * 4] * 2


def test_outcome_split_to_the_default_divergence_by_name_trains_exactly_as_no_split(task_and_models, tmp_path):
    task, teacher, _ = task_and_models
    config = dataclasses.replace(LOSS_SMOKE, steps=2, loss="forward_kl")
    split = dataclasses.replace(config, tip_loss=TipLossConfig(correct_loss="forward_kl", wrong_loss="forward_kl"))
    losses = []
    for run, cfg in (("plain", config), ("split", split)):
        student = _copy(task_and_models[2])
        assert train(cfg, tmp_path / run, teacher, student) == "completed"
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["actor/loss"] for r in records[1:]])
    assert losses[0] == losses[1] and all(loss > 0 for loss in losses[0])


def test_an_annealed_teacher_coefficient_leaves_no_loss_after_the_anneal(task_and_models, tmp_path):
    task, teacher, student = task_and_models
    annealed = TipLossConfig(schedule="linear", anneal_steps=1, final_coef=0.0)  # 1 at step 1, 0 from step 2
    config = dataclasses.replace(LOSS_SMOKE, steps=2, tip_loss=annealed)
    assert train(config, tmp_path, teacher, _copy(student)) == "completed"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["actor/loss"] > 0.01 and records[2]["actor/loss"] == 0.0


def test_tip_loss_settings_off_the_loss_route_or_with_no_teacher_term_are_refused():
    with pytest.raises(ValueError, match="route='loss'"):
        LoopConfig(route="advantage", tip_loss=TipLossConfig(correct_loss="none"))
    with pytest.raises(ValueError, match="correct_loss and wrong_loss"):
        LoopConfig(tip_loss=TipLossConfig(correct_loss="none", wrong_loss="none"))
    with pytest.raises(ValueError, match="k3"):
        LoopConfig(tip_loss=TipLossConfig(wrong_loss="k3"))


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


@pytest.mark.parametrize(
    "route, mix, distilled_rows, trained",
    [
        ("loss", "replace", [[1, 0, 1, 0], [0, 0, 0, 0]], [[0, 1, 0, 0], [1, 1, 0, 0]]),
        ("loss", "teacher_only", [[1, 0, 1, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [1, 1, 0, 0]]),
        ("advantage", "teacher_only", [[0] * 4] * 2, [[1, 0, 1, 0], [1, 1, 0, 0]]),
    ],
)
def test_a_distrusted_rollout_gets_no_divergence_and_the_policy_loss_on_every_token(route, mix, distilled_rows,
                                                                                    trained):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    selected = torch.tensor([[True, False, True, False], [False, True, False, False]])
    tokens = _tokens(selected)
    tokens.trust = TeacherTrust(correct=torch.tensor([True, False]), endorsed=torch.tensor([False, True]),
                                distrusted=torch.tensor([False, True]))
    config = LoopConfig(route=route, tip=TipConfig(mix=mix, teacher_trust="checked"))
    distilled = distilled_mask(config, mask, tokens, divergences_by_outcome(config, torch.tensor([[1.0], [0.0]])))
    assert distilled.tolist() == distilled_rows
    assert policy_loss_mask(config, mask, tokens, distilled).tolist() == trained


def test_verified_trust_grades_the_teachers_own_answers_in_the_loop(task_and_models, tmp_path):
    task, teacher, student = task_and_models
    config = dataclasses.replace(LOSS_SMOKE, steps=2, tip=TipConfig(mix="replace", teacher_trust="verified"))
    train(config, tmp_path, _copy(teacher), _copy(student))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trust = [r["tip/trust/distrusted_fraction"] for r in records if r["step"] > 0]
    # the smoke teacher answers every prompt correctly or not; a prompt it fails distrusts its whole group
    assert len(trust) == 2 and all(0.0 <= share <= 1.0 for share in trust)
    n = config.prompts_per_step * config.group_size
    assert all(round(share * n) % config.group_size == 0 for share in trust)
