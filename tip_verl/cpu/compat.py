"""Two CPU-only shims for verl 0.9.1 where verl offers no hook.

All are applied only by :func:`tip_verl.cpu.activate_if_requested` (CPU mode).

1. Process-group backend. ``initialize_global_process_group_ray`` builds
   ``f"cpu:gloo,{device}:{backend}"``, which is ``cpu:gloo,cpu:gloo`` on the CPU
   and torch rejects the duplicate device. We pass ``gloo`` instead.
   Upstream fix: ``patches/verl-0.9.1-cpu-process-group-backend.diff``.
2. Reference-model offload. FSDP2 engines that only run forward passes (the
   reference policy) use ``CPUOffloadPolicy(pin_memory=True)``; pinning host
   memory needs an accelerator. On the CPU we offload without pinning.

The shims for vLLM's CPU build are in :mod:`tip_verl.cpu.vllm_cpu`.
"""

import functools

from torch.distributed.fsdp import CPUOffloadPolicy


class UnpinnedCPUOffloadPolicy(CPUOffloadPolicy):
    """``CPUOffloadPolicy`` that never pins memory (pinning needs an accelerator)."""

    def __init__(self, pin_memory: bool = False):
        super().__init__(pin_memory=False)


def _gloo_backend(initialize):
    @functools.wraps(initialize)
    def initialize_with_gloo(timeout_second=None, backend=None):
        return initialize(timeout_second=timeout_second, backend=backend or "gloo")

    return initialize_with_gloo


def apply() -> None:
    """Install the shims (idempotent)."""
    from verl.utils import distributed
    from verl.workers.engine.fsdp import transformer_impl

    if not hasattr(distributed.initialize_global_process_group_ray, "__wrapped__"):
        distributed.initialize_global_process_group_ray = _gloo_backend(distributed.initialize_global_process_group_ray)
    transformer_impl.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy
