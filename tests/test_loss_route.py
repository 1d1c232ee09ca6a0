"""The TIP loss route through verl's own distillation loss functions, on real tensors.

Micro-batches are laid out as verl's engine hands them to the loss (nested, whole-sequence tensors); the
aggregate goes through verl's `distillation_loss` / `distillation_ppo_loss`, and the top-k losses through
verl's top-k logits processor. Every number is checked against a slow per-token loop in plain Python.
"""

import math

import pytest
import torch
from tensordict import TensorDict
from verl.trainer.distillation.losses import distillation_loss, distillation_ppo_loss
from verl.trainer.ppo.core_algos import kl_penalty
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig

import tip_verl.verl_ext.plugin  # noqa: F401  (registers the tip_* losses, as verl's entry point does)
from tip_verl.core.distill_losses import (
    K3_LINEAR_ABOVE,
    TipLossConfig,
    k3_divergence,
    selected_token_weights,
    tip_loss_mask,
)
from tip_verl.core.schedule import teacher_coef_multiplier
from tip_verl.core.selection import SelectionInputs, select_tokens
from tip_verl.verl_ext.losses import ANSWER_FIELDS, SETTINGS_KEY, check_loss_route, loss_route_settings

PROMPT_LENS = [3, 2, 4]
RESP_LENS = [5, 2, 4]
SCORES = [1.0, 0.0, 1.0]  # outcome of each rollout (correct, wrong, correct)
V, K = 12, 4


def nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def full_sequence(response_values, fill):
    """Whole-sequence rows whose position prompt_len - 1 + t holds response token t's value (verl's layout)."""
    rows = []
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESP_LENS)):
        row = torch.full((p + r, *response_values.shape[2:]), fill, dtype=response_values.dtype)
        row[p - 1 : p - 1 + r] = response_values[i, :r]
        rows.append(row)
    return rows


def response_tensor(seed, low=-3.0, high=-0.1):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(len(RESP_LENS), max(RESP_LENS), generator=g, dtype=torch.float64)


STUDENT = response_tensor(1)
TEACHER = response_tensor(2)
ENTROPY = response_tensor(3, 0.1, 2.0)


def micro_batch(tip=None, tip_loss=None, step=0, teacher=None, **fields):
    g = torch.Generator().manual_seed(0)
    data = TensorDict(
        {
            "prompts": nested([torch.randint(0, V, (p,), generator=g) for p in PROMPT_LENS]),
            "responses": nested([torch.randint(0, V, (r,), generator=g) for r in RESP_LENS]),
            "response_mask": nested([torch.ones(r, dtype=torch.int64) for r in RESP_LENS]),
            "teacher_logprobs": nested(teacher if teacher is not None else full_sequence(TEACHER.unsqueeze(-1), 0.0)),
            "rm_scores": nested([torch.tensor([0.0] * (r - 1) + [s]) for r, s in zip(RESP_LENS, SCORES)]),
            "old_log_probs": nested([STUDENT[i, :r] for i, r in enumerate(RESP_LENS)]),
            **fields,
        },
        batch_size=[len(RESP_LENS)],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=sum(RESP_LENS), global_batch_size=len(RESP_LENS))
    if tip is not None:
        settings = {"tip": tip, "tip_loss": tip_loss or {}, "step": step}
        tu.assign_non_tensor_data(data, SETTINGS_KEY, settings)
    return data


def configs(loss_mode, loss_agg_mode="token-mean", **loss_kwargs):
    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=3, loss_agg_mode=loss_agg_mode)
    settings = dict(loss_max_clamp=None, log_prob_min_clamp=None, use_policy_gradient=False, use_task_rewards=False)
    settings.update(loss_kwargs)
    return actor, DistillationConfig(distillation_loss=DistillationLossConfig(loss_mode=loss_mode, topk=K, **settings))


def student_output(entropy=True):
    """model_output as verl's engine gives it: nested whole-sequence log-probs (and entropy); plus the leaf."""
    leaf = STUDENT.clone().requires_grad_(True)
    output = {"log_probs": nested(full_sequence(leaf, -5.0))}
    if entropy:
        output["entropy"] = nested(full_sequence(ENTROPY, 7.0))
    return output, leaf


def k3_loop(i, t, estimator="k3"):
    """Per-token estimate of KL(student || teacher) from the sampled token, by hand."""
    s, q = float(STUDENT[i, t]), float(TEACHER[i, t])
    if estimator == "k2":
        return 0.5 * (s - q) ** 2
    return math.exp(q - s) - (q - s) - 1.0


def top_by_value(values, ratio):
    """Per rollout, the positions of its max(1, floor(ratio * m_i)) largest values (earlier position on ties)."""
    chosen = []
    for i, m in enumerate(RESP_LENS):
        k = max(1, math.floor(ratio * m))
        order = sorted(range(m), key=lambda t: (-values[i][t], t))
        chosen += [(i, t) for t in order[:k]]
    return chosen


def run(loss_mode, tip, tip_loss=None, step=0, output=None, data=None, **config_kwargs):
    actor, distill = configs(loss_mode, **config_kwargs)
    output = output if output is not None else student_output()[0]
    data = data if data is not None else micro_batch(tip, tip_loss, step)
    return distillation_loss(actor, distill, output, data)


def test_rule_all_equals_verl_own_k3_where_verl_does_not_clamp():
    output, _ = student_output()
    ours, _ = run("tip_k3", {"rule": "all"}, output=output)
    verls, _ = run("k3", None, output=output, data=micro_batch())
    assert torch.allclose(ours, verls)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_divergence_rule_mean_over_selected_tokens_and_gradient(ratio):
    output, leaf = student_output()
    loss, metrics = run("tip_k3", {"rule": "divergence", "ratio": ratio}, output=output)
    values = [[k3_loop(i, t) for t in range(m)] for i, m in enumerate(RESP_LENS)]
    chosen = top_by_value(values, ratio)
    expected = sum(values[i][t] for i, t in chosen) / len(chosen)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["tip_loss/selected_fraction"].aggregate() == pytest.approx(len(chosen) / sum(RESP_LENS))
    loss.backward()
    grad = torch.zeros_like(STUDENT)
    for i, t in chosen:  # d k3 / d log pS = 1 - pT / pS
        grad[i, t] = (1.0 - math.exp(float(TEACHER[i, t] - STUDENT[i, t]))) / len(chosen)
    assert torch.allclose(leaf.grad, grad)


def test_k3_keeps_value_and_gradient_where_verl_clamps_it():
    """verl's kl_penalty caps k3 at 10 (log pT - log pS above ~2.6 or below ~-11): a constant loss, no gradient,
    and a tie the rules would break by position. The TIP loss ranks and trains on the true k3."""
    log_q = 0.3 * torch.rand(STUDENT.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    log_q[0, :3] = torch.tensor([2.7, -15.0, 5.0])  # k3 = 11.2, 14.0, 142.4: all three 10 for verl
    teacher = STUDENT + log_q
    leaf = STUDENT.clone().requires_grad_(True)
    verl_k3 = kl_penalty(logprob=leaf, ref_logprob=teacher, kl_penalty="k3")
    assert torch.equal(verl_k3[0, :3].detach(), torch.full((3,), 10.0, dtype=torch.float64))
    verl_k3[0, :3].sum().backward()
    assert torch.equal(leaf.grad[0, :3], torch.zeros(3, dtype=torch.float64))

    output, leaf = student_output()
    data = micro_batch({"rule": "divergence", "ratio": 0.5}, teacher=full_sequence(teacher.unsqueeze(-1), 0.0))
    loss, _ = run("tip_k3", None, output=output, data=data)
    values = [[math.expm1(x) - x for x in log_q[i, :m].tolist()] for i, m in enumerate(RESP_LENS)]
    chosen = top_by_value(values, 0.5)
    assert {(0, 2), (0, 1)} <= set(chosen) and (0, 0) not in chosen  # verl's values would pick positions 0 and 1
    assert loss.item() == pytest.approx(sum(values[i][t] for i, t in chosen) / len(chosen), rel=1e-9)
    loss.backward()
    grad = torch.zeros_like(STUDENT)
    for i, t in chosen:  # d k3 / d log pS = 1 - e^(log pT - log pS)
        grad[i, t] = (1.0 - math.exp(float(log_q[i, t]))) / len(chosen)
    torch.testing.assert_close(leaf.grad, grad)
    assert leaf.grad[0, 2] == pytest.approx((1.0 - math.exp(5.0)) / len(chosen))
    assert leaf.grad[0, 1] == pytest.approx((1.0 - math.exp(-15.0)) / len(chosen))


def test_k3_turns_linear_far_above_float32_overflow():
    student = torch.tensor([-60.0, -1.0], requires_grad=True)  # log q = 60: e^60 overflows no float32, k3 stays finite
    losses = k3_divergence(student, torch.tensor([0.0, -1.0]))
    losses.sum().backward()
    slope = math.expm1(K3_LINEAR_ABOVE)
    assert losses[0].item() == pytest.approx(slope - K3_LINEAR_ABOVE + 20.0 * slope, rel=1e-6)
    assert losses[1].item() == 0.0
    assert student.grad[0].item() == pytest.approx(-slope, rel=1e-6) and student.grad[1].item() == 0.0


def test_ppo_wrapper_adds_coef_times_the_tip_loss():
    """verl's distillation_ppo_loss: task (PPO) loss + distillation_loss_coef x our loss; zero advantages -> 0 task loss."""
    tip = {"rule": "divergence", "ratio": 0.5}
    actor, distill = configs("tip_k3")
    alone, _ = distillation_loss(actor, distill, student_output()[0], micro_batch(tip))
    actor, distill = configs("tip_k3", use_task_rewards=True, distillation_loss_coef=0.3)
    data = micro_batch(tip, advantages=nested([torch.zeros(r) for r in RESP_LENS]))
    total, metrics = distillation_ppo_loss(actor, distill, student_output()[0], data)
    assert "actor/pg_loss" in metrics
    assert total.item() == pytest.approx(0.3 * alone.item(), rel=1e-9)


def test_soft_or_reads_entropy_from_model_output():
    output, _ = student_output()
    tip = {"rule": "soft_or", "ratio": 0.5}
    loss, _ = run("tip_k3", tip, output=output)
    mask = torch.zeros(len(RESP_LENS), max(RESP_LENS), dtype=torch.bool)
    for i, m in enumerate(RESP_LENS):
        mask[i, :m] = True
    values = torch.tensor(
        [[k3_loop(i, t) if t < m else 0.0 for t in range(max(RESP_LENS))] for i, m in enumerate(RESP_LENS)],
        dtype=torch.float64,
    )
    selected = select_tokens("soft_or", 0.5, SelectionInputs(mask, ENTROPY * mask, values))
    assert loss.item() == pytest.approx(float((values * selected).sum() / selected.sum()), rel=1e-9)
    with pytest.raises(ValueError, match="calculate_entropy=true"):
        run("tip_k3", tip, output=student_output(entropy=False)[0])


@pytest.mark.parametrize(
    "divergence_quantile, chosen",
    [
        (1.0, [(0, 0), (0, 2), (1, 0), (2, 1), (2, 2)]),  # plain min-max: the outlier squeezes d^ to ~0
        (0.8, [(0, 0), (0, 2), (1, 0), (2, 0), (2, 3)]),  # clip at 4.39: rollout 2's divergent tokens win
    ],
)
def test_soft_or_clips_the_divergence_at_algorithm_tip_divergence_quantile(divergence_quantile, chosen):
    """One k3 outlier (log q = 8 at token (0, 0)) and two divergent low-entropy tokens in rollout 2 (log q = 2 at
    t0, 1.8 at t3), every other log q 0. Entropy alone picks rollout 2's t1, t2 (ENTROPY 1.23, 0.95 over 0.45,
    0.75). At quantile 1.0 their d^ is ~1.5e-3 and the entropy picks stay; the 0.8 quantile of the 11 k3
    values is 4.39, so d^ = 1 and 0.74 and Soft-OR takes t0, t3. Rollout 0 keeps the outlier and its top
    entropy token, rollout 1 its top entropy token (divergence 0)."""
    log_q = torch.zeros_like(STUDENT)
    log_q[0, 0], log_q[2, 0], log_q[2, 3] = 8.0, 2.0, 1.8
    teacher = full_sequence((STUDENT + log_q).unsqueeze(-1), 0.0)
    tip = {"rule": "soft_or", "ratio": 0.5, "divergence_quantile": divergence_quantile}
    loss, metrics = run("tip_k3", None, data=micro_batch(tip, teacher=teacher))
    expected = sum(math.expm1(log_q[i, t].item()) - log_q[i, t].item() for i, t in chosen) / len(chosen)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["tip_loss/selected_fraction"].aggregate() == pytest.approx(len(chosen) / sum(RESP_LENS))


def test_seq_mean_token_mean_averages_each_rollout_over_its_selected_tokens():
    loss, _ = run("tip_k3", {"rule": "divergence", "ratio": 0.5}, loss_agg_mode="seq-mean-token-mean")
    values = [[k3_loop(i, t) for t in range(m)] for i, m in enumerate(RESP_LENS)]
    chosen = top_by_value(values, 0.5)
    per_rollout = [[values[i][t] for j, t in chosen if j == i] for i in range(len(RESP_LENS))]
    assert loss.item() == pytest.approx(sum(sum(v) / len(v) for v in per_rollout) / len(RESP_LENS), rel=1e-6)


def test_trace_split_by_outcome():
    tip = {"rule": "all"}
    correct_only, metrics = run("tip_k3", tip, {"correct_loss": "k3", "wrong_loss": "none"})
    kept = [(i, t) for i, m in enumerate(RESP_LENS) for t in range(m) if SCORES[i] > 0]
    assert correct_only.item() == pytest.approx(sum(k3_loop(i, t) for i, t in kept) / len(kept), rel=1e-9)
    assert metrics["tip_loss/correct_fraction"] == pytest.approx(2 / 3)
    both, _ = run("tip_k3", tip, {"wrong_loss": "k2"})  # correct: the loss_mode's own k3; wrong: k2
    every = [(i, t) for i, m in enumerate(RESP_LENS) for t in range(m)]
    hand = sum(k3_loop(i, t, "k3" if SCORES[i] > 0 else "k2") for i, t in every) / len(every)
    assert both.item() == pytest.approx(hand, rel=1e-9)


def test_schedule_scales_the_loss():
    tip, schedule = {"rule": "all"}, {"schedule": "warmup_anneal", "warmup_steps": 2, "anneal_steps": 4}
    full, _ = run("tip_k3", tip, schedule, step=1)
    half, metrics = run("tip_k3", tip, schedule, step=4)
    assert metrics["tip_loss/coef_multiplier"] == 0.5
    assert half.item() == pytest.approx(0.5 * full.item())


def test_teacher_coef_multiplier_by_hand():
    assert [teacher_coef_multiplier(s) for s in (0, 7)] == [1.0, 1.0]
    assert [teacher_coef_multiplier(s, "linear", anneal_steps=4, final_coef=0.2) for s in (0, 2, 4, 9)] == [
        1.0, 0.6, pytest.approx(0.2), pytest.approx(0.2)]
    warm = [teacher_coef_multiplier(s, "warmup_anneal", warmup_steps=3, anneal_steps=2) for s in range(7)]
    assert warm == [1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]


# ---- top-k: verl's logits processor computes the per-token forward KL, our loss masks it ----

def topk_world(seed=5):
    g = torch.Generator().manual_seed(seed)
    B = len(RESP_LENS)
    seq = [p + r for p, r in zip(PROMPT_LENS, RESP_LENS)]
    student_logits = torch.randn(sum(seq), V, generator=g, dtype=torch.float64)
    teacher_logits = 2.0 * torch.randn(sum(seq), V, generator=g, dtype=torch.float64)
    teacher_lp, teacher_ids = torch.log_softmax(teacher_logits, -1).topk(K, dim=-1)
    splits = lambda x: list(torch.split(x, seq))  # noqa: E731
    data_fields = {"teacher_ids": nested(splits(teacher_ids)), "teacher_logprobs": nested(splits(teacher_lp))}
    assert B == len(seq)
    return student_logits, teacher_lp, teacher_ids, data_fields


def topk_loop(student_logits, teacher_lp, teacher_ids):
    """Per response token, by hand: FKL over the teacher's top-k, and the teacher's renormalised top-k entropy."""
    fkl, entropy, offset = [], [], 0
    for p, r in zip(PROMPT_LENS, RESP_LENS):
        fkl.append([]), entropy.append([])
        for t in range(r):
            row = offset + p - 1 + t
            log_z = math.log(sum(math.exp(float(x)) for x in student_logits[row]))
            pairs = [(float(teacher_lp[row, k]), float(student_logits[row, teacher_ids[row, k]]) - log_z) for k in range(K)]
            fkl[-1].append(max(0.0, sum(math.exp(lt) * (lt - ls) for lt, ls in pairs)))
            mass = sum(math.exp(lt) for lt, _ in pairs)
            entropy[-1].append(-sum(math.exp(lt) / mass * (lt - math.log(mass)) for lt, _ in pairs))
        offset += p + r
    return fkl, entropy


def topk_run(loss_mode, tip, tip_loss=None):
    student_logits, teacher_lp, teacher_ids, fields = topk_world()
    actor, distill = configs(loss_mode)
    data = micro_batch(tip, tip_loss, teacher=list(fields["teacher_logprobs"].unbind()), teacher_ids=fields["teacher_ids"])
    processed = distillation_ppo_loss(actor, distill, data=data, student_logits=student_logits.unsqueeze(0))
    offsets = data["prompts"].offsets() + data["responses"].offsets()
    output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets) for k, v in processed.items()}
    loss, metrics = distillation_loss(actor, distill, output, data)
    return loss, metrics, topk_loop(student_logits, teacher_lp, teacher_ids)


def test_topk_forward_kl_on_selected_tokens():
    loss, metrics, (fkl, _) = topk_run("tip_forward_kl_topk", {"rule": "divergence", "ratio": 0.5})
    chosen = top_by_value(fkl, 0.5)
    # verl's top-k KL is computed in float32 (fsdp/losses.py kl_divergence)
    assert loss.item() == pytest.approx(sum(fkl[i][t] for i, t in chosen) / len(chosen), rel=1e-6)
    assert "distillation/teacher_mass" in metrics  # verl's own top-k metrics are kept


def test_entropy_aware_gate():
    _, _, (fkl, entropy) = topk_run("tip_forward_kl_topk", {"rule": "all"})
    ranked = sorted(h for row in entropy for h in row)
    tau = 0.5 * (ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2])  # between two tokens: a clean split
    loss, metrics, _ = topk_run("tip_entropy_aware_topk", {"rule": "all"}, {"teacher_entropy_tau": tau})
    gated = [(i, t) for i, row in enumerate(entropy) for t, h in enumerate(row) if h >= tau]
    assert 0 < len(gated) < sum(RESP_LENS)
    assert loss.item() == pytest.approx(sum(fkl[i][t] for i, t in gated) / len(gated), rel=1e-6)
    assert metrics["tip_loss/gate_fraction"].aggregate() == pytest.approx(len(gated) / sum(RESP_LENS))


# ---- clear errors ----

def test_missing_settings_name_the_trainer_mode():
    with pytest.raises(ValueError, match="trainer_mode=tip_sync"):
        run("tip_k3", None, data=micro_batch())


@pytest.mark.parametrize(
    "tip, tip_loss, kwargs, match",
    [
        ({"rule": "all", "ratio": 1.5}, None, {}, "ratio"),
        ({"rule": "nope"}, None, {}, "rule"),
        ({"rule": "all"}, {"schedul": "linear"}, {}, "Unknown key"),
        ({"rule": "all"}, {"correct_threshold": 0.5}, {}, "correct_threshold is now algorithm.tip.correct_threshold"),
        ({"rule": "all"}, {"schedule": "linear"}, {}, "anneal_steps"),
        ({"rule": "all"}, {"correct_loss": "forward_kl_topk"}, {}, "estimator"),
        ({"rule": "all"}, {"score_field": "acc", "wrong_loss": "none"}, {}, "fields present"),
        ({"rule": "all"}, None, {"loss_max_clamp": 10.0}, "loss_max_clamp=null"),
    ],
)
def test_bad_settings(tip, tip_loss, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run("tip_k3", tip, tip_loss, **kwargs)


def test_k1_needs_policy_gradient():
    with pytest.raises(ValueError, match="use_policy_gradient=true"):
        run("tip_k1", {"rule": "all"})
    loss, _ = run("tip_k1", {"rule": "all"}, use_policy_gradient=True)
    assert torch.isfinite(loss)


def test_nan_and_topk_teacher_are_refused():
    bad = TEACHER.clone()
    bad[1, 0] = float("nan")
    data = micro_batch({"rule": "all"}, teacher=full_sequence(bad.unsqueeze(-1), 0.0))
    with pytest.raises(ValueError, match="NaN"):
        run("tip_k3", None, data=data)
    wide = full_sequence(TEACHER.unsqueeze(-1).expand(-1, -1, K).contiguous(), 0.0)
    with pytest.raises(ValueError, match="top-4"):
        run("tip_k3", None, data=micro_batch({"rule": "all"}, teacher=wide))


def test_weights_and_config_checks():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    selected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]]).bool()
    assert torch.equal(selected_token_weights(selected, mask, "token-mean"), selected * 2.0)
    assert torch.equal(selected_token_weights(selected, mask, "seq-mean-token-mean")[0], torch.tensor([4.0, 0, 0, 0]))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        selected_token_weights(selected, mask, "mean")
    config = {
        "algorithm": {"tip": {"rule": "q3", "ratio": 0.1}, "tip_loss": {"wrong_loss": "none"}},
        "distillation": {"enabled": True, "distillation_loss": {"loss_mode": "tip_k3", "loss_max_clamp": None}},
        "actor_rollout_ref": {"actor": {"calculate_entropy": False, "entropy_coeff": 0.0}},
    }
    with pytest.raises(ValueError, match="calculate_entropy=true"):
        check_loss_route(config)
    config["actor_rollout_ref"]["actor"]["calculate_entropy"] = True
    settings = loss_route_settings(config, global_steps=3)[SETTINGS_KEY]
    assert settings["step"] == 2 and settings["tip"]["rule"] == "q3"
    assert TipLossConfig.from_any(settings["tip_loss"]).splits_by_outcome


def preselect_config(adv_estimator="grpo", enabled=True, loss_mode="k3", use_task_rewards=False):
    return {
        "algorithm": {"adv_estimator": adv_estimator, "tip": {"preselect": True}},
        "distillation": {
            "enabled": enabled,
            "distillation_loss": {"loss_mode": loss_mode, "use_task_rewards": use_task_rewards, "loss_max_clamp": None},
        },
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"adv_estimator": "tip_opd"}, "set algorithm.tip.mix=teacher_only instead"),
        ({"enabled": False}, "set distillation.enabled=true"),
        ({"loss_mode": "tip_k3"}, "would select twice.*use verl's own loss_mode=k3"),
        ({"use_task_rewards": True}, "set distillation.distillation_loss.use_task_rewards=false"),
        ({"loss_mode": "forward_kl_topk"}, "drop the sampled token when its rank exceeds .*Set a sampled-token"),
    ],
)
def test_preselect_needs_verl_own_distillation_loss_without_task_reward(changes, message):
    tip, _ = check_loss_route(preselect_config())
    assert tip.preselect
    with pytest.raises(ValueError, match=message):
        check_loss_route(preselect_config(**changes))


@pytest.mark.parametrize("rule", ["soft_or", "q3", "divergence", "entropy"])
def test_a_micro_batch_with_one_or_tied_eligible_tokens_still_selects(rule):
    """The loss route selects per micro-batch among the eligible tokens (after the outcome split and the top-k
    entropy gate): one eligible token, or a few with the same loss (a tiny bf16 model's top-k KL is exactly 0 where
    both distributions round to uniform), is a legitimate micro-batch. A constant axis ranks no token; the budget
    max(1, floor(ratio * eligible_i)) is still taken, ties to the earlier position."""
    eligible = torch.tensor([[False, True, False, False], [True, True, True, False]])
    for losses in (torch.zeros(2, 4), torch.full((2, 4), 0.25)):
        entropy = torch.full((2, 4), 3.3)
        selected = tip_loss_mask(rule, 0.5, eligible, losses, entropy, 0.98)
        assert selected.tolist() == [[False, True, False, False], [True, False, False, False]]


def test_the_answer_gate_from_the_trainer_drops_the_handed_tokens_but_those_the_teacher_keeps():
    # rule divergence 50%: TIP picks (0, 0), (0, 2), (1, 0), (2, 1), (2, 3), each rollout's top floor(m/2) k3
    # tokens; the trainer hands the checker the last three tokens of rollout 0 and the last two of rollout 2,
    # and the teacher keeps (2, 2), which TIP did not pick: (0, 2) and (2, 3) go, (2, 2) comes in
    tip = {"rule": "divergence", "ratio": 0.5, "answer_teacher": "confirm", "answer_marker": "####"}
    handed = [[0, 0, 1, 1, 1], [0, 0], [0, 0, 1, 1]]
    kept = [[0, 0, 0, 0, 0], [0, 0], [0, 0, 1, 0]]
    fields = {name: nested([torch.tensor(row, dtype=torch.bool) for row in rows])
              for name, rows in zip(ANSWER_FIELDS, (handed, kept))}
    output, leaf = student_output()
    loss, metrics = run("tip_k3", tip, output=output, data=micro_batch(tip, **fields))
    assert metrics["tip_loss/answer_handed_fraction"].aggregate() == pytest.approx(5 / sum(RESP_LENS))
    assert metrics["tip_loss/answer_kept_fraction"].aggregate() == pytest.approx(1 / sum(RESP_LENS))
    k3 = [[k3_loop(i, t) for t in range(m)] for i, m in enumerate(RESP_LENS)]
    assert top_by_value(k3, 0.5) == [(0, 0), (0, 2), (1, 0), (2, 3), (2, 1)]
    chosen = {(0, 0), (1, 0), (2, 1), (2, 2)}
    expected = sum(k3[i][t] for i, t in chosen) / len(chosen)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()  # the gradient reaches exactly the tokens left with the teacher
    assert {tuple(index) for index in torch.nonzero(leaf.grad).tolist()} == chosen
    with pytest.raises(ValueError, match=r"answer gate from the micro-batch fields \['tip_answer_handed'"):
        run("tip_k3", tip, output=student_output()[0], data=micro_batch(tip))
