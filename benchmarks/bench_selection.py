"""Selection speed: each rule at several ratios, vectorised vs per-rollout loops vs one torch.sort.

    python benchmarks/bench_selection.py                 # 512 rollouts x 4096 tokens, ragged
    python benchmarks/bench_selection.py --rollouts 64   # quicker
    python benchmarks/bench_selection.py --threads 1     # steadier on a busy machine

Prints, per ratio and rule, the median time of each route, the ratios to the vectorised code and the
vectorised code's ratio to one full stable torch.sort over the same (rollouts, tokens) tensor (the cost of
ranking by sorting; the two run alternately and the ratio is the median of the per-pair ratios). Two loops: `torch loop` is the package's reference (`reference_select`: a Python loop
over rollouts, one torch.sort per rollout); `python loop` ranks each rollout's keys with Python's sorted()
on lists. Everything runs side by side in one process on the same tensors, and all routes must return the
same mask.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tip_verl.core.reference_selection import reference_select
from tip_verl.core.selection import SELECTION_RULES, SelectionInputs, select_tokens, selection_budget


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


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(seconds(fn) for _ in range(repeats))


def paired_medians(fn, reference, repeats: int) -> tuple[float, float, float]:
    """Median seconds of `fn` and of `reference`, run alternately, and the median of their per-pair ratios:
    on a loaded machine each pair sees about the same load, so the ratio is steadier than either time."""
    fn()  # warm-up
    reference()
    pairs = [(seconds(fn), seconds(reference)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(a / b for a, b in pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096, help="padded response length")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    mask, entropy, divergence = ragged_batch(args.rollouts, args.tokens)
    print(f"{args.rollouts} rollouts x {args.tokens} tokens, {int(mask.sum())} valid, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    header = ["ratio", "rule", "vectorised ms", "torch loop ms", "python loop ms", "torch loop/vec",
              "python loop/vec", "sort ms", "vec/sort"]
    print("".join(f"{h:>16}" for h in header))
    for ratio in args.ratios:
        for rule in SELECTION_RULES:
            def inputs():
                return SelectionInputs(mask, entropy, divergence, 0.98, torch.Generator().manual_seed(0))

            def vectorised():
                return select_tokens(rule, ratio, inputs())

            def torch_loop():
                return reference_select(rule, ratio, mask, entropy, divergence, 0.98, torch.Generator().manual_seed(0))

            def python_loop():
                return python_loop_select(rule, ratio, inputs())

            def full_sort():
                return torch.sort(entropy, dim=-1, descending=True, stable=True)

            fast, sort, fast_per_sort = paired_medians(vectorised, full_sort, args.repeats)
            row_loop = median_seconds(torch_loop, args.repeats)
            list_loop = median_seconds(python_loop, 1)
            assert torch.equal(vectorised(), torch_loop()) and torch.equal(vectorised(), python_loop()), rule
            cells = [f"{ratio:g}", rule, f"{fast * 1e3:.1f}", f"{row_loop * 1e3:.1f}", f"{list_loop * 1e3:.1f}",
                     f"{row_loop / fast:.1f}x", f"{list_loop / fast:.1f}x", f"{sort * 1e3:.1f}", f"{fast_per_sort:.2f}x"]
            print("".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
