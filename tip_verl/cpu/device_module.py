"""A ``torch.cuda``-shaped namespace for the CPU.

verl calls its device module for memory statistics, caches, RNG state and
streams (``get_torch_device().empty_cache()`` and friends). ``torch.cpu`` has
streams and ``synchronize`` but none of the memory calls, so this module adds
them as harmless no-ops (memory queries answer from the host's RAM).
"""

import os

import torch
from torch.cpu import (  # noqa: F401  (re-exported: part of the device-module surface)
    Event,
    Stream,
    current_stream,
    device_count,
    is_available,
    stream,
    synchronize,
)


def current_device() -> str:
    """As ``torch.cpu.current_device``: the device itself, usable as ``device=``."""
    return "cpu"


def set_device(device_index) -> None:
    """Nothing to select on the CPU."""


def get_device_name(device_index=None) -> str:
    return "cpu"


def empty_cache() -> None:
    """The CPU allocator keeps no cache that verl could release."""


def ipc_collect() -> None:
    """No inter-process device memory on the CPU."""


def set_per_process_memory_fraction(fraction, device=None) -> None:
    """Memory fractions are a GPU allocator setting."""


def mem_get_info(device=None) -> tuple[int, int]:
    """(free, total) bytes of host RAM, as ``torch.cuda.mem_get_info`` answers for a GPU."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page_size
    free = os.sysconf("SC_AVPHYS_PAGES") * page_size
    return free, total


def memory_allocated(device=None) -> int:
    return 0


def memory_reserved(device=None) -> int:
    return 0


def max_memory_allocated(device=None) -> int:
    return 0


def max_memory_reserved(device=None) -> int:
    return 0


def reset_peak_memory_stats(device=None) -> None:
    """No device memory statistics to reset."""


def manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


def manual_seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def get_rng_state(device=None) -> torch.Tensor:
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device=None) -> None:
    torch.set_rng_state(state)
