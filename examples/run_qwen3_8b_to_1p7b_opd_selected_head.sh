#!/usr/bin/env bash
# Pure on-policy distillation on the TIP-selected tokens only, with the actor's LM head run only there.
#
# What it runs: the advantage route with mix=teacher_only, Qwen3-8B teacher -> Qwen3-1.7B student, FSDP + vLLM.
# The selected tokens (Soft-OR, 50% of each response) get the per-token teacher reward
# coef * (log pT(y_t) - log pS_old(y_t)); the others get nothing and are left out of the actor update
# (`tip_sync` ANDs the update's response_mask and loss_mask with the selection, so with loss_agg_mode=token-mean
# the loss is a mean over the selected tokens, the paper's 1/|T|). With verl's fused-kernel forward (torch backend, remove-padding) and
# tip-verl's patch applied, the update builds full-vocabulary logits, log-softmax and their backward only at
# those tokens: the memory the TIP paper saves by dropping tokens (docs/memory.md).
#
# Before the first run, apply the patch to the installed verl 0.9.1 (once per environment):
#   cd "$(python3 -c 'import os, verl; print(os.path.dirname(os.path.dirname(verl.__file__)))')"
#   patch -p1 --dry-run < /path/to/tip-verl/patches/verl-0.9.1-tip-selected-logprobs.patch
#   patch -p1 < /path/to/tip-verl/patches/verl-0.9.1-tip-selected-logprobs.patch
# Without it the run is the same algorithm with every token's logits built; the trainer says so at start-up.
#
# Resources: 1 node x 8 GPUs (80 GB class). 6 GPUs: student (FSDP actor + colocated vLLM rollout, TP 1);
# 2 GPUs: teacher (vLLM, TP 1, one replica per GPU). Data: verl's MATH parquet
# (python3 examples/data_preprocess/math_dataset.py in verl's repository writes ~/data/math/*.parquet).
#
# Knobs (environment): STUDENT_MODEL, TEACHER_MODEL, TRAIN_FILES, VAL_FILES, TIP_RULE (soft_or), TIP_RATIO (0.5),
#   TIP_COEF (1.0), ROLLOUT_N (8), NNODES (1), STUDENT_GPUS (6 per node), TEACHER_GPUS (2 per node),
#   TEACHER_TP (1), PROJECT, EXPERIMENT.
# Shared settings (data, actor, rollout, teacher, trainer, the two TIP routes): common_qwen3_8b_to_1p7b.sh.
# Any further hydra override can be appended; algorithm.tip is tip-verl's section (see docs/config.md).
set -xeuo pipefail

RUN_NAME=opd_selected_head
TIP_MIX=teacher_only
source "$(dirname "${BASH_SOURCE[0]}")/common_qwen3_8b_to_1p7b.sh"

# The fused-kernel forward returns log-probs and entropies instead of logits; the patch makes it compute
# them only at the tokens in the update's `tip_selected` field.
SELECTED_LM_HEAD=(
    actor_rollout_ref.model.use_fused_kernels=true
    actor_rollout_ref.model.fused_kernel_options.impl_backend=torch
)

python3 -m verl.trainer.main_ppo \
    "${COMMON[@]}" "${FSDP_ACTOR[@]}" "${ADVANTAGE_ROUTE[@]}" "${SELECTED_LM_HEAD[@]}" "$@"
