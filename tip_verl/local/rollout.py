"""Rollouts: batched sampling with HF generate (KV cache), response masks, per-token log-probs and entropy.

Shapes: N sequences (prompts x group size), P prompt positions (left-padded), T response positions
(right-padded after the EOS), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tip_verl.core.scores import token_entropy
from tip_verl.core.selected_logits import scatter_selected, selected_token_logprobs
from tip_verl.local.tokenizer import CharTokenizer


@dataclass
class Rollout:
    """prompt_ids, prompt_mask: (N, P) left-padded; responses, response_mask: (N, T), mask 1 up to and
    including the first EOS (every position when there is none, i.e. a truncated response)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor

    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.responses], dim=1)

    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


def response_mask_from(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on every position up to and including the first EOS of each row, 0 after. (N, T) int64."""
    is_eos = (responses == eos_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # EOS strictly before this position
    return (eos_before == 0).long()


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at 0 as in HF generate. (N, L)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp_min(0)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer: CharTokenizer,
    prompts: list[str],
    max_new_tokens: int,
    group_size: int = 1,
    temperature: float = 1.0,
    greedy: bool = False,
) -> Rollout:
    """`group_size` responses per prompt (rows of one prompt are adjacent), sampled at `temperature`
    from the full distribution (no top-k / top-p), or greedy."""
    prompt_ids, prompt_mask = tokenizer.encode_prompts(prompts)
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        use_cache=True,
        **sampling,
    )
    responses = out[:, prompt_ids.shape[1]:]
    response_mask = response_mask_from(responses, tokenizer.eos_id)
    responses = responses.masked_fill(response_mask == 0, tokenizer.pad_id)
    return Rollout(prompt_ids, prompt_mask, responses, response_mask)


def response_hidden(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """Final hidden states (N, T, H), after the last norm, at the positions that predict each response token."""
    attention_mask = rollout.attention_mask()
    hidden = model.model(
        input_ids=rollout.input_ids(),
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        use_cache=False,
    ).last_hidden_state
    prompt_len = rollout.prompt_ids.shape[1]
    return hidden[:, prompt_len - 1 : -1]


def response_logits(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """Logits (N, T, V) of the model at the positions that predict each response token."""
    return model.lm_head(response_hidden(model, rollout)).float()


def selected_logprobs(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    rollout: Rollout,
    selected: torch.Tensor,
    chunk_size: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs (N, T) of the sampled tokens at `selected` (N, T) positions under softmax(logits / temperature),
    with grad; 0 elsewhere.

    hidden: (N, T, H) from `response_hidden`. The LM head and log-softmax run only at the selected positions,
    `chunk_size` tokens at a time, so no full-vocabulary buffer (nor its backward) is built for the tokens TIP
    drops.
    """
    selected = selected.bool()
    logp, _ = selected_token_logprobs(
        hidden, model.lm_head.weight, selected, rollout.responses, chunk_size=chunk_size, temperature=temperature
    )
    return scatter_selected(logp, selected)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under softmax(logits): logits (N, T, V), tokens (N, T) -> (N, T)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def logprobs_and_entropy(model: torch.nn.Module, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the sampled response tokens (N, T), with grad if enabled, and entropy in nats (N, T),
    detached; both 0 at padding."""
    return _logprobs_and_entropy(response_logits(model, rollout), rollout)


@torch.no_grad()
def head_logprobs_and_entropy(
    model: torch.nn.Module, hidden: torch.Tensor, rollout: Rollout, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `logprobs_and_entropy`, without grad, from response hidden states (N, T, H) already computed, under
    softmax(logits / temperature), the distribution the rollout was sampled from."""
    return _logprobs_and_entropy(model.lm_head(hidden).float() / temperature, rollout)


def _logprobs_and_entropy(logits: torch.Tensor, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    mask = rollout.response_mask.bool()
    logp = token_logprobs(logits, rollout.responses).masked_fill(~mask, 0.0)
    entropy = token_entropy(logits.detach()).masked_fill(~mask, 0.0)
    return logp, entropy
