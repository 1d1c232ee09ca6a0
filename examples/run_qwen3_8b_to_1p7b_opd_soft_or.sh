#!/usr/bin/env bash
# Paper-faithful pure on-policy distillation with TIP Soft-OR at 50% of tokens (loss route, no GRPO).
#
# What it runs: Qwen3-8B teacher -> Qwen3-1.7B student. No task reward in the loss
# (use_task_rewards=false): the student minimises a per-token divergence to the teacher, back-propagated
# directly (GKD-style), on the tokens TIP's Soft-OR rule selects: s_t = 1 - (1 - h^)(1 - d^) from the student
# entropy (computed in the update forward, calculate_entropy=true) and the per-token divergence itself, top 50%
# of each response, averaged over the selected tokens (1/|T|). Default divergence: verl's k3 estimate of
# KL(student || teacher) on the sampled token (loss_mode=tip_k3).
#
# Resources: 1 node x 8 GPUs (80 GB class). 6 GPUs: student (FSDP actor + colocated vLLM rollout, TP 1);
# 2 GPUs: teacher (vLLM, TP 1, one replica per GPU). Data: verl's MATH parquet
# (python3 examples/data_preprocess/math_dataset.py in verl's repository writes ~/data/math/*.parquet).
#
# Knobs (environment): STUDENT_MODEL, TEACHER_MODEL, TRAIN_FILES, VAL_FILES, TIP_RULE (soft_or), TIP_RATIO (0.5),
#   LOSS_MODE (tip_k3; or tip_forward_kl_topk / tip_entropy_aware_topk with TOPK, default 16),
#   SCHEDULE (constant | linear | warmup_anneal, with WARMUP_STEPS / ANNEAL_STEPS), ROLLOUT_N (8),
#   STUDENT_GPUS (6), TEACHER_GPUS (2), TEACHER_TP (1), PROJECT, EXPERIMENT.
# Any further hydra override can be appended, e.g. `+algorithm.tip_loss.wrong_loss=none` (TRACE routing).
# algorithm.tip / algorithm.tip_loss are tip-verl's sections, added with `+algorithm.tip.<key>=...`
# (see docs/config.md); to change a key this script already sets, pass it without `+`.
# The loss route reads its settings from the micro-batch; `trainer.v1.trainer_mode=tip_sync` sends them.
set -xeuo pipefail

STUDENT_MODEL=${STUDENT_MODEL:-Qwen/Qwen3-1.7B}
TEACHER_MODEL=${TEACHER_MODEL:-Qwen/Qwen3-8B}
TRAIN_FILES=${TRAIN_FILES:-$HOME/data/math/train.parquet}
VAL_FILES=${VAL_FILES:-$HOME/data/math/test.parquet}
TIP_RULE=${TIP_RULE:-soft_or}
TIP_RATIO=${TIP_RATIO:-0.5}
LOSS_MODE=${LOSS_MODE:-tip_k3}
TOPK=${TOPK:-16}
SCHEDULE=${SCHEDULE:-constant}
WARMUP_STEPS=${WARMUP_STEPS:-0}
ANNEAL_STEPS=${ANNEAL_STEPS:-0}
ROLLOUT_N=${ROLLOUT_N:-8}
STUDENT_GPUS=${STUDENT_GPUS:-6}
TEACHER_GPUS=${TEACHER_GPUS:-2}
TEACHER_TP=${TEACHER_TP:-1}
PROJECT=${PROJECT:-tip_verl}
EXPERIMENT=${EXPERIMENT:-qwen3_8b_to_1p7b_opd_${TIP_RULE}_${TIP_RATIO}}

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
    actor_rollout_ref.actor.strategy=fsdp
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=48
    actor_rollout_ref.actor.use_dynamic_bsz=true
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=${MAX_TOKENS_PER_GPU}
    actor_rollout_ref.actor.loss_agg_mode=token-mean
    actor_rollout_ref.actor.use_kl_loss=false
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.calculate_entropy=true
    actor_rollout_ref.actor.fsdp_config.param_offload=false
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=false
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
    distillation.distillation_loss.loss_mode=${LOSS_MODE}
    distillation.distillation_loss.topk=${TOPK}
    distillation.distillation_loss.use_task_rewards=false
    distillation.distillation_loss.use_policy_gradient=false
    distillation.distillation_loss.loss_max_clamp=null
    distillation.distillation_loss.log_prob_min_clamp=-10.0
)

ALGORITHM=(
    algorithm.adv_estimator=grpo
    algorithm.use_kl_in_reward=false
    +algorithm.tip.rule=${TIP_RULE}
    +algorithm.tip.ratio=${TIP_RATIO}
    +algorithm.tip_loss.schedule=${SCHEDULE}
    +algorithm.tip_loss.warmup_steps=${WARMUP_STEPS}
    +algorithm.tip_loss.anneal_steps=${ANNEAL_STEPS}
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

python3 -m verl.trainer.main_ppo \
    "${DATA[@]}" "${MODEL[@]}" "${ACTOR[@]}" "${ROLLOUT[@]}" "${TEACHER[@]}" "${ALGORITHM[@]}" "${TRAINER[@]}" "$@"
