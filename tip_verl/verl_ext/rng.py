"""Seeded generators for the random selection rules (random, entropy_sample)."""

import torch

_generators: dict[int, torch.Generator] = {}


def selection_generator(seed: int) -> torch.Generator:
    """One generator per seed per process, offset by the distributed rank so data-parallel ranks differ.

    The draws are deterministic given the seed and the order of the steps.
    """
    if seed not in _generators:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        _generators[seed] = torch.Generator().manual_seed(seed + rank)
    return _generators[seed]
