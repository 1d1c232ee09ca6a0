#!/usr/bin/env bash
# The local demo's world (tip-verl demo) trained by verl's own trainer (python -m verl.trainer.main_ppo, V1) on CPU.
#
# What it runs: the task's shipped teacher and warm-started student (tip_verl/assets/<task>/), exported as
# Hugging Face checkpoints with a character tokenizer whose ids are the local models' own, the problems the
# local loop trains on (train parquet, in its order) and its held-out problems (validation parquet), the task's
# checker as the custom reward function; tip_opd (trainer.v1.trainer_mode=tip_sync) with the local demo's
# defaults (LoopConfig: rule, ratio, mix, learning rate and warm-up, batch shape, temperature, steps, evaluation
# interval), read at export time, printed, and written to $WORLD_DIR/verl_overrides.txt. Through tip-verl's CPU
# mode (docs/cpu_mode.md): FSDP2 actor on 2 gloo ranks, verl's vLLM rollout (vLLM's CPU build, one engine per
# rank) and one vLLM teacher engine, greedy validation on the held-out split before training and every
# eval_every steps.
# Ends with: validation accuracy: <start> -> <end> (teacher <t>) in <N> steps, <S> s
#
# How long on 2 shared CPU cores (8 prompts x 8 rollouts, responses up to 30 tokens): 2-3 min of start-up
# (three vLLM engines), ~4 s per step; STEPS=8 with validation of 64 problems before and after took 215 s.
#
# What still differs from the local loop (docs/cpu_mode.md, "The demo's world in verl"): the sampling RNG
# (other rollouts, so the curves agree within the seed-to-seed spread, not token for token), float rounding
# (2 FSDP ranks, vLLM's kernels), and validation at verl's step 0 and every test_freq steps (the local loop
# also evaluates at its last step; so does verl).
#
# Usage: bash examples/run_demo_world_cpu.sh [extra hydra overrides...]
#   TASK=add3_scratch          a task of the local demo (`tip-verl demo --task`; the demo's default is
#                              add3_scratch_mistaken, docs/cpu_mode.md measures this one)
#   ROUTE=advantage            advantage: tip_opd (default); loss: the local loss route with forward KL, as
#                              verl's top-k distillation loss over the whole vocabulary (tip_forward_kl_topk)
#   STEPS=100                  training steps (default: the local demo's); the train split holds exactly these
#   VAL_EVERY=25               validation interval (default: the local demo's eval_every)
#   WORLD_DIR=... OUT_DIR=...  the exported world / run outputs (metrics.jsonl, checkpoints)
#   e.g. trainer.save_freq=50, actor_rollout_ref.actor.optim.lr=3e-4
set -xeuo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TASK=${TASK:-add3_scratch}
WORLD_DIR=${WORLD_DIR:-${HOME}/.cache/tip-verl/demo_world/${TASK}}
OUT_DIR=${OUT_DIR:-${REPO_ROOT}/outputs/demo_world_${TASK}}
N_PROCS=${N_PROCS:-2}  # trainer ranks (FSDP2 over gloo), one vLLM rollout engine each

source "${REPO_ROOT}/examples/cpu_common.sh"

python3 -m tip_verl.worlds.demo --task "${TASK}" --route "${ROUTE:-advantage}" --out "${WORLD_DIR}" \
    ${STEPS:+--steps "${STEPS}"}
mapfile -t LOCAL_LOOP < "${WORLD_DIR}/verl_overrides.txt"  # the local loop's settings as verl keys
if [[ -n "${VAL_EVERY:-}" ]]; then LOCAL_LOOP+=(trainer.test_freq="${VAL_EVERY}"); fi

WORLD=(
    data.train_files="${WORLD_DIR}/data/train.parquet"
    data.val_files="${WORLD_DIR}/data/val.parquet"
    data.truncation=error
    data.dataloader_num_workers=0
    actor_rollout_ref.model.path="${WORLD_DIR}/student"
    distillation.teacher_models.teacher_model.model_path="${WORLD_DIR}/teacher"
    reward.custom_reward_function.path="${REPO_ROOT}/tip_verl/worlds/reward.py"
    reward.custom_reward_function.name=task_score
)

CPU=(  # the CPU settings of examples/run_tiny_cpu.sh
    "${VLLM_CPU_ROLLOUT[@]}"
    "${VLLM_CPU_TEACHER[@]}"
    reward.num_workers=1
    actor_rollout_ref.model.use_remove_padding=false
    actor_rollout_ref.model.enable_gradient_checkpointing=false
    +actor_rollout_ref.model.override_config.attn_implementation=sdpa
    actor_rollout_ref.actor.strategy=fsdp2
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16
    actor_rollout_ref.actor.fsdp_config.param_offload=false
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=false
    +actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32
    +actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype=fp32
    +actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype=fp32
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16
    trainer.use_v1=true
    trainer.device=cpu
    trainer.n_gpus_per_node="${N_PROCS}"
    trainer.nnodes=1
    trainer.save_freq=-1
    trainer.resume_mode=disable
    trainer.logger='["console","file"]'
    trainer.project_name=tip_verl_cpu
    trainer.experiment_name="demo_world_${TASK}"
    trainer.default_local_dir="${OUT_DIR}/checkpoints"
    transfer_queue.backend.SimpleStorage.num_data_storage_units=1
    +ray_kwargs.ray_init.num_gpus=$((N_PROCS + 1))  # logical slots: trainer ranks + the teacher replica
    ray_kwargs.ray_init.num_cpus=16
    +ray_kwargs.ray_init.address=local
    hydra.run.dir="${OUT_DIR}/hydra"
)

mkdir -p "${OUT_DIR}"
started=$(date +%s)
python3 -m tip_verl.cpu.shm python3 -m verl.trainer.main_ppo "${WORLD[@]}" "${CPU[@]}" "${LOCAL_LOOP[@]}" "$@"
set +x
python3 -m tip_verl.worlds.demo --out "${WORLD_DIR}" --report "${VERL_FILE_LOGGER_PATH}" \
    --seconds $(( $(date +%s) - started ))
