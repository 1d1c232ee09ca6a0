"""Selection speed: each rule, vectorised vs per-rollout loops vs one torch.sort (the floor).

    python benchmarks/bench_selection.py                 # 512 rollouts x 4096 tokens, ragged
    python benchmarks/bench_selection.py --rollouts 64   # quicker
    python benchmarks/bench_selection.py --threads 1     # steadier on a busy machine

Prints, per rule, the median time of each route and the ratios to the vectorised code. Two loops:
`torch loop` is the package's reference (`reference_select`: a Python loop over rollouts, one
torch.sort per rollout); `python loop` ranks each rollout's keys with Python's sorted() on lists.
Everything runs side by side in one process on the same tensors.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tip_verl.core.reference_selection import reference_select
from tip_verl.core.selection import SELECTION_RULES, SelectionInputs, select_tokens, selection_budget

RULES = ["random", "entropy", "entropy_sample", "divergence", "soft_or", "q3"]


def ragged_batch(rollouts: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rollouts,), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    entropy = torch.rand(rollouts, width, generator=g).pow(4) * 5  # most tokens confident
    divergence = torch.rand(rollouts, width, generator=g).pow(6) * 3
    return mask, entropy, divergence


def python_loop_select(rule: str, ratio: float, inputs: SelectionInputs) -> torch.Tensor:
    """The same keys, ranked per rollout with Python's sorted() (ties to the earlier position)."""
    keys = SELECTION_RULES[rule](inputs).tolist()
    mask = inputs.response_mask.tolist()
    budget = selection_budget(inputs.response_mask, ratio).tolist()
    selected = [[False] * len(row) for row in mask]
    for row, (row_keys, row_mask, k) in enumerate(zip(keys, mask, budget)):
        valid = [t for t, is_valid in enumerate(row_mask) if is_valid]
        for t in sorted(valid, key=lambda t: (-row_keys[t], t))[:k]:
            selected[row][t] = True
    return torch.tensor(selected)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096, help="padded response length")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    mask, entropy, divergence = ragged_batch(args.rollouts, args.tokens)
    print(f"{args.rollouts} rollouts x {args.tokens} tokens, {int(mask.sum())} valid, ratio {args.ratio}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    floor = median_seconds(lambda: torch.sort(entropy, dim=-1, descending=True, stable=True), args.repeats)
    print(f"one torch.sort over the batch: {floor * 1e3:.1f} ms\n")
    header = ["rule", "vectorised ms", "torch loop ms", "python loop ms", "torch loop/vec", "python loop/vec", "vec/sort"]
    print("".join(f"{h:>16}" for h in header))
    for rule in RULES:
        def inputs():
            return SelectionInputs(mask, entropy, divergence, 0.98, torch.Generator().manual_seed(0))

        def vectorised():
            return select_tokens(rule, args.ratio, inputs())

        def torch_loop():
            return reference_select(rule, args.ratio, mask, entropy, divergence, 0.98, torch.Generator().manual_seed(0))

        def python_loop():
            return python_loop_select(rule, args.ratio, inputs())

        fast = median_seconds(vectorised, args.repeats)
        row_loop = median_seconds(torch_loop, args.repeats)
        list_loop = median_seconds(python_loop, 1)
        assert torch.equal(vectorised(), torch_loop()) and torch.equal(vectorised(), python_loop()), rule
        cells = [f"{fast * 1e3:.1f}", f"{row_loop * 1e3:.1f}", f"{list_loop * 1e3:.1f}",
                 f"{row_loop / fast:.1f}x", f"{list_loop / fast:.1f}x", f"{fast / floor:.2f}x"]
        print(f"{rule:>16}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
