# Settings shared by the run_qwen3_8b_to_1p7b_*.sh launch scripts: sourced by them, not run on its own.
#
# Qwen3-8B teacher -> Qwen3-1.7B student on verl's MATH parquet, vLLM rollouts, a vLLM teacher through
# verl's distillation.teacher_models, verl's V1 trainer in tip-verl's `tip_sync` mode. A launch script sets
# RUN_NAME (the experiment name's middle part) and any default of its own (e.g. TIP_RULE, NNODES), then
# sources this file, which defines the hydra override arrays:
#   COMMON           data, student model, actor settings of every backend, vLLM rollout, teacher, trainer
#   FSDP_ACTOR       the FSDP actor backend
#   ADVANTAGE_ROUTE  the `tip_opd` advantage estimator (hybrid TIP-OPD + GRPO, or pure OPD with TIP_MIX=teacher_only);
#                    verl's own distillation loss off
#   LOSS_ROUTE       pure on-policy distillation: a tip_* distillation loss on the selected tokens, no task reward
#
# Knobs (environment), defaults: NNODES (1), STUDENT_MODEL (Qwen/Qwen3-1.7B), TEACHER_MODEL (Qwen/Qwen3-8B),
#   TRAIN_FILES / VAL_FILES (~/data/math/{train,test}.parquet), ROLLOUT_N (8), STUDENT_GPUS (6 per node),
#   TEACHER_GPUS (2 per node), TEACHER_TP (1), PROJECT (tip_verl), EXPERIMENT;
#   TIP_RULE (soft_or), TIP_RATIO (0.5);
#   advantage route: TIP_MIX (replace|add|teacher_only), TIP_COEF (1.0);
#   loss route: LOSS_MODE (tip_k3; or tip_forward_kl_topk / tip_entropy_aware_topk with TOPK, default 16),
#   SCHEDULE (constant | linear | warmup_anneal, with WARMUP_STEPS / ANNEAL_STEPS, default 0);
#   RAY_ENV_VARS: names of further variables of this shell to pass to the run's Ray workers (see RAY_JOB_ENV).
# algorithm.tip / algorithm.tip_loss are tip-verl's sections, added with `+algorithm.tip.<key>=...`
# (see docs/config.md); to change a key set here, pass it without `+` or use the environment knob.

: "${RUN_NAME:?set by the launch script}"

NNODES=${NNODES:-1}
STUDENT_MODEL=${STUDENT_MODEL:-Qwen/Qwen3-1.7B}
TEACHER_MODEL=${TEACHER_MODEL:-Qwen/Qwen3-8B}
TRAIN_FILES=${TRAIN_FILES:-$HOME/data/math/train.parquet}
VAL_FILES=${VAL_FILES:-$HOME/data/math/test.parquet}
ROLLOUT_N=${ROLLOUT_N:-8}
STUDENT_GPUS=${STUDENT_GPUS:-6}
TEACHER_GPUS=${TEACHER_GPUS:-2}
TEACHER_TP=${TEACHER_TP:-1}
TIP_RULE=${TIP_RULE:-soft_or}
TIP_RATIO=${TIP_RATIO:-0.5}
TIP_MIX=${TIP_MIX:-replace}
TIP_COEF=${TIP_COEF:-1.0}
LOSS_MODE=${LOSS_MODE:-tip_k3}
TOPK=${TOPK:-16}
SCHEDULE=${SCHEDULE:-constant}
WARMUP_STEPS=${WARMUP_STEPS:-0}
ANNEAL_STEPS=${ANNEAL_STEPS:-0}
PROJECT=${PROJECT:-tip_verl}
EXPERIMENT=${EXPERIMENT:-qwen3_8b_to_1p7b_${RUN_NAME}_${TIP_RULE}_${TIP_RATIO}}

# Ray workers inherit the environment of their node's `ray start`, not this shell's: on a cluster started
# beforehand (docs/multinode.md) the run's own variables reach them only through the job's runtime_env. Passed
# when set: verl's file logger path (written by the trainer process, on whichever node Ray put it) and the
# names listed in RAY_ENV_VARS. Never secrets: verl prints ray_init's arguments. Quoted, so hydra keeps strings.
RAY_JOB_ENV=()
for name in VERL_FILE_LOGGER_PATH VERL_FILE_LOGGER_ROOT ${RAY_ENV_VARS:-}; do
    if [[ -n "${!name:-}" ]]; then
        RAY_JOB_ENV+=("+ray_kwargs.ray_init.runtime_env.env_vars.${name}='${!name}'")
    fi
done

# Several nodes: Ray's token authentication stays on, and this driver sends the cluster's token (RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): Ray enables it on its own only for a cluster it finds on this
# node, never for an explicit address (RAY_ADDRESS, ray_kwargs.ray_init.address).
if (( NNODES > 1 )); then
    if [[ "${RAY_AUTH_MODE:-token}" != token ]]; then
        echo "RAY_AUTH_MODE=${RAY_AUTH_MODE}: a Ray cluster without token authentication runs any job anyone who" \
            "reaches its ports submits. Start every node and run this script with RAY_AUTH_MODE=token and the" \
            "cluster's token (docs/multinode.md)." >&2
        exit 1
    fi
    export RAY_AUTH_MODE=token
fi

MAX_PROMPT=1024
MAX_RESPONSE=4096
MAX_TOKENS_PER_GPU=$(( (MAX_PROMPT + MAX_RESPONSE) * 4 ))

COMMON=(
    # data: the batch sizes scale with the number of nodes
    data.train_files="${TRAIN_FILES}"
    data.val_files="${VAL_FILES}"
    data.train_batch_size=$(( 96 * NNODES ))
    data.max_prompt_length=${MAX_PROMPT}
    data.max_response_length=${MAX_RESPONSE}
    data.filter_overlong_prompts=true
    data.truncation=error
    # student model and actor (the backend's own keys are in FSDP_ACTOR or the launch script)
    actor_rollout_ref.model.path="${STUDENT_MODEL}"
    actor_rollout_ref.model.use_remove_padding=true
    actor_rollout_ref.model.enable_gradient_checkpointing=true
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=$(( 48 * NNODES ))
    actor_rollout_ref.actor.use_dynamic_bsz=true
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=${MAX_TOKENS_PER_GPU}
    actor_rollout_ref.actor.loss_agg_mode=token-mean
    actor_rollout_ref.actor.use_kl_loss=false
    actor_rollout_ref.actor.entropy_coeff=0
    # vLLM rollout, colocated with the actor
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.tensor_model_parallel_size=1
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.n=${ROLLOUT_N}
    actor_rollout_ref.rollout.temperature=1.0
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=${MAX_TOKENS_PER_GPU}
    # teacher: vLLM servers in their own resource pool (TEACHER_GPUS on each node)
    distillation.enabled=true
    distillation.n_gpus_per_node=${TEACHER_GPUS}
    distillation.nnodes=${NNODES}
    distillation.teacher_models.teacher_model.model_path="${TEACHER_MODEL}"
    distillation.teacher_models.teacher_model.inference.name=vllm
    distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=${TEACHER_TP}
    distillation.teacher_models.teacher_model.inference.gpu_memory_utilization=0.85
    distillation.teacher_models.teacher_model.inference.max_model_len=$(( MAX_PROMPT + MAX_RESPONSE + 1 ))
    # trainer: verl's V1 trainer in tip-verl's tip_sync mode
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
    "${RAY_JOB_ENV[@]}"
)

FSDP_ACTOR=(
    actor_rollout_ref.actor.strategy=fsdp
    actor_rollout_ref.actor.fsdp_config.param_offload=false
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=false
)

# The teacher's sampled-token log-prob enters through the advantage: coef * (log pT(y_t) - log pS_old(y_t))
# on the selected tokens, the GRPO outcome advantage on the others (mix). verl's loss term stays at coef 0.
ADVANTAGE_ROUTE=(
    algorithm.adv_estimator=tip_opd
    algorithm.norm_adv_by_std_in_grpo=true
    algorithm.use_kl_in_reward=false
    +algorithm.tip.rule=${TIP_RULE}
    +algorithm.tip.ratio=${TIP_RATIO}
    +algorithm.tip.divergence=k3
    +algorithm.tip.mix=${TIP_MIX}
    +algorithm.tip.coef=${TIP_COEF}
    distillation.distillation_loss.loss_mode=k3
    distillation.distillation_loss.use_task_rewards=true
    distillation.distillation_loss.distillation_loss_coef=0.0
    distillation.distillation_loss.use_policy_gradient=false
)

# A per-token divergence to the teacher back-propagated directly (GKD-style) on the selected tokens only,
# averaged over them; the rules' entropy axis comes from the update forward (calculate_entropy=true).
LOSS_ROUTE=(
    algorithm.adv_estimator=grpo
    algorithm.use_kl_in_reward=false
    +algorithm.tip.rule=${TIP_RULE}
    +algorithm.tip.ratio=${TIP_RATIO}
    +algorithm.tip_loss.schedule=${SCHEDULE}
    +algorithm.tip_loss.warmup_steps=${WARMUP_STEPS}
    +algorithm.tip_loss.anneal_steps=${ANNEAL_STEPS}
    actor_rollout_ref.actor.calculate_entropy=true
    distillation.distillation_loss.loss_mode=${LOSS_MODE}
    distillation.distillation_loss.topk=${TOPK}
    distillation.distillation_loss.use_task_rewards=false
    distillation.distillation_loss.use_policy_gradient=false
    distillation.distillation_loss.loss_max_clamp=null
    distillation.distillation_loss.log_prob_min_clamp=-10.0
)
