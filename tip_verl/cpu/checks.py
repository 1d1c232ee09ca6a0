"""Start-up checks of CPU mode: settings that run on the CPU but train something else than they do on a GPU."""

from omegaconf import DictConfig

from tip_verl.core.config import config_value

# verl copies actor.ulysses_sequence_parallel_size (deprecated) into fsdp_config; the ref defaults to the actor's.
SEQUENCE_PARALLEL_KEYS = (
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size",
    "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",
    "actor_rollout_ref.ref.ulysses_sequence_parallel_size",
    "actor_rollout_ref.ref.fsdp_config.ulysses_sequence_parallel_size",
    "critic.ulysses_sequence_parallel_size",
    "critic.fsdp.ulysses_sequence_parallel_size",
)


def check_cpu_mode_config(config: DictConfig) -> None:
    """Refuse Ulysses sequence parallelism (any of SEQUENCE_PARALLEL_KEYS > 1).

    verl's Ulysses exchanges sequence shards for attention heads inside transformers' flash-attention function,
    which it patches (`verl.models.transformers.monkey_patch`); CPU mode attends with `sdpa`, which that patch
    does not reach, so each rank attends within its own shard of the sequence. The run goes on without an error,
    with log-probs off by 1e-3 (`training/rollout_probs_diff_max`).

    config: the whole trainer config.
    """
    for key in SEQUENCE_PARALLEL_KEYS:
        size = config_value(config, key)
        if size is not None and int(size) > 1:
            raise ValueError(
                f"{key}={size}: Ulysses sequence parallelism computes wrong log-probs in CPU mode (TIP_VERL_CPU=1): "
                "verl exchanges the sequence shards inside flash-attention, and CPU mode attends with sdpa, so each "
                "rank would attend within its own shard, without an error. Set it to 1 (CPU mode runs data "
                "parallel only: trainer.n_gpus_per_node processes), or run on GPUs with flash-attention."
            )
