"""Loss-route settings verl 0.9.1's training engines cannot run, refused at start-up (docs/multinode.md, "Megatron").

- A top-k TIP loss (tip_forward_kl_topk, tip_entropy_aware_topk) with `actor_rollout_ref.model.use_fused_kernels=true`.
  verl computes the top-k forward KL inside its logits processor, on the logits the fused-kernel forward never
  builds: Megatron's `MegatronEngineWithLMHead.forward_step` calls the fused forward without the processor, and
  FSDP's `FSDPEngineWithLMHead.prepare_model_outputs` takes top-k outputs from a fused kernel only when the
  kernel brings them, which only VeOmni's does (strategy=veomni). The loss would stop at step 1 on the missing
  `distillation_losses`.
- A random rule (random, entropy_sample) on the loss route with Megatron's dynamic context parallelism
  (`actor_rollout_ref.actor.megatron.dynamic_context_parallel=true`). There verl's `DynamicCPScheduler` forms
  the group of ranks that share a sequence anew for each micro-batch, and each rank reaches a shared micro-batch
  after drawing for micro-batches of its own: the draws of a step's stream (rng.selection_generator) differ
  between the ranks that share a sequence, and each would back-propagate its part of the sequence under
  another selection.
"""

from __future__ import annotations

from typing import Any

RANDOM_RULES = ("random", "entropy_sample")
FUSED_KERNELS_KEY = "actor_rollout_ref.model.use_fused_kernels"
FUSED_TOPK_STRATEGIES = ("veomni",)  # engines whose fused kernel computes the top-k forward KL itself
DYNAMIC_CP_KEY = "actor_rollout_ref.actor.megatron.dynamic_context_parallel"


def _get(config: Any, dotted: str) -> Any:
    node = config
    for key in dotted.split("."):
        node = node.get(key) if node is not None else None
    return node


def check_loss_route_engine(config: Any, rule: str, loss_mode: str, uses_topk: bool) -> None:
    """Raise if the actor engine configured in `config` (the whole trainer config) cannot run the TIP loss
    `loss_mode` (top-k when `uses_topk`) with selection rule `rule`."""
    strategy = _get(config, "actor_rollout_ref.actor.strategy")
    if uses_topk and _get(config, FUSED_KERNELS_KEY) and strategy not in FUSED_TOPK_STRATEGIES:
        raise ValueError(
            f"distillation.distillation_loss.loss_mode={loss_mode} needs verl's top-k forward KL, which verl "
            f"computes from the full logits in its logits processor; with {FUSED_KERNELS_KEY}=true the "
            f"actor_rollout_ref.actor.strategy={strategy} forward never builds them and the loss would fail at "
            f"step 1. Set {FUSED_KERNELS_KEY}=false, or a sampled-token loss_mode (tip_k3, ...)."
        )
    if rule in RANDOM_RULES and _get(config, DYNAMIC_CP_KEY):
        raise ValueError(
            f"algorithm.tip.rule={rule} draws its selection in every rank that computes the loss, but with "
            f"{DYNAMIC_CP_KEY}=true the ranks that share a sequence change from micro-batch to micro-batch and "
            "cannot draw alike, so one sequence would be trained under several selections. Set "
            f"{DYNAMIC_CP_KEY}=false, or a rule without draws (soft_or, q3, entropy, divergence, all)."
        )
