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
#   NNODES (1), STUDENT_GPUS (6 per node), TEACHER_GPUS (2 per node), TEACHER_TP (1), PROJECT, EXPERIMENT.
# Shared settings (data, actor, rollout, teacher, trainer, the two TIP routes): common_qwen3_8b_to_1p7b.sh.
# Any further hydra override can be appended, e.g. `+algorithm.tip_loss.wrong_loss=none` (TRACE's outcome split).
# algorithm.tip / algorithm.tip_loss are tip-verl's sections, added with `+algorithm.tip.<key>=...`
# (see docs/config.md); to change a key this script already sets, pass it without `+`.
# The loss route reads its settings from the micro-batch; `trainer.v1.trainer_mode=tip_sync` sends them.
set -xeuo pipefail

RUN_NAME=opd
source "$(dirname "${BASH_SOURCE[0]}")/common_qwen3_8b_to_1p7b.sh"

python3 -m verl.trainer.main_ppo \
    "${COMMON[@]}" "${FSDP_ACTOR[@]}" "${LOSS_ROUTE[@]}" "$@"
