"""Teacher and student: small Llama models built from a config, saved as safetensors with a JSON card."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tip_verl.local.plans import ModelSize
from tip_verl.local.tokenizer import CharTokenizer


def llama_config(size: ModelSize, tokenizer: CharTokenizer, max_positions: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=size.hidden,
        intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )


def build_model(size: ModelSize, tokenizer: CharTokenizer, max_positions: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama, the same weights for the same seed."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size, tokenizer, max_positions))
    model.generation_config.pad_token_id = tokenizer.pad_id
    model.generation_config.eos_token_id = tokenizer.eos_id
    return model


def save_model(model: LlamaForCausalLM, size: ModelSize, path: Path, card: dict) -> None:
    """`path`.safetensors (float16, to keep shipped assets small) and `path`.json (size, max positions, card)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to the embedding
    save_file(state, str(path.with_suffix(".safetensors")))
    meta = {"size": asdict(size), "max_positions": model.config.max_position_embeddings, **card}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))


def load_model(path: Path, tokenizer: CharTokenizer) -> tuple[LlamaForCausalLM, dict]:
    """The model saved at `path` in float32, and its card."""
    meta = json.loads(path.with_suffix(".json").read_text())
    model = build_model(ModelSize(**meta["size"]), tokenizer, meta["max_positions"], seed=0)
    state = {k: v.float() for k, v in load_file(str(path.with_suffix(".safetensors"))).items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model, meta


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
