#!/usr/bin/env bash
# Tiny end-to-end run of verl's own trainer (python -m verl.trainer.main_ppo, V1 trainer) on CPU.
#
# What it runs: tip_opd (TIP token selection + GRPO, trainer.v1.trainer_mode=tip_sync) on a tiny
# Llama-style student (random init, built from a config) on a one-word addition task with a
# rule-based reward, through tip-verl's CPU mode (TIP_VERL_CPU=1): FSDP2 trainer on 2 gloo ranks,
# a reference model, verl's own vLLM rollout (vLLM's CPU build, one engine per rank, starting from
# random weights) with weight sync from the trainer before the first step and after every step,
# teacher log-probs through verl's own distillation teacher path (distillation.enabled=true, a tiny
# teacher served by one vLLM engine), validation, checkpoints, resume.
# Tokenizer, models and data are built locally and cached in $TINY_DIR (nothing is downloaded).
# The shared-memory segments the vLLM engines leave in /dev/shm are removed when the run ends.
#
# How long: ~3-4 min on 2 shared CPU cores for the default 3 steps: ~2-3 min of process start-up
# (each vLLM engine is 3 processes), ~30 s for the first step, ~3 s for each later one.
#
# Usage: bash examples/run_tiny_cpu.sh [extra hydra overrides...]
#   ALGO=grpo                       plain GRPO instead of tip_opd (still with the teacher if TEACHER=1)
#   TEACHER=0                       no teacher (needs ALGO=grpo)
#   TINY_DIR=... OUT_DIR=...        cache of the tiny world / run outputs (checkpoints, metrics)
#   e.g. trainer.total_training_steps=5, trainer.resume_mode=disable
set -xeuo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TINY_DIR=${TINY_DIR:-${HOME}/.cache/tip-verl/tiny_cpu}
OUT_DIR=${OUT_DIR:-${REPO_ROOT}/outputs/tiny_cpu}
TEACHER=${TEACHER:-1}
ALGO=${ALGO:-tip_opd}
N_PROCS=${N_PROCS:-2}  # trainer ranks (FSDP2 over gloo), one vLLM rollout engine each

source "${REPO_ROOT}/examples/cpu_common.sh"

python3 -m tip_verl.worlds.tiny --out "${TINY_DIR}"

DATA=(
    data.train_files="${TINY_DIR}/data/train.parquet"
    data.val_files="${TINY_DIR}/data/test.parquet"
    data.train_batch_size=4
    data.max_prompt_length=16
    data.max_response_length=4
    data.dataloader_num_workers=0
    reward.custom_reward_function.path="${REPO_ROOT}/tip_verl/worlds/reward.py"
    reward.custom_reward_function.name=compute_score
    reward.num_workers=1
)

MODEL=(
    actor_rollout_ref.model.path="${TINY_DIR}/student"
    actor_rollout_ref.model.use_remove_padding=false
    actor_rollout_ref.model.enable_gradient_checkpointing=false
    +actor_rollout_ref.model.override_config.attn_implementation=sdpa
)

ACTOR=(
    actor_rollout_ref.actor.strategy=fsdp2
    actor_rollout_ref.actor.optim.lr=1e-3
    actor_rollout_ref.actor.ppo_mini_batch_size=4
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4
    actor_rollout_ref.actor.use_kl_loss=true   # exercises the reference model too
    actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8
    +actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=fp32
    actor_rollout_ref.actor.fsdp_config.param_offload=false
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=false
    +actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32
    +actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype=fp32
    +actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype=fp32
)

ROLLOUT=(
    "${VLLM_CPU_ROLLOUT[@]}"
    actor_rollout_ref.rollout.n=4
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8
)

TEACHER_ARGS=()
if [[ "${TEACHER}" == "1" ]]; then
    TEACHER_ARGS=(
        "${VLLM_CPU_TEACHER[@]}"
        distillation.distillation_loss.loss_mode=k3
        distillation.distillation_loss.use_task_rewards=true
        distillation.teacher_models.teacher_model.model_path="${TINY_DIR}/teacher"
    )
fi

ALGORITHM=(algorithm.adv_estimator=grpo)
if [[ "${ALGO}" == "tip_opd" ]]; then
    [[ "${TEACHER}" == "1" ]] || { echo "ALGO=tip_opd needs the teacher (TEACHER=1)" >&2; exit 1; }
    ALGORITHM=(
        algorithm.adv_estimator=tip_opd
        trainer.v1.trainer_mode=tip_sync
        +algorithm.tip.rule=soft_or
        +algorithm.tip.ratio=0.5
    )
fi

TRAINER=(
    trainer.use_v1=true
    trainer.device=cpu
    trainer.n_gpus_per_node="${N_PROCS}"
    trainer.nnodes=1
    trainer.total_training_steps=3
    trainer.save_freq=2
    trainer.test_freq=2
    trainer.val_before_train=false
    trainer.resume_mode=auto
    trainer.logger='["console","file"]'
    trainer.project_name=tip_verl_cpu
    trainer.experiment_name=tiny
    trainer.default_local_dir="${OUT_DIR}/checkpoints"
    transfer_queue.backend.SimpleStorage.num_data_storage_units=1
    +ray_kwargs.ray_init.num_gpus=$((N_PROCS + TEACHER))  # logical slots: one per trainer rank / teacher replica (no GPU is used)
    ray_kwargs.ray_init.num_cpus=16         # logical: verl's placement bundles ask for several CPUs each
    +ray_kwargs.ray_init.address=local      # always a fresh private Ray cluster, never someone else's
    hydra.run.dir="${OUT_DIR}/hydra"        # hydra's own logs, not in the working directory
)

# tip_verl.cpu.shm runs the trainer, then removes the shared-memory segments its vLLM processes left in /dev/shm
python3 -m tip_verl.cpu.shm python3 -m verl.trainer.main_ppo \
    "${DATA[@]}" "${MODEL[@]}" "${ACTOR[@]}" "${ROLLOUT[@]}" "${TEACHER_ARGS[@]}" "${ALGORITHM[@]}" "${TRAINER[@]}" "$@"
