"""Seeded generators for the random selection rules (random, entropy_sample)."""

from typing import Optional

import numpy as np
import torch

_generators: dict[int, tuple[Optional[int], torch.Generator]] = {}


def selection_generator(seed: int, step: Optional[int] = None) -> torch.Generator:
    """The generator of the random rules for training step `step`, offset by the distributed rank.

    With a step, the stream starts from (seed, step, rank) the first time the step asks for it and continues
    through the step's later calls (micro-batches, epochs), so the draws depend only on the seed, the step and
    the order of calls within it: a run resumed from a checkpoint draws what the uninterrupted run drew.
    Without a step, one stream per seed for the whole process. The generator is a CPU one on every device:
    the rules draw on it and move the draw to the tensors' device, so a seed draws the same on CPU and GPU.
    """
    cached_step, generator = _generators.get(seed, (None, None))
    if generator is None or cached_step != step:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        entropy = [seed, rank] if step is None else [seed, rank, step]
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        _generators[seed] = (step, generator)
    return generator
