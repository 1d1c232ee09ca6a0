#!/usr/bin/env bash
# Hybrid TIP-OPD + GRPO, Qwen3-8B teacher -> Qwen3-1.7B student, FSDP + vLLM, 4 nodes on a Ray cluster.
#
# What it runs: verl's V1 trainer in tip-verl's `tip_sync` mode with the `tip_opd` advantage estimator
# (the advantage route). On the tokens TIP selects (Soft-OR, 50% of each response) the student gets the
# per-token teacher reward coef * (log pT(y_t) - log pS_old(y_t)); every other token keeps the GRPO outcome
# advantage (mix=replace). The teacher is served by vLLM through verl's distillation.teacher_models and
# returns the sampled token's log-prob for every response token. verl's own distillation loss term is
# switched off (distillation_loss_coef=0): the teacher signal enters through the advantage only.
#
# The run of run_qwen3_8b_to_1p7b_hybrid_fsdp.sh scaled to NNODES nodes (4x the batch).
#
# Resources: NNODES (4) nodes x 8 GPUs (80 GB class). On every node 6 GPUs go to the student (FSDP over
# 24 GPUs + colocated vLLM rollouts, TP 1) and 2 to the teacher (vLLM, TP 1: 8 replicas in all).
# Every node needs the same Python environment (verl 0.9.1 + tip-verl installed: verl loads tip-verl's plugin
# in every Ray worker), the models and the data at the same paths (a shared file system, or copies).
#
# Start the Ray cluster first (see docs/multinode.md):
#   head node:    ray start --head --port=6379 --dashboard-host=0.0.0.0
#   other nodes:  ray start --address=<head-ip>:6379
#   check:        ray status   (expect NNODES nodes, 8 * NNODES GPUs)
# then run this script on the head node: verl's ray.init() joins the running cluster. From another machine,
# submit it instead: ray job submit --address=http://<head-ip>:8265 --working-dir . -- bash <this script>.
#
# Data: verl's MATH parquet
# (python3 examples/data_preprocess/math_dataset.py in verl's repository writes ~/data/math/*.parquet).
#
# Knobs (environment): STUDENT_MODEL, TEACHER_MODEL, TRAIN_FILES, VAL_FILES, TIP_RULE (soft_or),
#   TIP_RATIO (0.5), TIP_MIX (replace|add|teacher_only), TIP_COEF (1.0), ROLLOUT_N (8),
#   NNODES (4), STUDENT_GPUS (6 per node), TEACHER_GPUS (2 per node), TEACHER_TP (1), PROJECT, EXPERIMENT.
# Any further hydra override can be appended: bash run_qwen3_8b_to_1p7b_hybrid_multinode.sh trainer.total_epochs=2
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
NNODES=${NNODES:-4}
STUDENT_GPUS=${STUDENT_GPUS:-6}
TEACHER_GPUS=${TEACHER_GPUS:-2}
TEACHER_TP=${TEACHER_TP:-1}
PROJECT=${PROJECT:-tip_verl}
EXPERIMENT=${EXPERIMENT:-qwen3_8b_to_1p7b_hybrid_${NNODES}nodes_${TIP_RULE}_${TIP_RATIO}}

MAX_PROMPT=1024
MAX_RESPONSE=4096
MAX_TOKENS_PER_GPU=$(( (MAX_PROMPT + MAX_RESPONSE) * 4 ))

DATA=(
    data.train_files="${TRAIN_FILES}"
    data.val_files="${VAL_FILES}"
    data.train_batch_size=$(( 96 * NNODES ))
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
    actor_rollout_ref.actor.ppo_mini_batch_size=$(( 48 * NNODES ))
    actor_rollout_ref.actor.use_dynamic_bsz=true
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=${MAX_TOKENS_PER_GPU}
    actor_rollout_ref.actor.loss_agg_mode=token-mean
    actor_rollout_ref.actor.use_kl_loss=false
    actor_rollout_ref.actor.entropy_coeff=0
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
    distillation.nnodes=${NNODES}
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
    trainer.nnodes=${NNODES}
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
