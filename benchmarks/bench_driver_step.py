"""Driver-side tensor work of one `tip_sync` step that selects in the trainer (preselect; tip_opd does the same
selection inside verl's advantage step): before and after the compact-driver changes, side by side.

    python benchmarks/bench_driver_step.py                          # 64 prompts x 8 x 2048 tokens: ~1 min on CPU
    python benchmarks/bench_driver_step.py --prompts 512 --response-len 8192 --repeats 1   # ~25M tokens

Inputs are nested (jagged) tensors laid out as TransferQueue returns them: response-aligned response_mask and
loss_mask (int64, as verl's agent loop writes them), old_log_probs and entropy (float32), and teacher_logprobs
over the whole sequence (prompt + response, 1). Each route runs in a fresh process, so its peak RSS is its own.

Stages timed: `inputs` (nested -> padded: old log-probs, entropy, the teacher's response part, the mask),
`select` (select_and_reward: divergence, quadrants, rule), `metrics` (tip_metrics), `to_nested` (the selection
back to TransferQueue's layout) and `masks` (masks_on_selected for the update). `before` is the previous code:
int64 padded masks, padded twice, and both masks put back after the update; `after` is tip_sync's own
functions. Bytes through TransferQueue per step are counted from the tensors (values + offsets).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time

import torch
from tensordict import TensorDict
from verl.workers.utils.padding import response_to_nested

from tip_verl.core.advantages import select_and_reward
from tip_verl.core.config import TipConfig
from tip_verl.core.metrics import tip_metrics
from tip_verl.verl_ext.rng import selection_generator
from tip_verl.verl_ext.trainer import (
    LOSS_MASKS,
    RESTORED_MASK,
    masks_on_selected,
    padded_bool,
    padded_tip_inputs,
    sampled_token_teacher_logprobs,
)

STAGES = ("inputs", "select", "metrics", "to_nested", "masks")


def nested(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return torch.nested.nested_tensor_from_jagged(values, offsets, max_seqlen=int(lengths.max()))


def transferqueue_fields(rollouts: int, prompt_len: int, response_len: int, seed: int = 0) -> dict:
    """The fields of one step as TransferQueue hands them to the driver, ragged in [response_len / 2, response_len]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(response_len // 2, response_len + 1, (rollouts,), generator=g)
    tokens = int(lengths.sum())
    old = -torch.rand(tokens, generator=g) * 3
    teacher = -torch.rand(tokens + rollouts * prompt_len, 1, generator=g) * 3
    return {
        "response_mask": nested(torch.ones(tokens, dtype=torch.long), lengths),
        "loss_mask": nested(torch.ones(tokens, dtype=torch.long), lengths),
        "old_log_probs": nested(old, lengths),
        "entropy": nested(torch.rand(tokens, generator=g) * 4, lengths),
        "teacher_logprobs": nested(teacher, lengths + prompt_len),
    }


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.values().nbytes + tensor.offsets().nbytes


def run_step(route: str, data: dict, tip: TipConfig) -> tuple[dict, dict]:
    """One step's driver work; returns seconds per stage and bytes through TransferQueue."""
    seconds, moved = {}, {}
    clock = time.perf_counter()

    def lap(stage):
        nonlocal clock
        now = time.perf_counter()
        seconds[stage], clock = now - clock, now

    nested_mask = data["response_mask"]
    if route == "before":
        inputs = {
            "old_log_probs": data["old_log_probs"].to_padded_tensor(0.0),
            "entropy": data["entropy"].to_padded_tensor(0.0),
            "teacher_logprobs": sampled_token_teacher_logprobs(data["teacher_logprobs"], nested_mask),
        }
        response_mask = nested_mask.to_padded_tensor(0)
    else:
        inputs = padded_tip_inputs(data)
        response_mask = padded_bool(nested_mask)
    lap("inputs")
    tokens = select_and_reward(tip, response_mask, generator=selection_generator(tip.seed, 0), **inputs)
    lap("select")
    tip_metrics(tokens, nested_mask.to_padded_tensor(0) if route == "before" else response_mask)
    lap("metrics")
    selected = response_to_nested(tokens.selected, nested_mask)
    lap("to_nested")
    full_masks = {name: data[name] for name in LOSS_MASKS}
    restricted = masks_on_selected(TensorDict(full_masks, batch_size=[nested_mask.shape[0]]), selected)
    lap("masks")
    restored = LOSS_MASKS if route == "before" else (RESTORED_MASK,)
    fetched = ["response_mask", "old_log_probs", "entropy", "teacher_logprobs"]
    moved["advantage_fetch"] = sum(nbytes(data[name]) for name in fetched)
    moved["update_fetch"] = sum(nbytes(mask) for mask in full_masks.values())
    moved["update_put"] = sum(nbytes(mask) for mask in restricted.values()) + nbytes(selected)
    moved["restore_put"] = sum(nbytes(full_masks[name]) for name in restored)
    return seconds, moved


def measure(route: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(args.threads)
    data = transferqueue_fields(args.prompts * args.rollouts, args.prompt_len, args.response_len)
    tip = TipConfig(rule=args.rule, ratio=0.5, preselect=True)
    baseline_mb = resident_mb()  # the inputs are built without temporaries: the lifetime peak so far
    runs = [run_step(route, data, tip) for _ in range(args.repeats)]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = {stage: statistics.median(run[0][stage] for run in runs) for stage in STAGES}
    tokens = int(data["response_mask"].values().numel())
    queue.put({"route": route, "seconds": seconds, "moved": runs[0][1], "tokens": tokens,
               "peak_mb": peak_mb - baseline_mb})


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--response-len", type=int, default=2048)
    parser.add_argument("--rule", default="soft_or")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    results = []
    for route in ("before", "after"):
        queue = context.Queue()
        process = context.Process(target=measure, args=(route, args, queue))
        process.start()
        results.append(queue.get())
        process.join()
    before, after = results
    shortest = args.response_len // 2
    print(f"\n{args.prompts} prompts x {args.rollouts} rollouts, responses {shortest}-{args.response_len} tokens "
          f"({before['tokens']:,} response tokens), prompt {args.prompt_len}, rule={args.rule}, "
          f"{args.threads} thread(s), median of {args.repeats}\n")
    print("| stage | before s | after s |\n|---|---|---|")
    for stage in STAGES:
        print(f"| {stage} | {before['seconds'][stage]:.3f} | {after['seconds'][stage]:.3f} |")
    total = {r["route"]: sum(r["seconds"].values()) for r in results}
    print(f"| **total** | **{total['before']:.3f}** | **{total['after']:.3f}** |")
    print(f"| peak RSS above the inputs, MB | {before['peak_mb']:.0f} | {after['peak_mb']:.0f} |")
    for key in before["moved"]:
        print(f"| TransferQueue {key.replace('_', ' ')}, MB | {before['moved'][key] / 2**20:.0f} | "
              f"{after['moved'][key] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
