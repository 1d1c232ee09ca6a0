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


def _filter_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Mask logits outside top-k / top-p (nucleus); ``logits`` is 1-D, already temperature-scaled."""
    if settings.top_k is not None and 0 < settings.top_k < logits.numel():
        kth_value = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_value, float("-inf"))
    if settings.top_p is not None and settings.top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) > settings.top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, sorted_ids, drop_sorted), float("-inf"))
    return logits


def _pick_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> tuple[int, float]:
    """Choose the next token; return it with its log-prob under the (temperature-scaled) model distribution."""
    if settings.greedy:
        token = int(torch.argmax(logits))
        return token, float(torch.log_softmax(logits.float(), dim=-1)[token])
    scaled = logits.float() / settings.temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    filtered = _filter_logits(scaled, settings)
    token = int(torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=generator))
    return token, float(log_probs[token])


@torch.no_grad()
def generate_with_logprobs(
    model,
    prompt_ids: list[int],
    settings: SamplingSettings,
    eos_token_ids: set[int],
    generator: torch.Generator,
) -> tuple[list[int], list[float], str]:
    """Sample a response with a KV cache; return (token_ids, log_probs, finish_reason)."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    past_key_values = None
    token_ids, log_probs = [], []
    finish_reason = "length"
    for _ in range(settings.max_tokens):
        output = model(input_ids=input_ids, past_key_values=past_key_values, use_cache=True)
        past_key_values = output.past_key_values
        token, log_prob = _pick_token(output.logits[0, -1], settings, generator)
        token_ids.append(token)
        log_probs.append(log_prob)
        if token in eos_token_ids:
            finish_reason = "stop"
            break
        input_ids = torch.tensor([[token]], dtype=torch.long)
    return token_ids, log_probs, finish_reason


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
