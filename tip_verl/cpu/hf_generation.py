"""Token-in/token-out generation and prompt log-probs with a Hugging Face causal LM.

Plain functions (no Ray, no verl) so they can be tested on their own; the
``hf`` rollout server (:mod:`tip_verl.cpu.hf_server`) wraps them. Log-probs
follow vLLM's conventions as verl consumes them:

- sampled-token log-probs are taken from the temperature-scaled distribution
  (what the trainer recomputes as ``old_log_probs``);
- prompt log-probs at position ``j`` score token ``j + 1`` (the first prompt
  token has none), and a dummy entry pads the last position, so there is one
  entry per prompt token (as ``extract_prompt_logprobs`` in verl's vLLM server).
"""

from dataclasses import dataclass

import torch


@dataclass
class SamplingSettings:
    """The subset of vLLM sampling parameters the ``hf`` rollout honours."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@torch.no_grad()
def generate_with_logprobs(
    model, prompt_ids: list[int], settings: SamplingSettings, eos_token_ids: set[int]
) -> tuple[list[int], list[float]]:
    """Sample a response with Hugging Face `generate` (KV cache, top-k / top-p as vLLM's parameters say);
    return (token_ids, log_probs) with the log-probs under the temperature-scaled, unfiltered distribution."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    sampling = {} if settings.greedy else {
        "temperature": settings.temperature,
        "top_k": settings.top_k if settings.top_k and settings.top_k > 0 else 0,
        "top_p": settings.top_p,
    }
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=settings.max_tokens,
        do_sample=not settings.greedy,
        eos_token_id=sorted(eos_token_ids),
        pad_token_id=min(eos_token_ids),
        output_logits=True,
        return_dict_in_generate=True,
        **sampling,
    )
    token_ids = output.sequences[0, input_ids.shape[1] :]
    scale = 1.0 if settings.greedy else settings.temperature
    logits = torch.stack(output.logits, dim=1)[0].float() / scale
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return token_ids.tolist(), log_probs.tolist()


@torch.no_grad()
def prompt_logprobs(model, prompt_ids: list[int], num_top: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per-position prompt log-probs in the layout verl's teacher path expects.

    ``num_top == 0``: each position holds the actual next token and its log-prob.
    ``num_top > 0``: each position holds the teacher's top-``num_top`` tokens and log-probs.
    Returns (ids, log_probs), each ``len(prompt_ids)`` rows.
    """
    logits = model(input_ids=torch.tensor([prompt_ids], dtype=torch.long)).logits[0, :-1]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if num_top == 0:
        next_ids = torch.tensor(prompt_ids[1:], dtype=torch.long).unsqueeze(-1)
        top_ids, top_log_probs = next_ids, log_probs.gather(-1, next_ids)
    else:
        top_log_probs, top_ids = torch.topk(log_probs, num_top, dim=-1)
    width = max(num_top, 1)
    ids = top_ids.tolist() + [[0] * width]
    values = top_log_probs.tolist() + [[0.0] * width]
    return ids, values
