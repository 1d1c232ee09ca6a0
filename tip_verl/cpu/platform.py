"""verl platform for running the trainer on the host CPU (no accelerator).

Registered as ``cpu`` in verl's ``PlatformRegistry`` and selected through
``VERL_PLATFORM=cpu``. Two choices make verl's GPU-shaped scheduling work:

- the Ray resource is ``GPU``: verl's resource pools always ask Ray for
  accelerators (``ResourcePoolManager`` builds pools with ``use_gpu=True``), so
  the CPU run declares a few logical GPUs to Ray (``ray_init.num_gpus``); each
  one stands for one trainer or server process, nothing is put on a GPU;
- collectives use ``gloo``.
"""

from contextlib import contextmanager
from types import ModuleType
from typing import Any, Optional

from verl.plugin.platform import PlatformBase, PlatformRegistry

from tip_verl.cpu import device_module

PLATFORM_NAME = "cpu"


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """Host CPU, with processes scheduled on logical Ray ``GPU`` slots."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        # Never auto-detected: only an explicit VERL_PLATFORM=cpu selects it.
        return False

    def current_device(self) -> str:
        # verl passes this as ``device=`` to torch; an int would mean an accelerator index.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        """Nothing to select on the CPU."""

    def synchronize(self, device_index: Optional[int] = None) -> None:
        """CPU kernels run synchronously."""

    def manual_seed(self, seed: int) -> None:
        device_module.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        device_module.manual_seed_all(seed)

    def set_allocator_settings(self, settings: str) -> None:
        """``expandable_segments`` and friends are GPU allocator settings."""

    def empty_cache(self) -> None:
        """The CPU allocator keeps no cache that verl could release."""

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets it on actors holding a logical GPU; harmless on a CPU-only torch.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        """No device profiler on the CPU."""

    def profiler_stop(self) -> None:
        """No device profiler on the CPU."""

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
