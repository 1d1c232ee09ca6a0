"""Every bad input gets a clear error that says what was wrong and what to set."""

import math

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import get_adv_estimator_fn

import tip_verl.verl_ext.plugin  # noqa: F401
from tip_verl.core.config import TipConfig
from tip_verl.core.selection import SelectionInputs, select_tokens

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.9, 0.0]])
TEACHER = torch.tensor([[-0.5, -2.5, -0.1], [-0.6, -0.2, 0.0]])
ENTROPY = torch.tensor([[0.5, 1.5, 0.2], [0.9, 0.1, 0.0]])


def estimate(tip=None, mask=MASK, old=OLD, teacher=TEACHER, entropy=ENTROPY):
    return get_adv_estimator_fn("tip_opd")(
        token_level_rewards=torch.zeros(mask.shape),
        response_mask=mask,
        index=np.array(["a", "a"], dtype=object),
        config={"tip": tip or {}},
        old_log_probs=old,
        teacher_logprobs=teacher,
        entropy=entropy,
    )


@pytest.mark.parametrize(
    "tip, message",
    [
        ({"rule": "sofor"}, "algorithm.tip.rule='sofor' is not known; set one of"),
        ({"divergence": "kl"}, "algorithm.tip.divergence='kl' is not known"),
        ({"mix": "sum"}, "algorithm.tip.mix='sum' is not known"),
        ({"ratio": 0.0}, "algorithm.tip.ratio=0.0 must be in (0, 1]"),
        ({"ratio": 1.5}, "algorithm.tip.ratio=1.5 must be in (0, 1]"),
        ({"ratio": -0.2}, "must be in (0, 1]"),
        ({"entropy_quantile": 0}, "algorithm.tip.entropy_quantile=0 must be in (0, 1]"),
        ({"coef": math.nan}, "algorithm.tip.coef=nan: must be a finite number"),
        ({"entropy_threshold": -1.0}, "non-negative number of nats"),
        ({"seed": -1}, "algorithm.tip.seed=-1: must be a non-negative integer"),
        ({"ratoi": 0.5}, "Unknown key(s) ['ratoi'] in algorithm.tip"),
    ],
)
def test_bad_config(tip, message):
    with pytest.raises(ValueError) as error:
        TipConfig.from_any({"tip": tip})
    assert message in str(error.value)
    with pytest.raises(ValueError):
        estimate(tip)


def test_unknown_estimator_name():
    with pytest.raises(ValueError, match="tip_opdd"):
        get_adv_estimator_fn("tip_opdd")


def test_unknown_rule_in_select_tokens():
    with pytest.raises(ValueError, match="Unknown selection rule 'top'; set algorithm.tip.rule to one of"):
        select_tokens("top", 0.5, SelectionInputs(MASK))


def test_missing_teacher_logprobs():
    with pytest.raises(ValueError, match="tip_opd needs teacher_logprobs .*distillation.enabled=true"):
        estimate(teacher=None)


def test_missing_entropy_for_entropy_rule():
    with pytest.raises(ValueError, match="Selection rule 'soft_or' needs per-token entropy"):
        estimate(entropy=None)
    estimate({"rule": "divergence"}, entropy=None)  # a rule that does not read entropy runs without it


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"teacher_logprobs has shape \(2, 4\) but response_mask has \(2, 3\)"):
        estimate(teacher=torch.zeros(2, 4))


def test_empty_responses():
    with pytest.raises(ValueError, match="Every response in the batch is empty"):
        estimate(mask=torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_log_probs(bad):
    teacher = TEACHER.clone()
    teacher[1, 1] = bad
    with pytest.raises(ValueError, match="teacher_logprobs has 1 NaN/inf value.*rollout 1, position 1"):
        estimate(teacher=teacher)
    old = OLD.clone()
    old[0, 2] = bad
    with pytest.raises(ValueError, match="old_log_probs has 1 NaN/inf"):
        estimate(old=old)


def test_non_finite_at_padding_is_ignored():
    teacher = TEACHER.clone()
    teacher[1, 2] = math.nan  # padded position
    advantages, _ = estimate(teacher=teacher)
    assert torch.isfinite(advantages).all()


def test_a_step_whose_divergence_is_all_equal_is_refused():
    """The teacher is the student's own model: every token's divergence is 0 and no rule reading it can rank."""
    for rule in ("soft_or", "q3", "divergence"):
        with pytest.raises(ValueError, match="Cannot rank tokens by teacher-student divergence: all 5 valid tokens"):
            estimate({"rule": rule}, teacher=OLD.clone())
    estimate({"rule": "entropy"}, teacher=OLD.clone())  # a rule that does not read it runs


def test_a_step_whose_entropy_is_all_equal_is_refused():
    with pytest.raises(ValueError, match="Cannot rank tokens by student entropy"):
        estimate({"rule": "q3"}, entropy=torch.ones(2, 3))
