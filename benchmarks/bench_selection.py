"""Selection speed: each rule, vectorised vs the per-rollout loop reference vs one torch.sort (the floor).

    python benchmarks/bench_selection.py                 # 512 rollouts x 4096 tokens, ragged
    python benchmarks/bench_selection.py --rollouts 64   # quicker

Prints, per rule, the median time of each route and the ratios loop/vectorised (goal >= 20x) and
vectorised/sort (goal <= 2x). Everything runs side by side in one process on the same tensors.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tip_verl.core.reference_selection import reference_select
from tip_verl.core.selection import SelectionInputs, select_tokens

RULES = ["random", "entropy", "entropy_sample", "divergence", "soft_or", "q3"]


def ragged_batch(rollouts: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rollouts,), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    entropy = torch.rand(rollouts, width, generator=g).pow(4) * 5  # most tokens confident
    divergence = torch.rand(rollouts, width, generator=g).pow(6) * 3
    return mask, entropy, divergence


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
    args = parser.parse_args()

    mask, entropy, divergence = ragged_batch(args.rollouts, args.tokens)
    print(f"{args.rollouts} rollouts x {args.tokens} tokens, {int(mask.sum())} valid, ratio {args.ratio}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    floor = median_seconds(lambda: torch.sort(entropy, dim=-1, descending=True, stable=True), args.repeats)
    print(f"one torch.sort over the batch: {floor * 1e3:.1f} ms\n")
    print(f"{'rule':<16}{'vectorised ms':>14}{'loop ms':>10}{'loop/vec':>10}{'vec/sort':>10}")
    for rule in RULES:
        def vectorised():
            inputs = SelectionInputs(mask, entropy, divergence, 0.98, torch.Generator().manual_seed(0))
            return select_tokens(rule, args.ratio, inputs)

        def loop():
            return reference_select(rule, args.ratio, mask, entropy, divergence, 0.98, torch.Generator().manual_seed(0))

        fast = median_seconds(vectorised, args.repeats)
        slow = median_seconds(loop, max(1, args.repeats // 2))
        assert torch.equal(vectorised(), loop()), rule
        print(f"{rule:<16}{fast * 1e3:>14.1f}{slow * 1e3:>10.1f}{slow / fast:>9.1f}x{fast / floor:>9.2f}x")


if __name__ == "__main__":
    main()
