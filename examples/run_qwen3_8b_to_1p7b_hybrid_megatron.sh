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
#   TIP_RATIO (0.5), TIP_MIX (replace|add|teacher_only), TIP_COEF (1.0), ROLLOUT_N (8),
#   STUDENT_GPUS (6), TEACHER_GPUS (2), TEACHER_TP (1), ACTOR_TP (2), ACTOR_PP (1), PROJECT, EXPERIMENT.
#   STUDENT_GPUS must be a multiple of ACTOR_TP * ACTOR_PP (verl's validate_config checks it).
# Any further hydra override can be appended: bash run_qwen3_8b_to_1p7b_hybrid_megatron.sh trainer.total_epochs=2
# algorithm.tip is tip-verl's section, added with `+algorithm.tip.<key>=...` (see docs/config.md); to change
# a key this script already sets, pass `algorithm.tip.<key>=...` (no `+`) or use the environment knob.
set -xeuo pipefail

STUDENT_MODEL=${STUDENT_MODEL:-Qwen/Qwen3-1.7B}
TEACHER_MODEL=${TEACHER_MODEL:-Qwen/Qwen3-8B}
TRAIN_FILES=${TRAIN_FILES:-$HOME/data/math/train.parquet}
VAL_FILES=${VAL_FILES:-$HOME/data/math/test.parquet}
TIP_RULE=${TIP_RULE:-soft_or}
TIP_RATIO=${TIP_RATIO:-0.5}
TIP_MIX=${TIP_MIX:-replace}
TIP_COEF=${TIP_COEF:-1.0}
ROLLOUT_N=${ROLLOUT_N:-8}
STUDENT_GPUS=${STUDENT_GPUS:-6}
TEACHER_GPUS=${TEACHER_GPUS:-2}
TEACHER_TP=${TEACHER_TP:-1}
ACTOR_TP=${ACTOR_TP:-2}
ACTOR_PP=${ACTOR_PP:-1}
PROJECT=${PROJECT:-tip_verl}
EXPERIMENT=${EXPERIMENT:-qwen3_8b_to_1p7b_hybrid_megatron_${TIP_RULE}_${TIP_RATIO}}

MAX_PROMPT=1024
MAX_RESPONSE=4096
MAX_TOKENS_PER_GPU=$(( (MAX_PROMPT + MAX_RESPONSE) * 4 ))

DATA=(
    data.train_files="${TRAIN_FILES}"
    data.val_files="${VAL_FILES}"
    data.train_batch_size=96
    data.max_prompt_length=${MAX_PROMPT}
    data.max_response_length=${MAX_RESPONSE}
    data.filter_overlong_prompts=true
    data.truncation=error
)

MODEL=(
    actor_rollout_ref.model.path="${STUDENT_MODEL}"
    actor_rollout_ref.model.use_remove_padding=true
    actor_rollout_ref.model.enable_gradient_checkpointing=true
)

ACTOR=(
    actor_rollout_ref.actor.strategy=megatron
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size=${ACTOR_TP}
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=${ACTOR_PP}
    actor_rollout_ref.actor.megatron.use_mbridge=true
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=48
    actor_rollout_ref.actor.use_dynamic_bsz=true
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=${MAX_TOKENS_PER_GPU}
    actor_rollout_ref.actor.loss_agg_mode=token-mean
    actor_rollout_ref.actor.use_kl_loss=false
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.megatron.param_offload=false
    actor_rollout_ref.actor.megatron.optimizer_offload=false
)

ROLLOUT=(
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.tensor_model_parallel_size=1
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.n=${ROLLOUT_N}
    actor_rollout_ref.rollout.temperature=1.0
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=${MAX_TOKENS_PER_GPU}
)

TEACHER=(
    distillation.enabled=true
    distillation.n_gpus_per_node=${TEACHER_GPUS}
    distillation.nnodes=1
    distillation.teacher_models.teacher_model.model_path="${TEACHER_MODEL}"
    distillation.teacher_models.teacher_model.inference.name=vllm
    distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=${TEACHER_TP}
    distillation.teacher_models.teacher_model.inference.gpu_memory_utilization=0.85
    distillation.teacher_models.teacher_model.inference.max_model_len=$(( MAX_PROMPT + MAX_RESPONSE + 1 ))
    distillation.distillation_loss.loss_mode=k3
    distillation.distillation_loss.use_task_rewards=true
    distillation.distillation_loss.distillation_loss_coef=0.0
    distillation.distillation_loss.use_policy_gradient=false
)

ALGORITHM=(
    algorithm.adv_estimator=tip_opd
    algorithm.norm_adv_by_std_in_grpo=true
    algorithm.use_kl_in_reward=false
    +algorithm.tip.rule=${TIP_RULE}
    +algorithm.tip.ratio=${TIP_RATIO}
    +algorithm.tip.divergence=k3
    +algorithm.tip.mix=${TIP_MIX}
    +algorithm.tip.coef=${TIP_COEF}
)

TRAINER=(
    trainer.use_v1=true
    trainer.v1.trainer_mode=tip_sync
    trainer.n_gpus_per_node=${STUDENT_GPUS}
    trainer.nnodes=1
    trainer.logger='["console","wandb"]'
    trainer.project_name="${PROJECT}"
    trainer.experiment_name="${EXPERIMENT}"
    trainer.val_before_train=true
    trainer.save_freq=50
    trainer.test_freq=10
    trainer.total_epochs=1
)

python3 -m verl.trainer.main_ppo --config-name=ppo_megatron_trainer \
    "${DATA[@]}" "${MODEL[@]}" "${ACTOR[@]}" "${ROLLOUT[@]}" "${TEACHER[@]}" "${ALGORITHM[@]}" "${TRAINER[@]}" "$@"
