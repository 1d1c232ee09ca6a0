"""Build the tiny CPU world for ``examples/run_tiny_cpu.sh``: tokenizer, models, data.

Nothing is downloaded. Writes into ``--out``::

    student/   tiny Llama-style causal LM (random init) + tokenizer
    teacher/   a larger tiny causal LM (random init) + the same tokenizer
    data/train.parquet, data/test.parquet   verl RL dataset rows
    reward.py  path printed for ``reward.custom_reward_function.path``

The task: ``"a + b ="`` with single digits; the answer is one word (``"0"``..``"18"``).
A second call with the same ``--out`` reuses what is there (cached by a stamp file).

    python -m tip_verl.worlds.tiny --out DIR
"""

import argparse
import json
import random
from pathlib import Path

import pandas as pd

DATA_SOURCE = "tiny_addition"
STAMP_NAME = "prepared.json"
FORMAT_VERSION = 2

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer():
    """Word-level tokenizer over digits, sums and a few operator words, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + [str(n) for n in range(19)] + ["+", "=", "<|system|>"]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, hidden_size: int, num_layers: int, seed: int):
    """A tiny Llama-style causal LM from a config (head_dim 32), random init.

    The LM head is tied to the embeddings, as in Qwen3's small models. (Untied, verl 0.9.1's FSDP2 shards
    `lm_head` as its own unit, which its fused-kernel forward reads without gathering: a DTensor error.)
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 32,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def addition_rows(split: str, count: int, seed: int) -> list[dict]:
    """verl RL dataset rows: chat prompt, data source, rule-based ground truth."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        left, right = rng.randrange(10), rng.randrange(10)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"{left} + {right} ="}],
                "ability": "arithmetic",
                "reward_model": {"style": "rule", "ground_truth": str(left + right)},
                "extra_info": {"split": split, "index": index},
            }
        )
    return rows


def prepare(out: Path, train_size: int = 64, test_size: int = 8) -> dict:
    """Write tokenizer, student, teacher and data under ``out`` unless already there; return the paths."""
    out = Path(out)
    stamp = out / STAMP_NAME
    settings = {"format_version": FORMAT_VERSION, "train_size": train_size, "test_size": test_size}
    if stamp.exists() and json.loads(stamp.read_text()).get("settings") == settings:
        return json.loads(stamp.read_text())["paths"]

    tokenizer = build_tokenizer()
    paths = {
        "student": str(out / "student"),
        "teacher": str(out / "teacher"),
        "train": str(out / "data" / "train.parquet"),
        "test": str(out / "data" / "test.parquet"),
        "reward": str(Path(__file__).with_name("reward.py")),
    }
    for role, hidden_size, num_layers, seed in (("student", 64, 2, 0), ("teacher", 96, 3, 1)):
        model = build_model(tokenizer, hidden_size, num_layers, seed)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    Path(paths["train"]).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(addition_rows("train", train_size, seed=0)).to_parquet(paths["train"])
    pd.DataFrame(addition_rows("test", test_size, seed=1)).to_parquet(paths["test"])
    stamp.write_text(json.dumps({"settings": settings, "paths": paths}, indent=2))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory to build (or reuse) the tiny world in")
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--test-size", type=int, default=8)
    args = parser.parse_args()
    for name, path in prepare(args.out, args.train_size, args.test_size).items():
        print(f"{name}={path}")


if __name__ == "__main__":
    main()
