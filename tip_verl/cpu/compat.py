"""Three CPU-only shims for verl 0.9.1 where verl offers no hook.

All are applied only by :func:`tip_verl.cpu.activate_if_requested` (CPU mode).

1. Process-group backend. ``initialize_global_process_group_ray`` builds
   ``f"cpu:gloo,{device}:{backend}"``, which is ``cpu:gloo,cpu:gloo`` on the CPU
   and torch rejects the duplicate device. We pass ``gloo`` instead.
   Upstream fix: ``patches/verl-0.9.1-cpu-process-group-backend.diff``.
2. Reference-model offload. FSDP2 engines that only run forward passes (the
   reference policy) use ``CPUOffloadPolicy(pin_memory=True)``; pinning host
   memory needs an accelerator. On the CPU we offload without pinning.
3. Top-k teacher log-probs. ``DistillationTeacherModelConfig`` accepts top-k
   distillation losses only for vllm/sglang teachers (its ``case _`` raises).
   The ``hf`` teacher serves top-k prompt log-probs per request, as SGLang
   does, so it passes the same way; other engines are still checked by verl.
"""

import functools

from torch.distributed.fsdp import CPUOffloadPolicy

from tip_verl.cpu.registration import HF_ROLLOUT_NAME


class UnpinnedCPUOffloadPolicy(CPUOffloadPolicy):
    """``CPUOffloadPolicy`` that never pins memory (pinning needs an accelerator)."""

    def __init__(self, pin_memory: bool = False):
        super().__init__(pin_memory=False)


def _gloo_backend(initialize):
    @functools.wraps(initialize)
    def initialize_with_gloo(timeout_second=None, backend=None):
        return initialize(timeout_second=timeout_second, backend=backend or "gloo")

    return initialize_with_gloo


def _accept_hf_topk_teacher(validate_topk_logprobs):
    @functools.wraps(validate_topk_logprobs)
    def validate_with_hf(self, use_topk: bool, topk):
        if use_topk and self.inference.name == HF_ROLLOUT_NAME:
            if topk is None:
                raise ValueError("topk must be specified when use_topk is True.")
            return
        validate_topk_logprobs(self, use_topk, topk)

    return validate_with_hf


def apply() -> None:
    """Install the shims (idempotent)."""
    from verl.utils import distributed
    from verl.workers.config import DistillationTeacherModelConfig
    from verl.workers.engine.fsdp import transformer_impl

    if not hasattr(distributed.initialize_global_process_group_ray, "__wrapped__"):
        distributed.initialize_global_process_group_ray = _gloo_backend(distributed.initialize_global_process_group_ray)
    transformer_impl.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy
    if not hasattr(DistillationTeacherModelConfig._validate_topk_logprobs, "__wrapped__"):
        DistillationTeacherModelConfig._validate_topk_logprobs = _accept_hf_topk_teacher(
            DistillationTeacherModelConfig._validate_topk_logprobs
        )
