#!/usr/bin/env bash
# Pure on-policy distillation on Q3 tokens only, 10% of each response (loss route, no GRPO).
#
# What it runs: the paper's Q3-only ablation. Q3 = low student entropy, high teacher-student divergence
# ("overconfident and wrong"); TIP scores w_t = d_t (1 - h^_t) and keeps the top 10% of each response
# (at least one token). Otherwise the run of run_qwen3_8b_to_1p7b_opd_soft_or.sh: Qwen3-8B teacher ->
# Qwen3-1.7B student, per-token divergence back-propagated on the selected tokens only, no task reward.
#
# Resources: 1 node x 8 GPUs (80 GB class). 6 GPUs: student (FSDP actor + colocated vLLM rollout, TP 1);
# 2 GPUs: teacher (vLLM, TP 1, one replica per GPU). Data: verl's MATH parquet
# (python3 examples/data_preprocess/math_dataset.py in verl's repository writes ~/data/math/*.parquet).
#
# Knobs (environment): STUDENT_MODEL, TEACHER_MODEL, TRAIN_FILES, VAL_FILES, TIP_RULE (q3), TIP_RATIO (0.1),
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
TIP_RULE=${TIP_RULE:-q3}
TIP_RATIO=${TIP_RATIO:-0.1}
source "$(dirname "${BASH_SOURCE[0]}")/common_qwen3_8b_to_1p7b.sh"

python3 -m verl.trainer.main_ppo \
    "${COMMON[@]}" "${FSDP_ACTOR[@]}" "${LOSS_ROUTE[@]}" "$@"
