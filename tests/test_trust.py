"""The checker-verified teacher (`algorithm.tip.teacher_trust=checked`): verdicts by hand, and `tip_opd` through
verl's registry giving the distrusted groups verl's own GRPO advantage."""

import math

import numpy as np
import pytest
import torch
from test_estimator import GRPO, INDEX, MASK, expected, run

from tip_verl.core.config import TipConfig
from tip_verl.core.trust import group_ids, teacher_trust

LOG_HALF = math.log(0.5)


def verdicts(scores, index, teacher_logprobs, mask=None, endorse_prob=0.5):
    teacher_logprobs = torch.tensor(teacher_logprobs)
    mask = torch.ones_like(teacher_logprobs) if mask is None else torch.tensor(mask)
    return teacher_trust(torch.tensor(scores), np.array(index, dtype=object), teacher_logprobs, mask, endorse_prob)


def test_teacher_endorsing_a_wrong_rollout_is_distrusted_on_its_whole_group():
    # group a: rollout 1 is wrong and every token has pT >= 0.5 (the teacher's own path); group b: no evidence
    trust = verdicts(
        [1.0, 0.0, 0.0, 0.0],
        ["a", "a", "b", "b"],
        [[-0.1, -0.1, -0.1], [-0.2, -0.1, -0.6], [-0.1, -5.0, -0.1], [-0.1, -0.1, -3.0]],
    )
    assert trust.endorsed.tolist() == [True, True, False, False]
    assert trust.distrusted.tolist() == [True, True, False, False]
    assert trust.metrics() == {"tip/trust/distrusted_fraction": 0.5, "tip/trust/endorsed_fraction": 0.5,
                               "tip/trust/endorsed_wrong_fraction": 0.25}


def test_teacher_preferring_the_wrong_rollouts_is_distrusted():
    # group a: correct rollouts' teacher log-likelihood (-9.2, -9.3) below the wrong one's (-3.0, -2.5)
    # group b: the teacher prefers the correct rollout (-1.0 against -6.0): trusted
    trust = verdicts(
        [1.0, 1.0, 0.0, 0.0, 1.0, 0.0],
        ["a", "a", "a", "a", "b", "b"],
        [[-0.1, -9.0, -0.1], [-0.1, -9.1, -0.1], [-1.0, -1.0, -1.0], [-0.5, -1.0, -1.0],
         [-0.5, -0.25, -0.25], [-2.0, -2.0, -2.0]],
    )
    assert not trust.endorsed[:4].any()  # no endorsement: the preference alone decides
    assert trust.distrusted.tolist() == [True] * 4 + [False] * 2


def test_padding_is_ignored_and_an_all_correct_or_all_wrong_group_without_endorsement_is_trusted():
    # rollout 0's padded position holds -50 (never read); both groups have one outcome only
    trust = verdicts(
        [1.0, 1.0, 0.0, 0.0],
        [7, 7, 9, 9],
        [[-0.1, -50.0], [-0.3, -0.2], [-2.0, -0.1], [-0.1, -1.5]],
        mask=[[1, 0], [1, 1], [1, 1], [1, 1]],
    )
    assert trust.endorsed.tolist() == [True, True, False, False]
    assert not trust.distrusted.any()


def test_endorsement_threshold_is_inclusive_and_checked():
    trust = verdicts([0.0], ["a"], [[LOG_HALF]], endorse_prob=0.5)
    assert trust.endorsed.tolist() == [True] and trust.distrusted.tolist() == [True]
    with pytest.raises(ValueError, match=r"endorse_prob=0.0: must be in \(0, 1\]"):
        verdicts([0.0], ["a"], [[-0.1]], endorse_prob=0.0)


def test_group_ids_number_verl_uids_densely():
    assert group_ids(np.array(["u2", "u1", "u2", "u9"], dtype=object)).tolist() == [1, 0, 1, 2]


@pytest.mark.parametrize(
    "key,value,match",
    [("teacher_trust", "sometimes", "teacher_trust"), ("endorse_prob", 1.5, "endorse_prob"),
     ("correct_threshold", float("nan"), "correct_threshold")],
)
def test_bad_trust_settings_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        TipConfig(**{key: value})


@pytest.mark.parametrize("mix", ["replace", "add", "teacher_only"])
def test_tip_opd_gives_the_distrusted_group_verls_grpo_advantage_on_every_token(mix):
    # test_estimator's batch: in group a the correct rollout 0 has teacher log-likelihood -4.6, the wrong
    # rollout 1 -1.9 (the teacher prefers the wrong one); group b is all correct and endorses nothing
    advantages, _ = run(mix, teacher_trust="checked")
    want = expected(mix)
    want[:2] = GRPO[:2] * MASK[:2]
    torch.testing.assert_close(advantages, want)
    assert INDEX.tolist() == ["a", "a", "b", "b"]
    always, _ = run(mix)
    torch.testing.assert_close(always, expected(mix))  # the default keeps the teacher everywhere


def test_checked_trust_is_refused_at_start_up_off_the_advantage_route():
    from tip_verl.verl_ext.checks import check_teacher_trust

    check_teacher_trust({"algorithm": {"adv_estimator": "tip_opd", "tip": {"teacher_trust": "checked"}}})
    check_teacher_trust({"algorithm": {"adv_estimator": "grpo", "tip": {}}})
    with pytest.raises(ValueError, match="teacher_trust=checked .* set algorithm.adv_estimator=tip_opd"):
        check_teacher_trust({"algorithm": {"adv_estimator": "grpo", "tip": {"teacher_trust": "checked"}}})
