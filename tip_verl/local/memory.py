"""Memory of a training step on CPU, where torch keeps no allocator peak.

`saved_activations` counts the bytes autograd keeps for backward (the activations, logits and log-softmax
buffers a step builds), the part that grows with the number of trained tokens. Parameters are excluded.
"""

from __future__ import annotations

import resource
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def saved_activations(model: torch.nn.Module) -> Iterator[dict]:
    """Inside the block, `stats["bytes"]` sums the distinct storages saved for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    stats = {"bytes": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield stats
    stats["bytes"] = sum(storages.values())


def max_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
