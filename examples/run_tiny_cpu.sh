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

export TIP_VERL_CPU=1                        # switches tip-verl's CPU mode on (platform, engines, vLLM shims)
# Load tip-verl in every verl process even when the package's verl.plugins entry point is not
# installed (e.g. a source checkout); CPU mode first, as our entry point does.
export VERL_USE_EXTERNAL_MODULES=tip_verl.cpu.plugin,tip_verl.verl_ext.plugin
export PYTHONPATH=${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
export VERL_FILE_LOGGER_PATH=${VERL_FILE_LOGGER_PATH:-${OUT_DIR}/metrics.jsonl}  # verl file logger (one JSON line per step)
# vLLM's CPU build: no pinning of its OpenMP threads to cores (every engine would pin itself to the same ones)
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}

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

# verl's vLLM engine on vLLM's CPU build: no sleep mode or CUDA graphs on the CPU, and a KV cache of 64 MiB per
# engine (by default vLLM takes gpu_memory_utilization of the host's RAM for each; VLLM_CPU_KVCACHE_SPACE, if
# set, overrides it in whole GiB)
KV_CACHE_BYTES=$((64 * 1024 * 1024))
VLLM_CPU=(
    +actor_rollout_ref.rollout.enable_sleep_mode=false
    actor_rollout_ref.rollout.free_cache_engine=false
    actor_rollout_ref.rollout.enforce_eager=true
    +actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes="${KV_CACHE_BYTES}"
)

ROLLOUT=(
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.load_format=dummy   # random weights until verl's first weight sync
    actor_rollout_ref.rollout.mode=async
    actor_rollout_ref.rollout.dtype=float32
    actor_rollout_ref.rollout.n=4
    actor_rollout_ref.rollout.tensor_model_parallel_size=1
    actor_rollout_ref.rollout.calculate_log_probs=true
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8
    actor_rollout_ref.rollout.agent.num_workers=1
    actor_rollout_ref.rollout.checkpoint_engine.backend=naive
)

TEACHER_ARGS=()
if [[ "${TEACHER}" == "1" ]]; then
    TEACHER_ARGS=(
        distillation.enabled=true
        distillation.n_gpus_per_node=1
        distillation.nnodes=1
        distillation.distillation_loss.loss_mode=k3
        distillation.distillation_loss.use_task_rewards=true
        distillation.teacher_models.teacher_model.model_path="${TINY_DIR}/teacher"
        distillation.teacher_models.teacher_model.num_replicas=1
        distillation.teacher_models.teacher_model.inference.name=vllm
        distillation.teacher_models.teacher_model.inference.load_format=auto   # the teacher's own weights
        distillation.teacher_models.teacher_model.inference.dtype=float32
        distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=1
        +distillation.teacher_models.teacher_model.inference.enable_sleep_mode=false
        distillation.teacher_models.teacher_model.inference.free_cache_engine=false
        distillation.teacher_models.teacher_model.inference.enforce_eager=true
        +distillation.teacher_models.teacher_model.inference.engine_kwargs.vllm.kv_cache_memory_bytes="${KV_CACHE_BYTES}"
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
    "${DATA[@]}" "${MODEL[@]}" "${ACTOR[@]}" "${VLLM_CPU[@]}" "${ROLLOUT[@]}" "${TEACHER_ARGS[@]}" "${ALGORITHM[@]}" "${TRAINER[@]}" "$@"
