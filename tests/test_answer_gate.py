"""The checker over the teacher on the answer (`algorithm.tip.answer_teacher`): answers found and verdicts by hand,
`tip_opd` through verl's registry giving the gated answer tokens verl's GRPO advantage, the demo loop applying
the same gate, and the settings that cannot work refused."""

import dataclasses
import math
import random

import pytest
import torch
from test_estimator import GRPO, MASK, OLD, R, run
from test_local_loop import SMOKE, _copy, task_and_models  # noqa: F401  (fixture)

from tip_verl.core.answer_gate import AnswerRecord, answer_gate, answer_span
from tip_verl.core.config import TipConfig
from tip_verl.local.loop import actor_config, train_step
from tip_verl.verl_ext.step_context import TipStep, tip_step

MARKER = 7


def test_the_answer_is_every_valid_token_after_the_first_marker():
    responses = torch.tensor([
        [1, 7, 2, 3, 0],  # one marker: its answer is 2, 3 (the pad after the EOS is not valid)
        [1, 2, 3, 4, 5],  # no marker: no answer
        [7, 2, 7, 3, 4],  # two markers: everything after the first, the second one included
        [1, 2, 3, 4, 7],  # a marker at the end: an empty answer
        [1, 2, 0, 7, 9],  # a marker after the end of the response is not read
    ])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1] * 5, [1] * 5, [1] * 5, [1, 1, 1, 0, 0]])
    assert answer_span(responses, mask, [MARKER]).int().tolist() == [
        [0, 0, 1, 1, 0], [0] * 5, [0, 1, 1, 1, 1], [0] * 5, [0] * 5,
    ]


def test_a_marker_of_several_tokens_must_appear_whole():
    responses = torch.tensor([[5, 6, 1, 2], [5, 1, 6, 2], [6, 5, 6, 3]])
    assert answer_span(responses, torch.ones(3, 4), [5, 6]).int().tolist() == [[0, 0, 1, 1], [0] * 4, [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="answer_marker tokenizes to no token"):
        answer_span(responses, torch.ones(3, 4), [])


# two rollouts of two answer tokens each: rollout 0 is accepted, the teacher writes its first answer token
# (pT = 0.6) and refutes its second (pT = 0.1); rollout 1 is rejected
ANSWER = torch.tensor([[False, True, True], [False, True, True]])
SCORES = torch.tensor([1.0, 0.0])
TEACHER_LOGP = torch.log(torch.tensor([[0.9, 0.6, 0.1], [0.9, 0.9, 0.01]]))
TIP_SELECTED = torch.tensor([[True, False, True], [True, True, False]])


@pytest.mark.parametrize("mode", ["confirm", "confirm_on_evidence"])
def test_on_the_answer_the_teacher_keeps_only_the_accepted_tokens_it_would_write(mode):
    gate = answer_gate(mode, ANSWER, SCORES, TEACHER_LOGP, endorse_prob=0.5)
    assert gate.confirmed.tolist() == [[False, True, False], [False, False, False]]
    assert gate.refuted.tolist() == [[False, False, True], [False, False, False]]
    assert gate.active  # the refuted accepted token is evidence
    # the reasoning (column 0) keeps TIP's choice; on the answer only the confirmed token keeps the teacher
    assert gate.apply(TIP_SELECTED).tolist() == [[True, True, False], [True, False, False]]
    assert gate.metrics() == {"tip/answer/gated": 1.0, "tip/answer/found_fraction": 1.0,
                              "tip/answer/confirmed_fraction": 0.25, "tip/answer/refuted_fraction": 0.25}


def test_without_evidence_against_the_teacher_confirm_on_evidence_leaves_tip_unchanged():
    trusted = TEACHER_LOGP.clone()
    trusted[0, 2] = math.log(0.5)  # the endorsement threshold is inclusive: no accepted token is refuted now
    on_evidence = answer_gate("confirm_on_evidence", ANSWER, SCORES, trusted, endorse_prob=0.5)
    assert not on_evidence.refuted.any() and not on_evidence.active
    assert on_evidence.apply(TIP_SELECTED).tolist() == TIP_SELECTED.tolist()
    always = answer_gate("confirm", ANSWER, SCORES, trusted, endorse_prob=0.5)
    assert always.apply(TIP_SELECTED).tolist() == [[True, True, True], [True, False, False]]


def test_the_record_counts_accepted_answers_and_acts_while_the_teacher_refutes_too_many():
    record = AnswerRecord()
    with pytest.raises(ValueError, match="confirm_on_record keeps the teacher's record over the run"):
        answer_gate("confirm_on_record", ANSWER, SCORES, TEACHER_LOGP, endorse_prob=0.5)
    nothing_accepted = answer_gate("confirm_on_record", ANSWER, torch.zeros(2), TEACHER_LOGP, 0.5, record=record,
                                   tolerance=0.6)
    assert record.state_dict() == {"accepted": 0, "refuted": 0} and nothing_accepted.active  # unproven: gated
    # step 1: rollout 0 is accepted and its second answer token refuted: 1 of 1 refuted
    first = answer_gate("confirm_on_record", ANSWER, SCORES, TEACHER_LOGP, 0.5, record=record, tolerance=0.6)
    assert record.state_dict() == {"accepted": 1, "refuted": 1} and first.active
    assert first.apply(TIP_SELECTED).tolist() == [[True, True, False], [True, False, False]]  # as confirm
    # step 2: both accepted, the teacher writes every answer token: 1 of 3 refuted, within the tolerance
    second = answer_gate("confirm_on_record", ANSWER, torch.ones(2), torch.zeros(2, 3), 0.5, record=record,
                         tolerance=0.6)
    assert record.state_dict() == {"accepted": 3, "refuted": 1} and not second.active
    assert second.apply(TIP_SELECTED).tolist() == TIP_SELECTED.tolist()
    assert second.metrics()["tip/answer/record_refuted_share"] == pytest.approx(1 / 3)
    restored = AnswerRecord()
    restored.load_state_dict(record.state_dict())
    assert restored == record


def expected_advantages(selected_cells, coef=0.5):
    """mix=replace by hand: coef * r_t on the selected cells, verl's GRPO advantage elsewhere (test_estimator)."""
    out = GRPO.clone()
    for row, col in selected_cells:
        out[row, col] = coef * float(R[row, col])
    return out * MASK


def test_tip_opd_gives_the_gated_answer_tokens_verls_grpo_advantage():
    # test_estimator's batch: scores [1, 0, 1, 1]; pT = exp(OLD + R): rollout 0's answer tokens (columns 1, 2)
    # have pT 0.05 (refuted) and 0.61 (confirmed), rollout 2's 1.0 (confirmed) and 0.22 (refuted)
    answer = (torch.arange(3) >= 1).expand(4, 3) & MASK.bool()
    assert torch.exp(OLD + R)[0, 1] < 0.5 <= torch.exp(OLD + R)[0, 2]
    with tip_step(TipStep(answer=answer)) as step:
        advantages, _ = run("replace", answer_teacher="confirm_on_evidence", answer_marker="####")
    # TIP's choice, before the gate, is SELECTED = (0, 1), (1, 0), (2, 1), (3, 0) (test_estimator).
    # (0, 1) is refuted: GRPO; (2, 1) is confirmed: kept; (0, 2) is confirmed: the teacher's
    torch.testing.assert_close(advantages, expected_advantages([(0, 2), (1, 0), (2, 1), (3, 0)]))
    assert step.tokens.answer.active
    with tip_step(TipStep()), pytest.raises(ValueError, match="answer_teacher=confirm needs each response's answer"):
        run("replace", answer_teacher="confirm", answer_marker="####")


@pytest.mark.parametrize("mode", ["confirm", "confirm_on_record"])
def test_the_demo_loop_gates_the_answer_in_the_same_way(task_and_models, mode):
    task, teacher, student = task_and_models
    # tolerance 0: the record gates on any refuted answer, and before any is accepted
    tip = TipConfig(rule="soft_or", ratio=0.5, mix="replace", answer_teacher=mode, answer_marker=";",
                    answer_tolerance=0.0)
    config = dataclasses.replace(SMOKE, route="loss", tip=tip)
    student = _copy(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr)
    record = AnswerRecord(accepted=10, refuted=5)
    metrics, per_token = train_step(config, task, teacher, student, optimizer, random.Random(0), actor_config(config), 1,
                                    record)
    answer, selected = per_token["answer"], per_token["selected"]
    assert answer.any() and metrics["tip/answer/gated"] == 1.0 and metrics["tip/answer/found_fraction"] > 0.9
    if mode == "confirm_on_record":  # the run's record grew by this step's accepted answers
        assert record.accepted >= 10 and record.refuted >= 5
        assert metrics["tip/answer/record_refuted_share"] == record.refuted_share()
    # every answer token left with the teacher is one the teacher would write itself
    assert (per_token["teacher_logprobs"][selected & answer] >= math.log(0.5)).all()
    assert (selected & ~answer).any()  # the reasoning is still distilled


@pytest.mark.parametrize(
    "tip, match",
    [
        ({"answer_teacher": "confirm"}, "set it to the text that introduces the final answer"),
        ({"answer_teacher": "confirm", "answer_marker": "####", "mix": "teacher_only"}, "set algorithm.tip.mix=replace"),
        ({"answer_teacher": "sometimes"}, "answer_teacher='sometimes' is not known"),
        ({"answer_marker": ""}, "answer_marker='': must be null or a non-empty string"),
        ({"answer_tolerance": 1.0}, "answer_tolerance=1.0: must be in \\[0, 1\\)"),
    ],
)
def test_answer_settings_that_cannot_work_name_the_key(tip, match):
    with pytest.raises(ValueError, match=match):
        TipConfig(**tip)


def test_the_answer_teacher_is_refused_at_start_up_where_it_cannot_act():
    from tip_verl.verl_ext.checks import check_answer_teacher

    gated = {"answer_teacher": "confirm_on_evidence", "answer_marker": "####"}

    def config(adv_estimator, tip, loss_mode=None, use_task_rewards=True):
        loss = {"loss_mode": loss_mode, "use_task_rewards": use_task_rewards}
        distillation = {"enabled": loss_mode is not None, "distillation_loss": loss}
        return {"algorithm": {"adv_estimator": adv_estimator, "tip": tip}, "distillation": distillation}

    check_answer_teacher(config("tip_opd", gated))  # the advantage route
    check_answer_teacher(config("grpo", gated, "tip_k3"))  # the loss route
    check_answer_teacher(config("grpo", {}))
    with pytest.raises(ValueError, match="answer_teacher=confirm_on_evidence .* loss_mode=None: set algorithm.adv"):
        check_answer_teacher(config("grpo", gated))
    with pytest.raises(ValueError, match="loss_mode=k3: set"):  # verl's own loss does not select
        check_answer_teacher(config("grpo", gated, "k3"))
    with pytest.raises(ValueError, match="with algorithm.tip.preselect=true"):
        check_answer_teacher(config("tip_opd", {**gated, "preselect": True}))
    with pytest.raises(ValueError, match="loss_mode=tip_forward_kl_topk makes the teacher return its top-k only"):
        check_answer_teacher(config("grpo", gated, "tip_forward_kl_topk"))
    with pytest.raises(ValueError, match="(?s)GRPO loss, which distillation.distillation_loss.use_task_rewards=false"):
        check_answer_teacher(config("grpo", gated, "tip_k3", use_task_rewards=False))  # pure OPD on the loss route
    check_answer_teacher(config("tip_opd", gated, "k3", use_task_rewards=False))  # tip_opd: the advantage carries it


def test_the_trainer_reads_the_marker_as_the_tokenizers_ids():
    from omegaconf import OmegaConf

    from tip_verl.verl_ext.trainer import answer_marker_ids, tip_input_fields
    from tip_verl.worlds.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    assert answer_marker_ids(tokenizer, "=") == tokenizer.encode("=", add_special_tokens=False)
    assert answer_marker_ids(tokenizer, None) is None
    config = {"algorithm": {"tip": {"answer_teacher": "confirm", "answer_marker": "="}},
              "actor_rollout_ref": {"rollout": {}}}
    assert "responses" in tip_input_fields(OmegaConf.create(config))
    assert "responses" not in tip_input_fields(OmegaConf.create({**config, "algorithm": {"tip": {}}}))
