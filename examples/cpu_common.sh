# What the CPU launch scripts (run_tiny_cpu.sh, run_demo_world_cpu.sh) share: tip-verl's CPU mode in every
# process, and the settings of verl's vLLM rollout and teacher on vLLM's CPU build (docs/cpu_mode.md).
# Sourced after REPO_ROOT and OUT_DIR are set.

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

# verl's vLLM engine on vLLM's CPU build: no sleep mode or CUDA graphs on the CPU, and a KV cache of 64 MiB per
# engine (by default vLLM takes gpu_memory_utilization of the host's RAM for each; VLLM_CPU_KVCACHE_SPACE, if
# set, overrides it in whole GiB)
KV_CACHE_BYTES=$((64 * 1024 * 1024))
VLLM_CPU_ROLLOUT=(
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.load_format=dummy   # random weights until verl's first weight sync
    actor_rollout_ref.rollout.mode=async
    actor_rollout_ref.rollout.dtype=float32
    actor_rollout_ref.rollout.tensor_model_parallel_size=1
    actor_rollout_ref.rollout.calculate_log_probs=true
    actor_rollout_ref.rollout.agent.num_workers=1
    actor_rollout_ref.rollout.checkpoint_engine.backend=naive
    +actor_rollout_ref.rollout.enable_sleep_mode=false
    actor_rollout_ref.rollout.free_cache_engine=false
    actor_rollout_ref.rollout.enforce_eager=true
    +actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes="${KV_CACHE_BYTES}"
)
VLLM_CPU_TEACHER=(
    distillation.enabled=true
    distillation.n_gpus_per_node=1
    distillation.nnodes=1
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
