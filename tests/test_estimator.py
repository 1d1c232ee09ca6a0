"""`tip_opd` through verl's registry, against hand-computed advantages."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo.core_algos import get_adv_estimator_fn

import tip_verl.verl_ext.plugin  # noqa: F401  (also loaded by verl's entry point; explicit for clarity)
from tip_verl.core.config import TipConfig
from tip_verl.core.metrics import tip_metrics
from tip_verl.verl_ext.step_context import TipStep, tip_step

# two prompts (a, b) x two rollouts; lengths 3, 2, 3, 1
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
INDEX = np.array(["a", "a", "b", "b"], dtype=object)
SCORES = [1.0, 0.0, 1.0, 1.0]
# teacher reward r = teacher - old; abs_k1 = |r|, so each rollout's budget of one token goes to its largest |r|
R = torch.tensor([[-0.1, -2.0, 0.5], [0.3, -0.2, 0.0], [0.0, 1.0, -0.5], [-0.7, 0.0, 0.0]])
OLD = torch.full((4, 3), -1.0) * MASK
TEACHER = OLD + R
ENTROPY = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
SELECTED = [(0, 1), (1, 0), (2, 1), (3, 0)]
GRPO_A = 0.5 / (float(torch.tensor([1.0, 0.0]).std()) + 1e-6)  # group b has equal scores: advantage 0
GRPO = torch.tensor([[GRPO_A] * 3, [-GRPO_A] * 2 + [0.0], [0.0] * 3, [0.0] * 3])


def token_level_rewards():
    rewards = torch.zeros(4, 3)
    last = MASK.sum(dim=1) - 1
    rewards[torch.arange(4), last] = torch.tensor(SCORES)
    return rewards


def run(mix, coef=0.5, config_type=dict, **extra):
    tip = {"rule": "divergence", "ratio": 0.5, "divergence": "abs_k1", "mix": mix, "coef": coef, **extra}
    config = {"adv_estimator": "tip_opd", "norm_adv_by_std_in_grpo": True, "tip": tip}
    if config_type is not dict:
        config = OmegaConf.create(config)
    return get_adv_estimator_fn("tip_opd")(
        token_level_rewards=token_level_rewards(),
        response_mask=MASK,
        index=INDEX,
        config=config,
        old_log_probs=OLD,
        teacher_logprobs=TEACHER,
        entropy=ENTROPY,
    )


def expected(mix, coef=0.5):
    out = GRPO.clone() if mix != "teacher_only" else torch.zeros(4, 3)
    for row, col in SELECTED:
        teacher_term = coef * float(R[row, col])
        out[row, col] = teacher_term if mix in ("replace", "teacher_only") else out[row, col] + teacher_term
    return out * MASK


@pytest.mark.parametrize("mix", ["replace", "add", "teacher_only"])
def test_hand_computed_advantages(mix):
    advantages, returns = run(mix)
    torch.testing.assert_close(advantages, expected(mix), atol=1e-5, rtol=0)
    torch.testing.assert_close(returns, advantages)


def test_dictconfig_equals_dict():
    torch.testing.assert_close(run("replace", config_type=OmegaConf)[0], run("replace")[0])


def test_replace_values_written_out():
    advantages, _ = run("replace", coef=1.0)
    assert advantages[0].tolist() == pytest.approx([GRPO_A, -2.0, GRPO_A], abs=1e-5)
    assert advantages[3].tolist() == pytest.approx([-0.7, 0.0, 0.0], abs=1e-6)


def test_defaults_are_soft_or_half_k3_replace():
    defaults = TipConfig()
    assert (defaults.rule, defaults.ratio, defaults.divergence, defaults.mix, defaults.coef) == (
        "soft_or", 0.5, "k3", "replace", 1.0
    )

    def run_with(tip):
        config = OmegaConf.create({"adv_estimator": "tip_opd", **({"tip": tip} if tip is not None else {})})
        with tip_step(TipStep(step_index=0)) as step:
            advantages, _ = get_adv_estimator_fn("tip_opd")(
                token_level_rewards=token_level_rewards(), response_mask=MASK, index=INDEX, config=config,
                old_log_probs=OLD, teacher_logprobs=TEACHER, entropy=ENTROPY,
            )
        return advantages, step.tokens.selected

    advantages, selected = run_with(None)  # no tip section: the defaults
    explicit = run_with({"rule": "soft_or", "ratio": 0.5, "divergence": "k3", "mix": "replace", "coef": 1.0})
    assert selected.sum(dim=1).tolist() == [1, 1, 1, 1]  # max(1, floor(0.5 * m))
    assert torch.equal(selected, explicit[1])
    torch.testing.assert_close(advantages, explicit[0])


def test_inputs_from_trainer_step_and_metrics():
    with tip_step(TipStep(old_log_probs=OLD, teacher_logprobs=TEACHER, entropy=ENTROPY)) as step:
        advantages, _ = get_adv_estimator_fn("tip_opd")(
            token_level_rewards=token_level_rewards(),
            response_mask=MASK,
            index=INDEX,
            config={"tip": {"rule": "divergence", "divergence": "abs_k1", "mix": "replace", "coef": 0.5}},
        )
    torch.testing.assert_close(advantages, expected("replace"), atol=1e-5, rtol=0)
    metrics = tip_metrics(step.tokens, MASK)
    assert metrics["tip/selected_fraction"] == pytest.approx(4 / 9)
    selected_r = [float(R[r, c]) for r, c in SELECTED]
    assert metrics["tip/teacher_reward/selected_mean"] == pytest.approx(sum(selected_r) / 4)
    unselected_sum = float((R * MASK).sum()) - sum(selected_r)
    assert metrics["tip/teacher_reward/unselected_mean"] == pytest.approx(unselected_sum / 5)
    shares = [metrics[f"tip/quadrant/q{q}_share"] for q in (1, 2, 3, 4)]
    assert sum(shares) == pytest.approx(1.0)


def random_rule_selection(step):
    with tip_step(TipStep(step_index=step, old_log_probs=OLD, teacher_logprobs=TEACHER, entropy=ENTROPY)) as bound:
        run("teacher_only", rule="random", seed=7)
    return bound.tokens.selected


def test_random_rule_draws_depend_on_seed_and_step_not_on_the_steps_before(monkeypatch):
    from tip_verl.verl_ext import rng

    monkeypatch.setattr(rng, "_generators", {})
    uninterrupted = [random_rule_selection(step) for step in range(12)]
    monkeypatch.setattr(rng, "_generators", {})  # a resumed process: nothing drawn before step 9
    resumed = [random_rule_selection(step) for step in range(9, 12)]
    for step, selected in zip(range(9, 12), resumed):
        assert torch.equal(selected, uninterrupted[step])
    # the steps do draw differently (4 rollouts, 3 * 2 * 3 * 1 = 18 possible selections each)
    assert len({tuple(selected.flatten().tolist()) for selected in uninterrupted}) > 3
