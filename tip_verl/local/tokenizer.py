"""A character-level tokenizer: one id per character, plus PAD, BOS and EOS.

Batches of prompts are left-padded (as HF generate expects for decoder-only models).
"""

from __future__ import annotations

import torch

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


class CharTokenizer:
    """Maps each character of `alphabet` to one id; ids 0, 1, 2 are PAD, BOS, EOS."""

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet {alphabet!r} repeats a character.")
        self.specials = [PAD, BOS, EOS]
        self.alphabet = alphabet
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._to_id = {ch: i + len(self.specials) for i, ch in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of `text` (no special tokens)."""
        try:
            return [self._to_id[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the alphabet {self.alphabet!r}.") from None

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of `ids`, stopping at the first EOS and skipping PAD and BOS."""
        out = []
        for i in ids.tolist() if isinstance(ids, torch.Tensor) else ids:
            if i == self.eos_id:
                break
            if i >= len(self.specials):
                out.append(self.alphabet[i - len(self.specials)])
        return "".join(out)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """BOS + prompt, left-padded: input_ids (B, P) and attention_mask (B, P), 0 on padding."""
        rows = [[self.bos_id, *self.encode(p)] for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return ids, mask
