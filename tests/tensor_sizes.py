"""A dispatch mode that records the largest tensor each dtype gets while it is active."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates, per dtype (forward and backward run through the mode)."""

    def __init__(self):
        super().__init__()
        self.by_dtype: dict[torch.dtype, int] = {}

    @property
    def largest(self) -> int:
        return max(self.by_dtype.values(), default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.by_dtype[t.dtype] = max(self.by_dtype.get(t.dtype, 0), t.numel())
        return out
