"""The ``hf`` rollout server: a Ray actor serving a Hugging Face model on the CPU.

It stands where verl puts a vLLM/SGLang server (one per rollout replica, or per
teacher replica) and answers the same calls: ``generate`` (token-in/token-out,
returning verl's ``TokenOutput``, with sampled-token log-probs and, for the
teacher, ``prompt_logprobs``), weight updates from the trainer, and the
sleep/wake/abort lifecycle, which is a no-op on the CPU (nothing to free).

Requests are served one at a time: the tiny CPU models need no batching.
"""

import logging
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.replica import TokenOutput

from tip_verl.cpu.hf_generation import (
    SamplingSettings,
    generate_with_logprobs,
    prompt_logprobs,
)

logger = logging.getLogger(__name__)

# Test-only switch (``actor_rollout_ref.rollout.custom.ignore_weight_updates=true``):
# the server drops weight updates, so the rollout keeps the initial policy.
IGNORE_WEIGHT_UPDATES_KEY = "ignore_weight_updates"


def _eos_token_ids(model_path: str, model_config: HFModelConfig) -> set[int]:
    eos_ids = set()
    try:
        generation_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        eos_ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    except OSError:
        pass
    tokenizer = getattr(model_config, "tokenizer", None)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return {token for token in eos_ids if token is not None}


class HFRolloutServer:
    """Serves one replica of a Hugging Face causal LM (student rollout or teacher)."""

    def __init__(self, config: RolloutConfig, model_config, replica_rank: int):
        self.config: RolloutConfig = omega_conf_to_dataclass(config)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config)  # objects pass through
        self.replica_rank = replica_rank
        model_path = self.model_config.local_path
        dtype = getattr(torch, self.config.dtype) if isinstance(self.config.dtype, str) else self.config.dtype
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa").eval()
        self.eos_token_ids = _eos_token_ids(model_path, self.model_config)
        torch.manual_seed(int(self.config.seed) + replica_rank)  # one server per process: generate's sampling RNG
        self.ignore_weight_updates = bool((self.config.custom or {}).get(IGNORE_WEIGHT_UPDATES_KEY, False))
        self.global_steps: Optional[int] = None

    def _max_tokens(self, prompt_length: int, sampling_params: dict[str, Any]) -> int:
        budget = self.config.prompt_length + self.config.response_length - prompt_length
        requested = sampling_params.get("max_tokens") or sampling_params.get("max_new_tokens")
        requested = requested or self.config.response_length
        return max(1, min(requested, budget, self.config.response_length))

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Optional[list[Any]] = None,
        video_data: Optional[list[Any]] = None,
        **kwargs,
    ) -> TokenOutput:
        """Generate a response; with ``prompt_logprobs`` set, also score the prompt (teacher path)."""
        if image_data is not None or video_data is not None:
            raise NotImplementedError(
                "The hf rollout serves text-only models: use a text dataset on CPU, or vllm/sglang on a GPU."
            )
        prompt_ids = [int(token) for token in prompt_ids]
        top_k = sampling_params.get("top_k", -1)
        settings = SamplingSettings(
            max_tokens=self._max_tokens(len(prompt_ids), sampling_params),
            temperature=float(sampling_params.get("temperature", self.config.temperature)),
            top_k=-1 if top_k is None else int(top_k),
            top_p=float(sampling_params.get("top_p", 1.0) or 1.0),
        )
        extra_fields: dict[str, Any] = {"global_steps": self.global_steps}
        num_prompt_logprobs = sampling_params.get("prompt_logprobs")
        if num_prompt_logprobs is not None:
            ids, values = prompt_logprobs(self.model, prompt_ids, int(num_prompt_logprobs))
            extra_fields["prompt_ids"], extra_fields["prompt_logprobs"] = ids, values
        token_ids, log_probs = generate_with_logprobs(self.model, prompt_ids, settings, self.eos_token_ids)
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if sampling_params.get("logprobs") else None,
            stop_reason="completed",
            extra_fields=extra_fields,
        )

    async def update_weights(self, named_tensors: dict[str, torch.Tensor], global_steps: Optional[int] = None) -> int:
        """Load full (unsharded) HF-named weights from the trainer; return how many tensors were loaded.

        The step tag follows the trainer even when the test switch drops the weights themselves.
        """
        if global_steps is not None:
            self.global_steps = global_steps
        if self.ignore_weight_updates:
            logger.warning("hf rollout replica %d ignores a weight update (test switch)", self.replica_rank)
            return 0
        result = self.model.load_state_dict(named_tensors, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"weights the rollout model does not have: {result.unexpected_keys[:5]}")
        return len(named_tensors)

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def abort_all_requests(self, reject_request: bool = False) -> dict[str, Any]:
        """Requests run to completion one at a time: there is never one to abort."""
        return {"aborted_count": 0, "request_ids": []}

    async def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Weights stay in host memory: nothing to wake."""

    async def sleep(self) -> None:
        """Nothing to release on the CPU."""

    async def clear_kv_cache(self) -> None:
        """The KV cache lives only for one request."""

    async def release_kv_cache(self) -> None:
        """The KV cache lives only for one request."""

    async def resume_kv_cache(self) -> None:
        """The KV cache lives only for one request."""

    async def resume_generation(self) -> None:
        """Generation is never paused."""

    async def start_profile(self, **kwargs) -> None:
        """No rollout profiler on the CPU."""

    async def stop_profile(self) -> None:
        """No rollout profiler on the CPU."""
