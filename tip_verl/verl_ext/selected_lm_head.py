"""Whether verl's actor will compute logits only at the TIP-selected tokens, and what to set if not.

Under `algorithm.tip.mix=teacher_only` the `tip_sync` trainer restricts the actor update to the selected
tokens and sends them as `tip_selected`. The FSDP engine then skips the LM head and log-softmax at the other
tokens only with `patches/verl-0.9.1-tip-selected-logprobs.patch` applied and the fused-kernel forward on;
otherwise it computes every token, which is correct but saves no memory. This says which of those is missing.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

PATCH_NAME = "verl-0.9.1-tip-selected-logprobs.patch"
REQUIRED_MODEL_SETTINGS = {
    "actor_rollout_ref.model.use_remove_padding": True,
    "actor_rollout_ref.model.use_fused_kernels": True,
    "actor_rollout_ref.model.fused_kernel_options.impl_backend": "torch",
}


def verl_is_patched() -> bool:
    """True when the installed verl's fused-kernel forward accepts `tip_selected` (the patch is applied)."""
    from verl.models.transformers import dense_common

    return "tip_selected" in inspect.signature(dense_common.forward_with_torch_backend).parameters


def _get(config: Any, dotted: str) -> Any:
    node = config
    for key in dotted.split("."):
        node = node.get(key) if node is not None else None
    return node


def selected_lm_head_advice(config: Any) -> Optional[str]:
    """None when the actor update will build logits only at the selected tokens; else what to change.

    config: the whole trainer config of a run whose actor update reads only the selected tokens.
    """
    missing = [f"{key}={value}" for key, value in REQUIRED_MODEL_SETTINGS.items() if _get(config, key) != value]
    if _get(config, "actor_rollout_ref.actor.strategy") not in ("fsdp", "fsdp2"):
        missing.append("actor_rollout_ref.actor.strategy=fsdp (or fsdp2)")
    if not verl_is_patched():
        missing.append(f"the patch patches/{PATCH_NAME} applied to the installed verl (see patches/README.md)")
    if not missing:
        return None
    return (
        "algorithm.tip.mix=teacher_only: the actor update reads only the TIP-selected tokens, but verl will still "
        "build full-vocabulary logits for every token (correct, no memory saved). To skip the others, set: "
        + "; ".join(missing)
        + "."
    )
