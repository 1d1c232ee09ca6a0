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
# Start the Ray cluster first, with token authentication on every node (docs/multinode.md, section 2):
#   every node:   export RAY_AUTH_MODE=token, and the head's token in ~/.ray/auth_token (mode 600)
#   head node:    ray get-auth-token --generate >/dev/null   (once: writes ~/.ray/auth_token)
#                 ray start --head --node-ip-address=<head-ip> --port=6379
#   other nodes:  ray start --address=<head-ip>:6379
#   check:        ray status --address=<head-ip>:6379   (expect NNODES nodes, 8 * NNODES GPUs)
# then run this script on the head node, with RAY_AUTH_MODE=token and the token (the script refuses
# RAY_AUTH_MODE=disabled): verl's ray.init() joins the running cluster (leave ray_kwargs.ray_init.num_cpus and
# num_gpus null: Ray refuses them when joining). Variables the run reads in its workers are not inherited from
# this shell: VERL_FILE_LOGGER_PATH goes to them through the job's runtime_env, and so does any name listed in
# RAY_ENV_VARS; the rest must be in every node's environment before its `ray start`.
# The dashboard (job submission, plain HTTP) stays on the head's localhost: reach it over ssh (docs/multinode.md).
#
# Data: verl's MATH parquet
# (python3 examples/data_preprocess/math_dataset.py in verl's repository writes ~/data/math/*.parquet).
#
# Knobs (environment): STUDENT_MODEL, TEACHER_MODEL, TRAIN_FILES, VAL_FILES, TIP_RULE (soft_or),
#   TIP_RATIO (0.5), TIP_MIX (replace|add|teacher_only), TIP_COEF (1.0), ROLLOUT_N (8),
#   NNODES (4), STUDENT_GPUS (6 per node), TEACHER_GPUS (2 per node), TEACHER_TP (1), PROJECT, EXPERIMENT,
#   RAY_ENV_VARS (names of further variables to pass to the Ray workers).
# Shared settings (data, actor, rollout, teacher, trainer, the two TIP routes): common_qwen3_8b_to_1p7b.sh;
# the batch sizes (96 prompts, mini-batches of 48 per node), trainer.nnodes and distillation.nnodes follow NNODES.
# Any further hydra override can be appended: bash run_qwen3_8b_to_1p7b_hybrid_multinode.sh trainer.total_epochs=2
# algorithm.tip is tip-verl's section, added with `+algorithm.tip.<key>=...` (see docs/config.md); to change
# a key this script already sets, pass `algorithm.tip.<key>=...` (no `+`) or use the environment knob.
set -xeuo pipefail

NNODES=${NNODES:-4}
RUN_NAME=hybrid_${NNODES}nodes
source "$(dirname "${BASH_SOURCE[0]}")/common_qwen3_8b_to_1p7b.sh"

python3 -m verl.trainer.main_ppo \
    "${COMMON[@]}" "${FSDP_ACTOR[@]}" "${ADVANTAGE_ROUTE[@]}" "$@"
