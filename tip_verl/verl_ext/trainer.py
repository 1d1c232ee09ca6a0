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
`patches/verl-0.9.1-tip-selected-logprobs.patch` uses to skip the LM head at the other tokens. The full
`response_mask` is put back after the update for verl's metrics (nothing after the update reads `loss_mask`, and
verl clears the step's keys at the end of the step).

What would fail or be wrong at step 1 is refused when the trainer starts (`tip_verl.verl_ext.checks`).

With `trainer.rollout_data_dir` set, verl's rollout dump gets TIP's per-rollout columns (`rollout_columns`).

With `algorithm.tip.answer_teacher=confirm_on_record` the trainer holds the teacher's record on accepted answers
across steps and saves it beside verl's checkpoint (`ANSWER_RECORD_FILE` in each global_step folder).

verl's trainer_base compares `trainer_mode` with the string "sync" in several places (replay buffer,
dataloader refill, checkpoints, in-flight prompts); a subclass registered under another name would
silently run those as an async trainer. `trainer_mode` is therefore pinned to "sync" here, and settings
under `trainer.v1.sync` apply as for the stock sync trainer.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_from_nested, response_to_nested

from tip_verl.core.advantages import select_and_reward
from tip_verl.core.answer_gate import AnswerRecord, answer_gate, answer_span
from tip_verl.core.config import TipConfig
from tip_verl.core.metrics import rollout_columns, tip_metrics
from tip_verl.verl_ext.checks import bypass_mode, check_startup, updates_selected_only
from tip_verl.verl_ext.estimator import TIP_OPD
from tip_verl.verl_ext.losses import ANSWER_FIELDS, loss_route_settings
from tip_verl.verl_ext.rng import selection_generator
from tip_verl.verl_ext.step_context import TipStep, tip_step

logger = logging.getLogger(__name__)

TIP_TRAINER_MODE = "tip_sync"
TIP_SELECTED = "tip_selected"
LOSS_MASKS = ("response_mask", "loss_mask")
RESTORED_MASK = "response_mask"
ANSWER_RECORD_FILE = "tip_answer_record.json"


def sampled_token_teacher_logprobs(teacher_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Teacher log-prob of each sampled response token, padded (bs, response_length).

    teacher_logprobs: nested (bs, prompt_len + response_len, 1), verl's teacher layout for a sampled-token loss
    (position j holds the log-prob of token j + 1); response_mask: nested (bs, response_len).
    """
    response_part = response_from_nested(teacher_logprobs, response_mask).to_padded_tensor(0.0)
    return response_part.reshape(response_part.shape[0], -1)


def padded_bool(mask: torch.Tensor) -> torch.Tensor:
    """A nested (bs, response_len) 0/1 mask as a padded bool (bs, response_length), with no int64 copy."""
    offsets = mask.offsets()
    bools = torch.nested.nested_tensor_from_jagged(mask.values().bool(), offsets, max_seqlen=int(offsets.diff().max()))
    return bools.to_padded_tensor(False)


def tip_input_fields(config) -> list[str]:
    """The TransferQueue fields the trainer's selection reads. `entropy`, for the rules that read it and the
    quadrant metrics, whenever verl computed it (not under bypass mode, where those rules are refused);
    `responses`, where algorithm.tip.answer_teacher looks for the answers."""
    fields = ["response_mask", "old_log_probs", "teacher_logprobs"]
    if not bypass_mode(config):
        fields.append("entropy")
    if TipConfig.from_any(config.algorithm).answer_teacher != "always":
        fields.append("responses")
    return fields


def answer_marker_ids(tokenizer, marker: Optional[str]) -> Optional[list[int]]:
    """algorithm.tip.answer_marker as the token ids the answers are found after, or None without a marker.

    The marker is matched as these ids, the tokenizer's encoding of the marker alone: one that tokenizes
    otherwise inside a response is not found there (`tip/answer/found_fraction` shows how often it is)."""
    if marker is None:
        return None
    ids = tokenizer.encode(marker, add_special_tokens=False)
    if not ids:
        raise ValueError(f"algorithm.tip.answer_marker={marker!r} tokenizes to no token: set another marker.")
    return list(ids)


def checkpoint_folder(trainer_config, global_steps: int, resuming: bool = False) -> str:
    """The global_step folder verl's trainer saves step `global_steps` to, under trainer.default_local_dir, or,
    `resuming`, the one it resumed from: trainer.resume_from_path with resume_mode=resume_path."""
    if resuming and trainer_config.resume_mode == "resume_path":
        return trainer_config.resume_from_path
    return os.path.join(trainer_config.default_local_dir, f"global_step_{global_steps}")


def student_input_fields(config) -> list[str]:
    """The TransferQueue fields of the student's own per-token inputs (no teacher): see tip_input_fields."""
    return [field for field in tip_input_fields(config) if field != "teacher_logprobs"]


def masks_on_selected(masks: TensorDict, selected: torch.Tensor) -> TensorDict:
    """Each nested (bs, response_len) mask in `masks` ANDed with the nested bool `selected` (same layout).

    Each keeps its dtype (verl's int64): TransferQueue fixes a field's dtype at its first put, and a put with
    another dtype fails in its controller, which logs the error and drops the put's later fields.
    """
    restricted = {}
    for name, mask in masks.items():
        if not torch.equal(mask.offsets(), selected.offsets()):
            raise ValueError(f"{name} is not aligned to the response tokens like response_mask; cannot restrict it.")
        restricted[name] = torch.nested.nested_tensor_from_jagged(mask.values() * selected.values(), mask.offsets())
    return TensorDict(restricted, batch_size=masks.batch_size)


def padded_tip_inputs(data: TensorDict) -> dict[str, Optional[torch.Tensor]]:
    """The per-token inputs of TIP's selection, padded (bs, response_length), from the nested fields of
    tip_input_fields: old_log_probs, the sampled token's teacher_logprobs and entropy (each None if not fetched)."""
    fields = data.keys()
    return {
        "old_log_probs": data["old_log_probs"].to_padded_tensor(0.0),
        "teacher_logprobs": (
            sampled_token_teacher_logprobs(data["teacher_logprobs"], data["response_mask"])
            if "teacher_logprobs" in fields
            else None
        ),
        "entropy": data["entropy"].to_padded_tensor(0.0) if "entropy" in fields else None,
    }


@register_trainer(TIP_TRAINER_MODE)
class TipSyncTrainer(PPOTrainerSync):
    """The sync V1 trainer, with `tip_opd` fed entropy, old log-probs and teacher log-probs, the TIP loss route
    (distillation loss_mode=tip_*) fed its settings with every actor update, and the update restricted to the
    selected tokens under mix=teacher_only or preselect."""

    def __init__(self, config):
        advice = check_startup(config)  # what would fail or be wrong at step 1 stops here, naming the key
        if advice:
            logger.warning(advice)
        self.updates_selected_only = updates_selected_only(config)
        self._selected: Optional[torch.Tensor] = None  # this step's selection, from the advantage to the update
        self.dumps_rollouts = bool(config.trainer.get("rollout_data_dir"))
        self._rollout_columns: Optional[dict[str, dict]] = None  # this step's TIP columns of the rollout dump
        self._answer_record = AnswerRecord()  # answer_teacher=confirm_on_record: the teacher's record over the run
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
            batch = super()._compute_advantage(batch, metrics)
            answer = None
            if tip.answer_teacher != "always":
                batch, answer = self._hand_answers_to_the_loss(batch, tip, metrics)
            if self.dumps_rollouts:  # the loss route selects in the actor: the student's inputs only
                fields = student_input_fields(self.config)
                data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
                inputs = padded_tip_inputs(data)
                columns = rollout_columns(
                    padded_bool(data["response_mask"]), answer=answer, old_log_prob=inputs["old_log_probs"],
                    entropy=inputs["entropy"],
                )
                self._rollout_columns = dict(zip(batch.keys, columns))
            return batch
        fields = tip_input_fields(self.config)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask = padded_bool(data["response_mask"])
        answer = None
        if tip.answer_teacher != "always":
            answer = self._answers(data["responses"], response_mask, tip)
        step = TipStep(step_index=self.global_steps - 1, answer=answer, answer_record=self._answer_record,
                       **padded_tip_inputs(data))
        with tip_step(step):
            batch = super()._compute_advantage(batch, metrics)
        if not estimator_selects:  # preselect: verl's own estimator and loss, TIP's choice of tokens
            step.tokens = select_and_reward(
                tip,
                response_mask,
                old_log_probs=step.old_log_probs,
                teacher_logprobs=step.teacher_logprobs,
                entropy=step.entropy,
                generator=selection_generator(tip.seed, step.step_index),
            )
        metrics.update(tip_metrics(step.tokens, response_mask))
        self._selected = response_to_nested(step.tokens.selected, data["response_mask"])
        if self.dumps_rollouts:
            columns = rollout_columns(
                response_mask,
                selected=step.tokens.selected,
                answer=step.answer,
                teacher_reward=step.tokens.teacher_reward,
                divergence=step.tokens.divergence,
                old_log_prob=step.old_log_probs,
                entropy=step.entropy,
            )
            self._rollout_columns = dict(zip(batch.keys, columns))
        return batch

    def _answers(self, responses, response_mask: torch.Tensor, tip: TipConfig) -> torch.Tensor:
        """The answer tokens (bs, T) bool of the nested `responses`: those after algorithm.tip.answer_marker."""
        marker_ids = answer_marker_ids(self.tokenizer, tip.answer_marker)
        return answer_span(responses.to_padded_tensor(0), response_mask, marker_ids)

    def _hand_answers_to_the_loss(self, batch, tip: TipConfig, metrics: dict):
        """The loss route with algorithm.tip.answer_teacher: judge the teacher on this step's answers (the checker's
        scores, the rollout-time teacher log-probs, the run's record) and put the answer tokens the checker
        decides and those the teacher keeps in the batch (ANSWER_FIELDS), where the tip_* loss applies them to
        its selection as tip_opd does. Returns the batch's metadata with them, and the answer tokens (bs, T)."""
        fields = ["response_mask", "responses", "teacher_logprobs", "rm_scores"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        nested_mask = data["response_mask"]
        response_mask = padded_bool(nested_mask)
        answer = self._answers(data["responses"], response_mask, tip)
        gate = answer_gate(
            tip.answer_teacher,
            answer,
            data["rm_scores"].to_padded_tensor(0.0).sum(dim=-1),
            sampled_token_teacher_logprobs(data["teacher_logprobs"], nested_mask),
            tip.endorse_prob,
            tip.correct_threshold,
            record=self._answer_record,
            tolerance=tip.answer_tolerance,
        )
        metrics.update(gate.metrics())
        handed = {name: response_to_nested(mask, nested_mask) for name, mask in zip(ANSWER_FIELDS, gate.handed())}
        batch = tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(handed, batch_size=len(batch))
        )
        return batch, answer

    def _save_checkpoint(self):
        super()._save_checkpoint()
        with open(os.path.join(checkpoint_folder(self.config.trainer, self.global_steps), ANSWER_RECORD_FILE), "w") as f:
            json.dump(self._answer_record.state_dict(), f)

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if self.global_steps == 0:
            return
        path = os.path.join(checkpoint_folder(self.config.trainer, self.global_steps, resuming=True), ANSWER_RECORD_FILE)
        if os.path.exists(path):
            with open(path) as f:
                self._answer_record.load_state_dict(json.load(f))
        elif TipConfig.from_any(self.config.algorithm).answer_teacher == "confirm_on_record":
            logger.warning("No %s beside the checkpoint: the teacher's record on answers starts over.", path)

    def _dump_generations(self, inputs, outputs, gts, scores, reward_extra_infos_dict, dump_path):
        """verl's rollout dump (trainer.rollout_data_dir), each rollout's record with TIP's columns added
        (rollout_columns: its response tokens, what was selected, the teacher reward and the inputs, per token).
        verl names each rollout by its key in `uid`; validation dumps, whose keys are others, pass unchanged."""
        uids = reward_extra_infos_dict.get("uid")
        columns = self._rollout_columns
        if columns and uids and all(uid in columns for uid in uids):
            for name in columns[uids[0]]:
                reward_extra_infos_dict[name] = [columns[uid][name] for uid in uids]
            self._rollout_columns = None
        super()._dump_generations(inputs, outputs, gts, scores, reward_extra_infos_dict, dump_path)

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
        finally:  # after the update verl reads response_mask (metrics), never loss_mask: only one goes back
            tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=full_masks.select(RESTORED_MASK))
        return batch  # later stages get the metadata without tip_selected
