"""Start-up checks of a verl config for tip-verl: what would fail, or train something else, at step 1 is refused
when the `tip_sync` trainer starts (`check_startup`), each error naming the key to set.

- `algorithm.tip` / `algorithm.tip_loss` and the loss route's verl settings: `losses.check_loss_route` (the loss
  functions re-read the same settings at each update);
- the trainer's own selection (tip_opd, preselect): `check_trainer_selection`;
- `algorithm.tip.teacher_trust` and `answer_teacher`: `check_teacher_trust`, `check_answer_teacher`;
- what verl's engines cannot run on the loss route: `check_loss_route_engine`, below;
- CPU mode (`TIP_VERL_CPU=1`): `tip_verl.cpu.checks`, before the others.

The loss-route settings verl 0.9.1's training engines cannot run (docs/multinode.md, "Megatron"):

- A top-k TIP loss (tip_forward_kl_topk, tip_entropy_aware_topk) with `actor_rollout_ref.model.use_fused_kernels=true`.
  verl computes the top-k forward KL inside its logits processor, on the logits the fused-kernel forward never
  builds: Megatron's `MegatronEngineWithLMHead.forward_step` calls the fused forward without the processor, and
  FSDP's `FSDPEngineWithLMHead.prepare_model_outputs` takes top-k outputs from a fused kernel only when the
  kernel brings them, which only VeOmni's does (strategy=veomni). The loss would stop at step 1 on the missing
  `distillation_losses`.
- A random rule (random, entropy_sample) on the loss route with Megatron's dynamic context parallelism
  (`actor_rollout_ref.actor.megatron.dynamic_context_parallel=true`). There verl's `DynamicCPScheduler` forms
  the group of ranks that share a sequence anew for each micro-batch, and each rank reaches a shared micro-batch
  after drawing for micro-batches of its own: the draws of a step's stream (rng.selection_generator) differ
  between the ranks that share a sequence, and each would back-propagate its part of the sequence under
  another selection.
"""

from __future__ import annotations

from typing import Any, Optional

from verl.trainer.distillation.losses import get_distillation_loss_settings

from tip_verl.core.config import TipConfig, config_value
from tip_verl.core.selection import rules_reading, selection_rule_names
from tip_verl.cpu import cpu_mode_requested
from tip_verl.cpu.checks import check_cpu_mode_config
from tip_verl.verl_ext.estimator import TIP_OPD
from tip_verl.verl_ext.losses import TIP_PREFIX, check_loss_route, check_sampled_token_teacher
from tip_verl.verl_ext.selected_lm_head import selected_lm_head_advice

FUSED_KERNELS_KEY = "actor_rollout_ref.model.use_fused_kernels"
FUSED_TOPK_STRATEGIES = ("veomni",)  # engines whose fused kernel computes the top-k forward KL itself
DYNAMIC_CP_KEY = "actor_rollout_ref.actor.megatron.dynamic_context_parallel"


def rules_without(read: str) -> list[str]:
    """The registered rules (with `all`) that do not read `read` (entropy, divergence or random draws)."""
    return [rule for rule in selection_rule_names() if rule not in rules_reading(read)]


def check_loss_route_engine(config: Any, rule: str, loss_mode: str, uses_topk: bool) -> None:
    """Raise if the actor engine configured in `config` (the whole trainer config) cannot run the TIP loss
    `loss_mode` (top-k when `uses_topk`) with selection rule `rule`."""
    strategy = config_value(config, "actor_rollout_ref.actor.strategy")
    if uses_topk and config_value(config, FUSED_KERNELS_KEY) and strategy not in FUSED_TOPK_STRATEGIES:
        raise ValueError(
            f"distillation.distillation_loss.loss_mode={loss_mode} needs verl's top-k forward KL, which verl "
            f"computes from the full logits in its logits processor; with {FUSED_KERNELS_KEY}=true the "
            f"actor_rollout_ref.actor.strategy={strategy} forward never builds them and the loss would fail at "
            f"step 1. Set {FUSED_KERNELS_KEY}=false, or a sampled-token loss_mode (tip_k3, ...)."
        )
    if rule in rules_reading("random") and config_value(config, DYNAMIC_CP_KEY):
        raise ValueError(
            f"algorithm.tip.rule={rule} draws its selection in every rank that computes the loss, but with "
            f"{DYNAMIC_CP_KEY}=true the ranks that share a sequence change from micro-batch to micro-batch and "
            "cannot draw alike, so one sequence would be trained under several selections. Set "
            f"{DYNAMIC_CP_KEY}=false, or a rule without draws ({', '.join(rules_without('random'))})."
        )


def bypass_mode(config) -> bool:
    """algorithm.rollout_correction.bypass_mode: verl reuses the rollout's log-probs as old_log_probs and skips
    the old-log-prob forward, which is what computes `entropy` (trainer_base._compute_old_log_prob)."""
    correction = config.algorithm.get("rollout_correction")
    return bool(correction and correction.get("bypass_mode", False))


def check_trainer_selection(config) -> None:
    """Refuse at start-up what the trainer's own selection (adv_estimator=tip_opd or algorithm.tip.preselect=true)
    would fail on, or get wrong, at step 1."""
    tip = TipConfig.from_any(config.algorithm)
    advantage_route = config.algorithm.adv_estimator == TIP_OPD
    if not (advantage_route or tip.preselect):
        return
    selecting = "algorithm.adv_estimator=tip_opd" if advantage_route else "algorithm.tip.preselect=true"
    if tip.rule in rules_reading("entropy") and bypass_mode(config):
        raise ValueError(
            f"algorithm.tip.rule={tip.rule} reads the student's entropy, which verl does not compute under "
            "algorithm.rollout_correction.bypass_mode=true (it reuses the rollout's log-probs and skips the "
            "old-log-prob forward). Set algorithm.rollout_correction.bypass_mode=false, or a rule that does not "
            f"read entropy: algorithm.tip.rule={' or '.join(rules_without('entropy'))}."
        )
    if config.distillation.enabled:
        check_sampled_token_teacher(selecting, config.distillation.distillation_loss.loss_mode)
    temperature = config.actor_rollout_ref.rollout.temperature
    if advantage_route and temperature != 1.0:
        raise ValueError(
            f"{selecting} rewards log pT(y_t) - log pS_old(y_t), but verl's teacher scores at temperature 1 "
            f"(teacher_manager forces it) while the old log-probs are at actor_rollout_ref.rollout.temperature="
            f"{temperature}: the reward would measure the temperature, not the teacher. Set "
            "actor_rollout_ref.rollout.temperature=1.0."
        )


def check_teacher_trust(config: Any) -> None:
    """Refuse `algorithm.tip.teacher_trust=checked` where it would not act: it judges each prompt's group from
    the rollouts' outcomes and teacher log-probs inside `tip_opd`, so it needs algorithm.adv_estimator=tip_opd."""
    algorithm = config["algorithm"]
    tip = TipConfig.from_any(algorithm.get("tip"))
    if tip.teacher_trust == "verified":
        raise ValueError(
            "algorithm.tip.teacher_trust=verified grades the teacher's own answer to each prompt, which verl's teacher "
            "(a scoring server) does not generate: set algorithm.tip.teacher_trust=checked (evidence from the "
            "student's rollouts) or always. The local demo loop runs verified."
        )
    if tip.teacher_trust == "checked" and algorithm.get("adv_estimator") != TIP_OPD:
        raise ValueError(
            "algorithm.tip.teacher_trust=checked decides per prompt group inside the tip_opd estimator, but "
            f"algorithm.adv_estimator={algorithm.get('adv_estimator')}: set algorithm.adv_estimator=tip_opd (the "
            "advantage route), or algorithm.tip.teacher_trust=always. On verl's loss route (loss_mode=tip_*) it is "
            "not available yet; the local demo loop runs it on both routes."
        )


def check_answer_teacher(config: Any) -> None:
    """Refuse `algorithm.tip.answer_teacher` other than always where it would not act. The tip_sync trainer finds
    the answers and judges the teacher on them; the gate then acts inside the tip_opd estimator (the advantage
    route) or inside a sampled-token tip_* loss (the loss route, from the rollout-time teacher log-prob of each
    sampled token, which a top-k teacher may not return), with verl's task-reward loss on (use_task_rewards) for
    the tokens it takes from the teacher. Not with preselect: verl's own loss would then train no signal at all on
    the answer tokens taken from the teacher."""
    algorithm = config["algorithm"]
    tip = TipConfig.from_any(algorithm.get("tip"))
    if tip.answer_teacher == "always":
        return
    setting = f"algorithm.tip.answer_teacher={tip.answer_teacher}"
    loss_mode = config_value(config, "distillation.distillation_loss.loss_mode", "") or ""
    tip_loss_route = bool(config_value(config, "distillation.enabled", False)) and loss_mode.startswith(TIP_PREFIX)
    if tip.preselect or not (algorithm.get("adv_estimator") == TIP_OPD or tip_loss_route):
        raise ValueError(
            f"{setting} gates the teacher on the answer inside the tip_opd estimator or a tip_* distillation loss, "
            f"but algorithm.adv_estimator={algorithm.get('adv_estimator')}, loss_mode={loss_mode or None}"
            f"{' with algorithm.tip.preselect=true' if tip.preselect else ''}: set algorithm.adv_estimator=tip_opd "
            "(the advantage route) or distillation.distillation_loss.loss_mode=tip_k3 (the loss route), with "
            "algorithm.tip.preselect=false, or answer_teacher=always."
        )
    if algorithm.get("adv_estimator") == TIP_OPD:
        return
    if not config_value(config, "distillation.distillation_loss.use_task_rewards", False):
        raise ValueError(
            f"{setting} on the loss route takes the teacher off the answer tokens it does not confirm and leaves them "
            "to the task reward's GRPO loss, which distillation.distillation_loss.use_task_rewards=false turns off "
            "(those tokens would learn nothing): set use_task_rewards=true, or answer_teacher=always."
        )
    if get_distillation_loss_settings(loss_mode).use_topk:
        raise ValueError(
            f"{setting} judges the teacher on each sampled answer token, but distillation.distillation_loss."
            f"loss_mode={loss_mode} makes the teacher return its top-k only (verl's vLLM and SGLang teachers drop "
            "the sampled token beyond it): set a sampled-token loss_mode (tip_k3, tip_low_var_kl, ...), the "
            "advantage route (algorithm.adv_estimator=tip_opd), or answer_teacher=always."
        )


def updates_selected_only(config: Any) -> bool:
    """Whether the actor update reads only the selected tokens: tip_opd with mix=teacher_only, or preselect."""
    tip = TipConfig.from_any(config.algorithm)
    return tip.preselect or (config.algorithm.adv_estimator == TIP_OPD and tip.mix == "teacher_only")


def check_startup(config: Any) -> Optional[str]:
    """Run every start-up check on the whole trainer config; raise on the first refusal.

    Returns advice that does not stop the run (what the selected-token LM head still needs), or None.
    """
    if cpu_mode_requested():
        check_cpu_mode_config(config)
    tip, _ = check_loss_route(config)
    check_teacher_trust(config)
    check_answer_teacher(config)
    check_trainer_selection(config)
    loss_mode = config_value(config, "distillation.distillation_loss.loss_mode", "")
    if config_value(config, "distillation.enabled") and loss_mode.startswith(TIP_PREFIX):
        check_loss_route_engine(config, tip.rule, loss_mode, get_distillation_loss_settings(loss_mode).use_topk)
    return selected_lm_head_advice(config) if updates_selected_only(config) else None
