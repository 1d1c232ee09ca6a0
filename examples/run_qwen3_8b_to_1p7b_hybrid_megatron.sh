#!/usr/bin/env bash
# Hybrid TIP-OPD + GRPO, Qwen3-8B teacher -> Qwen3-1.7B student, Megatron + vLLM, one 8-GPU node.
#
# What it runs: verl's V1 trainer in tip-verl's `tip_sync` mode with the `tip_opd` advantage estimator
# (the advantage route). On the tokens TIP selects (Soft-OR, 50% of each response) the student gets the
# per-token teacher reward coef * (log pT(y_t) - log pS_old(y_t)); every other token keeps the GRPO outcome
# advantage (mix=replace). The teacher is served by vLLM through verl's distillation.teacher_models and
# returns the sampled token's log-prob for every response token. verl's own distillation loss term is
# switched off (distillation_loss_coef=0): the teacher signal enters through the advantage only.
#
# The same run as run_qwen3_8b_to_1p7b_hybrid_fsdp.sh on verl's Megatron backend (ppo_megatron_trainer config):
# the student is trained with Megatron-Core (weights converted from the Hugging Face checkpoint by mbridge).
#
# Resources: 1 node x 8 GPUs (80 GB class). 6 GPUs: student (Megatron actor TP 2 x PP 1 x DP 3 + colocated
# vLLM rollout, TP 1);
# 2 GPUs: teacher (vLLM, TP 1, one replica per GPU). Data: verl's MATH parquet
# (python3 examples/data_preprocess/math_dataset.py in verl's repository writes ~/data/math/*.parquet).
#
# Knobs (environment): STUDENT_MODEL, TEACHER_MODEL, TRAIN_FILES, VAL_FILES, TIP_RULE (soft_or),
#   TIP_RATIO (0.5), TIP_MIX (replace|add|teacher_only), TIP_COEF (1.0), ROLLOUT_N (8), NNODES (1),
#   STUDENT_GPUS (6 per node), TEACHER_GPUS (2 per node), TEACHER_TP (1), ACTOR_TP (2), ACTOR_PP (1),
#   PROJECT, EXPERIMENT. STUDENT_GPUS must be a multiple of ACTOR_TP * ACTOR_PP (verl's validate_config checks it).
# Shared settings (data, actor, rollout, teacher, trainer, the two TIP routes): common_qwen3_8b_to_1p7b.sh.
# Any further hydra override can be appended: bash run_qwen3_8b_to_1p7b_hybrid_megatron.sh trainer.total_epochs=2
# algorithm.tip is tip-verl's section, added with `+algorithm.tip.<key>=...` (see docs/config.md); to change
# a key this script already sets, pass `algorithm.tip.<key>=...` (no `+`) or use the environment knob.
set -xeuo pipefail

RUN_NAME=hybrid_megatron
ACTOR_TP=${ACTOR_TP:-2}
ACTOR_PP=${ACTOR_PP:-1}
source "$(dirname "${BASH_SOURCE[0]}")/common_qwen3_8b_to_1p7b.sh"

MEGATRON_ACTOR=(
    actor_rollout_ref.actor.strategy=megatron
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size=${ACTOR_TP}
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=${ACTOR_PP}
    actor_rollout_ref.actor.megatron.use_mbridge=true
    actor_rollout_ref.actor.megatron.param_offload=false
    actor_rollout_ref.actor.megatron.optimizer_offload=false
)

python3 -m verl.trainer.main_ppo --config-name=ppo_megatron_trainer \
    "${COMMON[@]}" "${MEGATRON_ACTOR[@]}" "${ADVANTAGE_ROUTE[@]}" "$@"
