"""The TIP loss route: distillation losses registered with verl's `register_distillation_loss`.

Each divergence is registered once, below, in the core registry (`tip_verl.core.distill_losses.
register_divergence`); verl's loss_mode names, the correct_loss / wrong_loss values each path accepts and the
start-up checks follow from it. Select one with `distillation.distillation_loss.loss_mode`:
  tip_<estimator> (tip_k3, tip_low_var_kl, tip_k2, tip_mse, tip_abs, tip_k1, tip_kl): verl's sampled-token
      KL estimate (`kl_penalty`, as loss_mode=<estimator>), kept on the TIP-selected tokens only; k3 and
      low_var_kl (one estimate) without verl's clamps, which would give the most divergent tokens a constant
      loss and no gradient (`tip_verl.core.distill_losses.k3_divergence`);
  tip_forward_kl_topk: verl's forward KL over the teacher's top-k (as loss_mode=forward_kl_topk), same mask;
  tip_entropy_aware_topk: the same forward KL, only where the teacher's entropy over its renormalised top-k
      is >= algorithm.tip_loss.teacher_entropy_tau, then the TIP mask.
verl then aggregates the returned (bsz, response_length) losses (`distillation_loss`, agg_loss over the
response mask) and adds coef x that to the task loss (`distillation_ppo_loss`); the weights returned here
make that aggregate a mean over the selected tokens and apply the teacher-coefficient schedule.

Settings reach the loss with the micro-batch: verl's actor worker never sees the `algorithm` section, so the
`tip_sync` trainer puts `loss_route_settings(config, global_steps)` in the batch's extra_info before the
actor update, and verl hands extra_info to every micro-batch as non-tensor data.

The batch the selection sees is that micro-batch, on one data-parallel rank: verl's engine cuts each rank's
share of a mini-batch (actor.ppo_mini_batch_size x rollout.n rollouts over the ranks) into micro-batches of
actor.ppo_micro_batch_size_per_gpu rollouts, or with actor.use_dynamic_bsz of up to
actor.ppo_max_token_len_per_gpu tokens, and the loss runs once per micro-batch, every mini-batch and every
epoch (actor.ppo_epochs), on the current student. Budgets and the per-response rules (all, random, entropy,
entropy_sample, divergence) do not depend on it; soft_or and q3 take their entropy quantile and min-max over
it. The selection stays here, not in the trainer, because what it ranks on (the current per-token loss, for
top-k the logits processor's forward KL, and the update forward's entropy) exists only in the actor; one
selection per step from rollout-time scores is algorithm.tip.preselect with verl's own loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from tensordict import TensorDict
from verl.trainer.distillation import losses as verl_losses
from verl.trainer.distillation.losses import (
    DistillationLossSettings,
    get_distillation_loss_settings,
    register_distillation_loss,
)
from verl.trainer.ppo.core_algos import kl_penalty
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from tip_verl.core.answer_gate import hand_answer_to_checker
from tip_verl.core.config import TipConfig, config_value
from tip_verl.core.distill_losses import (
    DIVERGENCES,
    TipLossConfig,
    check_loss_inputs,
    divergence_names,
    k3_divergence,
    losses_by_outcome,
    register_divergence,
    rollout_correct,
    selected_token_weights,
    split_by_outcome,
    teacher_topk_entropy,
    tip_loss_mask,
)
from tip_verl.core.schedule import teacher_coef_multiplier
from tip_verl.core.selection import rules_reading
from tip_verl.verl_ext.rng import selection_generator

TIP_PREFIX = "tip_"
SETTINGS_KEY = "tip_loss_route"
# With algorithm.tip.answer_teacher, the tip_sync trainer's answer gate per response token (core.answer_gate,
# AnswerGate.handed): the answer tokens the checker decides, and those of them the teacher keeps.
ANSWER_FIELDS = ("tip_answer_handed", "tip_answer_kept")


def verl_kl_penalty(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """verl's own sampled-token estimate `name` (kl_penalty), (B, T) student and teacher log-probs -> (B, T)."""

    def estimate(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
        return kl_penalty(logprob=student_log_probs, ref_logprob=teacher_log_probs, kl_penalty=name)

    return estimate


# The divergences of verl's estimator and top-k losses. A new one registered here becomes loss_mode=tip_<name>
# and a correct_loss / wrong_loss value of its path; its start-up checks follow.
for _name in ("kl", "k1", "abs", "mse", "k2"):
    register_divergence(_name, teacher="sampled_token")(verl_kl_penalty(_name))
register_divergence("low_var_kl", "k3", teacher="sampled_token")(k3_divergence)  # kl_penalty clamps both
register_divergence("forward_kl_topk", teacher="topk")(verl_losses.compute_forward_kl_topk)

ESTIMATOR_NAMES = divergence_names("sampled_token")
TOPK_NAMES = divergence_names("topk")
ENTROPY_AWARE_TOPK = "tip_entropy_aware_topk"  # forward_kl_topk, gated by the teacher's top-k entropy
ESTIMATOR_LOSSES = tuple(TIP_PREFIX + name for name in ESTIMATOR_NAMES)
TOPK_LOSSES = (*(TIP_PREFIX + name for name in TOPK_NAMES), ENTROPY_AWARE_TOPK)


def check_loss_route(config: Any) -> tuple[TipConfig, TipLossConfig]:
    """Validate `algorithm.tip`, `algorithm.tip_loss` and, for a tip_* loss_mode, its verl settings.

    config: the whole trainer config (DictConfig or nested dicts). Returns the two typed sections.
    """
    algorithm = config["algorithm"]
    tip = TipConfig.from_any(algorithm.get("tip"))
    tip_loss = TipLossConfig.from_any(algorithm.get("tip_loss"))
    distillation = config_value(config, "distillation", {})
    loss_config = config_value(distillation, "distillation_loss", {})
    loss_mode = config_value(loss_config, "loss_mode", "")
    if tip.preselect:
        _check_preselect(algorithm.get("adv_estimator"), distillation, loss_mode, loss_config)
    if distillation.get("enabled") and loss_mode.startswith(TIP_PREFIX):
        _check_loss_config(loss_mode, loss_config, tip_loss)
        actor = config_value(config, "actor_rollout_ref.actor", {})
        if tip.rule in rules_reading("entropy") and not (actor.get("calculate_entropy") or actor.get("entropy_coeff")):
            raise ValueError(
                f"algorithm.tip.rule={tip.rule} on the loss route needs the student's entropy in the update "
                "forward pass: set actor_rollout_ref.actor.calculate_entropy=true."
            )
    return tip, tip_loss


def _check_preselect(adv_estimator: Optional[str], distillation: Any, loss_mode: str, loss_config: Any) -> None:
    if adv_estimator == "tip_opd":
        raise ValueError(
            "algorithm.tip.preselect=true is for verl's own distillation loss; with the tip_opd estimator set "
            "algorithm.tip.mix=teacher_only instead (it trains only the selected tokens too)."
        )
    if not distillation.get("enabled"):
        raise ValueError("algorithm.tip.preselect=true scores tokens with the teacher: set distillation.enabled=true.")
    if loss_mode.startswith(TIP_PREFIX):
        raise ValueError(
            f"algorithm.tip.preselect=true with loss_mode={loss_mode} would select twice (tip_* losses select inside "
            f"the loss): use verl's own loss_mode={loss_mode[len(TIP_PREFIX):]}, or unset preselect."
        )
    if loss_config.get("use_task_rewards"):
        raise ValueError(
            "algorithm.tip.preselect=true trains only the selected tokens, which would cut the task-reward loss too: "
            "set distillation.distillation_loss.use_task_rewards=false (pure on-policy distillation)."
        )
    check_sampled_token_teacher("algorithm.tip.preselect=true", loss_mode)


def check_sampled_token_teacher(selecting: str, loss_mode: str) -> None:
    """Raise if the teacher of `loss_mode` returns a top-k, where the trainer's selection (`selecting`) needs the
    sampled token's teacher log-prob."""
    if get_distillation_loss_settings(loss_mode).use_topk:
        raise ValueError(
            f"{selecting} selects tokens in the trainer from the sampled token's teacher log-prob, but "
            f"distillation.distillation_loss.loss_mode={loss_mode} makes the teacher return its top-k only: verl's "
            "vLLM and SGLang teachers drop the sampled token when its rank exceeds distillation.distillation_loss."
            "topk, so step 1 would miss it. Set a sampled-token loss_mode (k3, low_var_kl, k2, ...); for top-k "
            "distillation select inside the loss instead: algorithm.adv_estimator=grpo with "
            "loss_mode=tip_forward_kl_topk and algorithm.tip.preselect=false."
        )


def _check_loss_config(loss_mode: str, loss_config: Any, tip_loss: TipLossConfig) -> None:
    if loss_mode in ESTIMATOR_LOSSES:
        tip_loss.check_divergences(ESTIMATOR_NAMES, "estimator (sampled-token)")
    elif loss_mode in TOPK_LOSSES:
        tip_loss.check_divergences(TOPK_NAMES, "top-k")
    else:
        raise ValueError(
            f"distillation.distillation_loss.loss_mode={loss_mode!r} is not a TIP loss; "
            f"set one of {list(ESTIMATOR_LOSSES + TOPK_LOSSES)}."
        )
    if loss_config.get("loss_max_clamp") is not None:
        raise ValueError(
            "TIP losses need distillation.distillation_loss.loss_max_clamp=null: verl clamps the returned losses "
            "after the TIP weights (up to 1/ratio) are applied, which would cut the selected tokens' losses."
        )
    signed = {"k1", "kl"} & {loss_mode[len(TIP_PREFIX) :], tip_loss.correct_loss, tip_loss.wrong_loss}
    if signed and not loss_config.get("use_policy_gradient", False):
        raise ValueError(
            f"The k1/kl estimate ({sorted(signed)}) has no teacher in its gradient when back-propagated directly: "
            "set distillation.distillation_loss.use_policy_gradient=true or pick k3/low_var_kl/k2."
        )


def loss_route_settings(config: Any, global_steps: int) -> dict:
    """What the trainer adds to the actor-update batch's extra_info: {SETTINGS_KEY: plain dict}.

    config: the whole trainer config; global_steps: verl's 1-based step counter of the update.
    """
    tip, tip_loss = check_loss_route(config)
    settings = {"tip": dataclasses.asdict(tip), "tip_loss": dataclasses.asdict(tip_loss), "step": global_steps - 1}
    return {SETTINGS_KEY: settings}


def _read_settings(data: TensorDict) -> tuple[TipConfig, TipLossConfig, int]:
    settings = tu.get_non_tensor_data(data=data, key=SETTINGS_KEY, default=None)
    if settings is None:
        raise ValueError(
            "TIP losses (distillation.distillation_loss.loss_mode=tip_*) read algorithm.tip and algorithm.tip_loss "
            "from the micro-batch, where they are missing: use trainer.use_v1=true trainer.v1.trainer_mode=tip_sync, "
            f"whose trainer sends them with each actor update (extra_info['{SETTINGS_KEY}'])."
        )
    return TipConfig.from_any(settings["tip"]), TipLossConfig.from_any(settings["tip_loss"]), int(settings["step"])


def _response_mask(data: TensorDict) -> torch.Tensor:
    mask = data["response_mask"]
    return (mask.to_padded_tensor(0) if mask.is_nested else mask).bool()


def _rollout_scores(data: TensorDict, field: str, response_mask: torch.Tensor) -> torch.Tensor:
    """The rollouts' per-token scores (bsz, response_length) from the micro-batch field `field`."""
    if field not in data.keys():
        raise ValueError(
            f"The outcome split (algorithm.tip_loss.correct_loss / wrong_loss) reads each rollout's score from the "
            f"micro-batch field {field!r}, which is not there; fields present: {sorted(data.keys())}. "
            "Set algorithm.tip_loss.score_field to one of them, or unset correct_loss and wrong_loss."
        )
    scores = data[field]
    scores = scores.to_padded_tensor(0.0) if scores.is_nested else scores
    if scores.shape[0] != response_mask.shape[0]:
        raise ValueError(f"{field} holds {scores.shape[0]} rollouts but the micro-batch has {response_mask.shape[0]}.")
    return scores.reshape(scores.shape[0], -1)


def _answer_gate_fields(tip: TipConfig, data: TensorDict) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """With algorithm.tip.answer_teacher, the trainer's ANSWER_FIELDS of the micro-batch, padded (bsz, T) bool."""
    if tip.answer_teacher == "always":
        return None
    missing = [name for name in ANSWER_FIELDS if name not in data.keys()]
    if missing:
        raise ValueError(
            f"algorithm.tip.answer_teacher={tip.answer_teacher} on the loss route reads the answer gate from the "
            f"micro-batch fields {missing}, which are not there: use trainer.v1.trainer_mode=tip_sync, whose trainer "
            "judges the answers and sends them with each actor update."
        )
    handed, kept = (data[name] for name in ANSWER_FIELDS)
    return tuple((mask.to_padded_tensor(0) if mask.is_nested else mask).bool() for mask in (handed, kept))


def token_share(count: int, data: TensorDict) -> Metric:
    """`count` tokens of this micro-batch as a metric that verl reduces to their share of the mini-batch's response
    tokens, over all micro-batches and data-parallel ranks.

    verl's engine puts on every micro-batch `batch_num_tokens`, the mini-batch's loss-mask tokens summed over the
    data-parallel group (its response tokens: verl's loss_mask is the response_mask), and `dp_size`. verl reduces
    a SUM metric by averaging each micro-batch's value over the data-parallel ranks, then summing over
    micro-batches (`Metric.aggregate_dp`), so `count * dp_size / batch_num_tokens` adds up to the exact share, as
    verl's own `actor/pg_loss` adds up to the mini-batch's token mean. Its trainer averages the mini-batches
    (`reduce_metrics`), epochs included.
    """
    return Metric(AggregationType.SUM, count * data["dp_size"] / max(data["batch_num_tokens"], 1))


def apply_tip(
    settings: tuple[TipConfig, TipLossConfig, int],
    config: Any,
    model_output: dict,
    data: TensorDict,
    own_divergence: str,
    divergence: Callable[[str], torch.Tensor],
    gate: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Split by outcome, gate, select and weight per-token distillation losses.

    settings: (algorithm.tip, algorithm.tip_loss, 0-based step) read from the micro-batch;
    config: verl's ActorConfig (loss_agg_mode); model_output: may hold `entropy` (nested, whole sequence);
    data: the micro-batch; own_divergence: the loss_mode's divergence, what rollouts get unless split by outcome;
    divergence(name): (bsz, response_length) per-token losses of the divergence `name`;
    gate: bool (bsz, response_length) tokens allowed in, or None.
    With algorithm.tip.answer_teacher, the checker then decides the answer tokens (ANSWER_FIELDS, sent by the
    tip_sync trainer): of them only those the teacher confirms keep the divergence.
    Returns weighted per-token losses (bsz, response_length) for verl's aggregation, and metrics.
    """
    tip, tip_loss, step = settings
    response_mask = _response_mask(data)
    metrics: dict[str, Any] = {}
    eligible = response_mask
    if tip_loss.splits_by_outcome:
        scores = _rollout_scores(data, tip_loss.score_field, response_mask)
        correct = rollout_correct(scores, tip.correct_threshold)
        losses, keep = losses_by_outcome(split_by_outcome(tip_loss, correct, own_divergence), divergence)
        eligible = eligible & keep.unsqueeze(-1)
        metrics["tip_loss/correct_fraction"] = correct.float().mean().item()
    else:
        losses = divergence(own_divergence)
    if gate is not None:
        eligible = eligible & gate
        metrics["tip_loss/gate_fraction"] = token_share(int((gate & response_mask).sum()), data)
    entropy = model_output.get("entropy")
    entropy = no_padding_2_padding(entropy, data) if entropy is not None else None
    check_loss_inputs(response_mask, distillation_losses=losses, entropy=entropy)
    generator = selection_generator(tip.seed, step)
    selected = tip_loss_mask(
        tip.rule,
        tip.ratio,
        eligible,
        losses,
        entropy,
        tip.entropy_quantile,
        generator,
        divergence_quantile=tip.divergence_quantile,
    )
    answer_gate = _answer_gate_fields(tip, data)
    if answer_gate is not None:  # the checker decides the answer, as in tip_opd
        handed, kept = (mask & response_mask for mask in answer_gate)
        selected = hand_answer_to_checker(selected, handed, kept) & response_mask
        metrics["tip_loss/answer_handed_fraction"] = token_share(int(handed.sum()), data)
        metrics["tip_loss/answer_kept_fraction"] = token_share(int(kept.sum()), data)
    multiplier = teacher_coef_multiplier(
        step, tip_loss.schedule, tip_loss.warmup_steps, tip_loss.anneal_steps, tip_loss.final_coef
    )
    weights = selected_token_weights(selected, response_mask, config.loss_agg_mode, losses.dtype) * multiplier
    n_selected = int(selected.sum())
    metrics["tip_loss/selected_fraction"] = token_share(n_selected, data)
    metrics["tip_loss/coef_multiplier"] = multiplier
    metrics["tip_loss/selected_loss_mean"] = (losses.detach() * selected).sum().item() / max(n_selected, 1)
    return losses * weights, metrics


@register_distillation_loss(DistillationLossSettings(names=list(ESTIMATOR_LOSSES), use_estimator=True))  # type: ignore[arg-type]
def compute_tip_estimator_loss(
    config: Any, distillation_config: Any, model_output: dict, data: TensorDict
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's sampled-token KL estimate (kl_penalty; k3 and low_var_kl unclamped) on the TIP-selected tokens.

    Returns (bsz, response_length). The rules rank on the same unclamped values, detached.

    model_output["log_probs"]: nested (bsz, seq) student log pS(y_t); data["teacher_logprobs"]: nested
    (bsz, seq, 1) teacher log pT(y_t); both cut to the response here as in verl's own estimator loss.
    """
    loss_config = distillation_config.distillation_loss
    settings = _read_settings(data)
    _check_loss_config(loss_config.loss_mode, loss_config, settings[1])
    if model_output.get("log_probs") is None or "teacher_logprobs" not in data.keys():
        raise ValueError(
            "The TIP estimator loss needs the student's log_probs and the teacher's teacher_logprobs in the "
            "micro-batch: enable the teacher (distillation.enabled=true, distillation.teacher_models.*)."
        )
    student = no_padding_2_padding(model_output["log_probs"], data)
    teacher = no_padding_2_padding(data["teacher_logprobs"], data)
    if teacher.dim() == 3 and teacher.shape[-1] != 1:
        raise ValueError(
            f"teacher_logprobs has top-{teacher.shape[-1]} log-probs, but {loss_config.loss_mode} needs the sampled "
            "token's: use a top-k loss_mode (tip_forward_kl_topk) or an estimator loss_mode without top-k."
        )
    teacher = teacher.reshape(student.shape)
    check_loss_inputs(_response_mask(data), student_log_probs=student, teacher_log_probs=teacher)

    def divergence(name: str) -> torch.Tensor:
        return DIVERGENCES[name].per_token(student, teacher)

    return apply_tip(settings, config, model_output, data, loss_config.loss_mode[len(TIP_PREFIX) :], divergence)


@register_distillation_loss(DistillationLossSettings(names=list(TOPK_LOSSES), use_topk=True))  # type: ignore[arg-type]
def compute_tip_topk_loss(
    config: Any, distillation_config: Any, model_output: dict, data: TensorDict
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's top-k forward KL on the TIP-selected (and, for tip_entropy_aware_topk, gated) tokens.

    model_output["distillation_losses"]: nested (bsz, seq), written by verl's top-k logits processor;
    data["teacher_logprobs"]: nested (bsz, seq, K). Returns (bsz, response_length).
    """
    loss_config = distillation_config.distillation_loss
    settings = _read_settings(data)
    _check_loss_config(loss_config.loss_mode, loss_config, settings[1])
    gate = None
    own_divergence = loss_config.loss_mode[len(TIP_PREFIX) :]
    if loss_config.loss_mode == ENTROPY_AWARE_TOPK:
        own_divergence = "forward_kl_topk"
        teacher_topk = no_padding_2_padding(data["teacher_logprobs"], data)
        gate = teacher_topk_entropy(teacher_topk) >= settings[1].teacher_entropy_tau
    losses, metrics = DIVERGENCES[own_divergence].per_token(config, distillation_config, model_output, data)

    def divergence(name: str) -> torch.Tensor:
        if name == own_divergence:
            return losses
        return DIVERGENCES[name].per_token(config, distillation_config, model_output, data)[0]

    weighted, tip_metrics = apply_tip(settings, config, model_output, data, own_divergence, divergence, gate)
    metrics.update(tip_metrics)
    return weighted, metrics
