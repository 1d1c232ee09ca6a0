"""Whether verl's actor will compute logits only at the TIP-selected tokens, and what to set if not.

Under `algorithm.tip.mix=teacher_only` (or `algorithm.tip.preselect=true`) the `tip_sync` trainer restricts
the actor update to the selected tokens and sends them as `tip_selected`. The FSDP engine then skips the LM
head and log-softmax at the other tokens only with `patches/verl-0.9.1-tip-selected-logprobs.patch` applied
and the fused-kernel forward on; otherwise it computes every token, which is correct but saves no memory. This
says which of those is missing.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

from verl.trainer.distillation.losses import get_distillation_loss_settings

from tip_verl.core.config import config_value

PATCH_NAME = "verl-0.9.1-tip-selected-logprobs.patch"
REQUIRED_MODEL_SETTINGS = {
    "actor_rollout_ref.model.use_remove_padding": True,
    "actor_rollout_ref.model.use_fused_kernels": True,
}
BACKEND_KEY = "actor_rollout_ref.model.fused_kernel_options.impl_backend"
PATCHED_BACKENDS = ("torch", "liger")  # both run verl's forward_with_torch_backend, which the patch extends


def verl_is_patched() -> bool:
    """True when this process's verl has the patch: its fused-kernel forward accepts `tip_selected`.

    The trainer asks in the driver process; the actor workers import verl the same way unless their
    PYTHONPATH differs, in which case this answer is about the driver's verl only.
    """
    from verl.models.transformers import dense_common

    return "tip_selected" in inspect.signature(dense_common.forward_with_torch_backend).parameters


def selected_lm_head_advice(config: Any) -> Optional[str]:
    """None when the actor update will build logits only at the selected tokens; else what to change.

    config: the whole trainer config of a run whose actor update reads only the selected tokens.
    """
    missing = [
        f"{key}={str(value).lower()}" for key, value in REQUIRED_MODEL_SETTINGS.items() if config_value(config, key) != value
    ]
    if config_value(config, BACKEND_KEY) not in PATCHED_BACKENDS:
        missing.append(f"{BACKEND_KEY}=torch (or liger)")
    if config_value(config, "actor_rollout_ref.actor.strategy") not in ("fsdp", "fsdp2"):
        missing.append("actor_rollout_ref.actor.strategy=fsdp (or fsdp2)")
    loss_mode = config_value(config, "distillation.distillation_loss.loss_mode")
    if config_value(config, "distillation.enabled") and loss_mode and get_distillation_loss_settings(loss_mode).use_topk:
        missing.append(
            f"a sampled-token teacher (distillation.distillation_loss.loss_mode=k3, not the top-k {loss_mode}: "
            "verl's top-k path needs every token's logits)"
        )
    if not verl_is_patched():
        missing.append(f"the patch patches/{PATCH_NAME} applied to the installed verl (see patches/README.md)")
    if not missing:
        return None
    return (
        "The actor update reads only the TIP-selected tokens (algorithm.tip.mix=teacher_only or preselect=true), "
        "but verl will still "
        "build full-vocabulary logits for every token (correct, no memory saved). To skip the others, set: "
        + "; ".join(missing)
        + ". (With fsdp2 the LM head must also be tied to the embeddings: verl 0.9.1 shards an untied head as "
        "its own unit, which the fused-kernel forward cannot read.)"
    )
