"""The `tip_opd` advantage estimator, registered in verl's ADV_ESTIMATOR_REGISTRY."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, register_adv_est

from tip_verl.core.advantages import gate_answer, mix_advantages, select_and_reward
from tip_verl.core.config import TipConfig, config_value
from tip_verl.core.trust import teacher_trust
from tip_verl.verl_ext.rng import selection_generator
from tip_verl.verl_ext.step_context import current_step

TIP_OPD = "tip_opd"


@register_adv_est(TIP_OPD)
def compute_tip_opd_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    config: Optional[Any] = None,
    old_log_probs: Optional[torch.Tensor] = None,
    teacher_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    epsilon: float = 1e-6,
    reward_baselines: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid TIP-OPD + GRPO advantage.

    On the tokens TIP selects, the student gets coef * r_t with r_t = log pT(y_t) - log pS_old(y_t)
    (the per-token reverse-KL teacher signal); elsewhere it keeps verl's GRPO outcome advantage
    (`mix`: replace, add or teacher_only; see TipConfig). With `teacher_trust=checked` a group whose checker
    outcomes contradict the teacher keeps the GRPO advantage on every token (tip_verl.core.trust). With
    `answer_teacher` other than always, the answer tokens the teacher may not refute keep it too
    (tip_verl.core.answer_gate; the trainer binds the answer tokens).

    Args:
        token_level_rewards: (bs, response_length) outcome rewards; their row sum is the rollout's score.
        response_mask: (bs, response_length) 1 on valid response tokens.
        index: (bs,) prompt ids grouping the rollouts of one prompt (GRPO groups).
        config: verl's `algorithm` config (DictConfig or dict) holding `tip` and `norm_adv_by_std_in_grpo`,
            or the `tip` section itself.
        old_log_probs: (bs, response_length) log pS_old(y_t) of the sampled tokens.
        teacher_logprobs: (bs, response_length) log pT(y_t) of the same tokens, response part only.
        entropy: (bs, response_length) student entropy in nats; needed by the entropy-based rules.
        epsilon: added to the GRPO group std.
        reward_baselines: accepted for verl's call signature; unused.

    The three per-token inputs may instead be bound by the `tip_sync` trainer (see step_context), which also
    binds the answer tokens.

    Returns:
        advantages: (bs, response_length); returns: (bs, response_length), equal to advantages.
    """
    tip_config = TipConfig.from_any(config)
    step = current_step()
    if step is not None:
        old_log_probs = old_log_probs if old_log_probs is not None else step.old_log_probs
        teacher_logprobs = teacher_logprobs if teacher_logprobs is not None else step.teacher_logprobs
        entropy = entropy if entropy is not None else step.entropy
    tokens = select_and_reward(
        tip_config,
        response_mask,
        old_log_probs=old_log_probs,
        teacher_logprobs=teacher_logprobs,
        entropy=entropy,
        generator=selection_generator(tip_config.seed, step.step_index if step is not None else None),
    )
    gate_answer(tokens, tip_config, step.answer if step is not None else None, token_level_rewards.sum(dim=-1),
                teacher_logprobs, record=step.answer_record if step is not None else None)
    outcome_advantages, _ = compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=index,
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=config_value(config, "norm_adv_by_std_in_grpo", True),
    )
    if tip_config.teacher_trust != "always":
        teacher_correct = step.teacher_correct if step is not None else None
        if tip_config.teacher_trust == "verified" and teacher_correct is None:
            raise ValueError(
                "algorithm.tip.teacher_trust=verified needs the checker's verdict on the teacher's own answer to "
                "each prompt (TipStep.teacher_correct), which no one bound: use teacher_trust=checked."
            )
        tokens.trust = teacher_trust(
            token_level_rewards.sum(dim=-1), index, teacher_logprobs, response_mask,
            tip_config.endorse_prob, tip_config.correct_threshold, teacher_correct=teacher_correct,
        )
    advantages = mix_advantages(
        outcome_advantages, tokens.teacher_reward, tokens.selected, response_mask, tip_config.mix, tip_config.coef,
        distrusted=None if tokens.trust is None else tokens.trust.distrusted,
    )
    if step is not None:
        step.tokens = tokens
    return advantages, advantages
