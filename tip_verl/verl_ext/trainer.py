"""`tip_sync`: verl's synchronous V1 trainer whose advantage step feeds `tip_opd` its per-token inputs.

verl 0.9.1's `_compute_advantage` hands an estimator only rewards, mask, uid and config. This subclass
reads `entropy` and `old_log_probs` (written by the old-log-prob step) and the response part of
`teacher_logprobs` (written by verl's teacher for the whole sequence) from TransferQueue, binds them for
`tip_opd`, runs verl's own advantage step unchanged, and adds `tip/` metrics.

With `algorithm.tip.mix=teacher_only` the unselected tokens carry no signal, so the actor update reads only
the selected ones; the same holds with `algorithm.tip.preselect=true`, where the trainer selects the tokens
itself (from the same rollout-time scores) for verl's own estimator and distillation loss: for the update
alone, `response_mask` and `loss_mask` are ANDed with the selection (the policy loss, the entropy bonus and
the KL loss then aggregate over the selected tokens; with loss_agg_mode=token-mean that is the paper's 1/|T|),
and the selection is sent as the `tip_selected` field, which the pinned
`patches/verl-0.9.1-tip-selected-logprobs.patch` uses to skip the LM head at the other tokens. The full masks
are put back after the update, for verl's metrics and the next stages.

verl's trainer_base compares `trainer_mode` with the string "sync" in several places (replay buffer,
dataloader refill, checkpoints, in-flight prompts); a subclass registered under another name would
silently run those as an async trainer. `trainer_mode` is therefore pinned to "sync" here, and settings
under `trainer.v1.sync` apply as for the stock sync trainer.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.distillation.losses import get_distillation_loss_settings
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_from_nested, response_to_nested

from tip_verl.core.advantages import select_and_reward
from tip_verl.core.config import TipConfig
from tip_verl.core.metrics import tip_metrics
from tip_verl.verl_ext.estimator import TIP_OPD
from tip_verl.verl_ext.losses import check_loss_route, loss_route_settings
from tip_verl.verl_ext.rng import selection_generator
from tip_verl.verl_ext.selected_lm_head import selected_lm_head_advice
from tip_verl.verl_ext.step_context import TipStep, tip_step

logger = logging.getLogger(__name__)

TIP_TRAINER_MODE = "tip_sync"
TIP_SELECTED = "tip_selected"
LOSS_MASKS = ("response_mask", "loss_mask")


def sampled_token_teacher_logprobs(
    teacher_logprobs: torch.Tensor, response_mask: torch.Tensor, teacher_ids=None, responses=None
) -> torch.Tensor:
    """Teacher log-prob of each sampled response token, padded (bs, response_length).

    teacher_logprobs: nested (bs, prompt_len + response_len, K), verl's teacher layout (position j holds
    the log-prob of token j + 1). With K == 1 that is the sampled token; with top-k (K > 1) the sampled
    token is looked up in `teacher_ids` (same layout) against `responses` (nested (bs, response_len)).
    response_mask: nested (bs, response_len).
    """
    response_part = response_from_nested(teacher_logprobs, response_mask).to_padded_tensor(0.0)
    if response_part.dim() == 2 or response_part.shape[-1] == 1:
        return response_part.reshape(response_part.shape[0], -1)
    if teacher_ids is None or responses is None:
        raise ValueError("Top-k teacher log-probs need teacher_ids and responses to find the sampled token.")
    ids = response_from_nested(teacher_ids, response_mask).to_padded_tensor(-1)
    tokens = responses.to_padded_tensor(-1).unsqueeze(-1)
    found = ids == tokens
    mask = response_mask.to_padded_tensor(0).bool()
    missing = mask & ~found.any(dim=-1)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} sampled response tokens are outside the teacher's top-{ids.shape[-1]}, so "
            "their teacher log-prob is unknown. TIP's selection in the trainer (tip_opd, preselect) needs the sampled "
            "token's log-prob: use an estimator distillation loss (distillation.distillation_loss.loss_mode=k3)."
        )
    return (response_part * found).sum(dim=-1)


def tip_input_fields(config) -> list[str]:
    """The TransferQueue fields TIP's selection reads; with a top-k teacher, also what finds the sampled token."""
    fields = ["response_mask", "old_log_probs", "entropy", "teacher_logprobs"]
    loss_mode = config.distillation.distillation_loss.loss_mode
    if config.distillation.enabled and get_distillation_loss_settings(loss_mode).use_topk:
        fields += ["teacher_ids", "responses"]
    return fields


def updates_selected_only(config) -> bool:
    """Whether the actor update reads only the selected tokens: tip_opd with mix=teacher_only, or preselect."""
    tip = TipConfig.from_any(config.algorithm)
    return tip.preselect or (config.algorithm.adv_estimator == TIP_OPD and tip.mix == "teacher_only")


def masks_on_selected(masks: TensorDict, selected: torch.Tensor) -> TensorDict:
    """Each nested (bs, response_len) mask in `masks` ANDed with the nested bool `selected` (same layout)."""
    restricted = {}
    for name, mask in masks.items():
        if not torch.equal(mask.offsets(), selected.offsets()):
            raise ValueError(f"{name} is not aligned to the response tokens like response_mask; cannot restrict it.")
        restricted[name] = torch.nested.nested_tensor_from_jagged(mask.values() * selected.values(), mask.offsets())
    return TensorDict(restricted, batch_size=masks.batch_size)


@register_trainer(TIP_TRAINER_MODE)
class TipSyncTrainer(PPOTrainerSync):
    """The sync V1 trainer, with `tip_opd` fed entropy, old log-probs and teacher log-probs, the TIP loss route
    (distillation loss_mode=tip_*) fed its settings with every actor update, and the update restricted to the
    selected tokens under mix=teacher_only or preselect."""

    def __init__(self, config):
        check_loss_route(config)  # a typo in algorithm.tip / tip_loss fails at start-up, not at step 1
        self.updates_selected_only = updates_selected_only(config)
        self._selected: Optional[torch.Tensor] = None  # this step's selection, from the advantage to the update
        advice = selected_lm_head_advice(config) if self.updates_selected_only else None
        if advice:
            logger.warning(advice)
        super().__init__(config)

    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        if value not in ("sync", TIP_TRAINER_MODE):
            raise ValueError(f"{type(self).__name__} runs in sync mode only, got trainer_mode={value!r}.")

    def _compute_advantage(self, batch, metrics: dict):
        tip = TipConfig.from_any(self.config.algorithm)
        estimator_selects = self.config.algorithm.adv_estimator == TIP_OPD
        if not (estimator_selects or tip.preselect):
            return super()._compute_advantage(batch, metrics)
        fields = tip_input_fields(self.config)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        step = TipStep(
            step=self.global_steps - 1,
            old_log_probs=data["old_log_probs"].to_padded_tensor(0.0),
            entropy=data["entropy"].to_padded_tensor(0.0),
            teacher_logprobs=sampled_token_teacher_logprobs(
                data["teacher_logprobs"], data["response_mask"], data.get("teacher_ids"), data.get("responses")
            ),
        )
        with tip_step(step):
            batch = super()._compute_advantage(batch, metrics)
        response_mask = data["response_mask"]
        if not estimator_selects:  # preselect: verl's own estimator and loss, TIP's choice of tokens
            step.tokens = select_and_reward(
                tip,
                response_mask.to_padded_tensor(0),
                old_log_probs=step.old_log_probs,
                teacher_logprobs=step.teacher_logprobs,
                entropy=step.entropy,
                generator=selection_generator(tip.seed, step.step),
            )
        metrics.update(tip_metrics(step.tokens, response_mask.to_padded_tensor(0)))
        self._selected = response_to_nested(step.tokens.selected, response_mask)
        return batch

    def _update_actor(self, batch, metrics: dict):
        # verl's actor worker never sees `algorithm`; extra_info reaches every micro-batch of the update.
        batch.extra_info.update(loss_route_settings(self.config, self.global_steps))
        if not self.updates_selected_only:
            return super()._update_actor(batch, metrics)
        selected, self._selected = self._selected, None
        full_masks = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=list(LOSS_MASKS))
        update_fields = masks_on_selected(full_masks, selected)
        update_fields[TIP_SELECTED] = selected
        update_batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=update_fields)
        update_batch.extra_info.update(batch.extra_info)
        try:
            super()._update_actor(update_batch, metrics)
        finally:
            tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=full_masks)
        return batch  # later stages get the metadata without tip_selected
