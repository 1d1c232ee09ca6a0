"""Registrations into verl's own registries for CPU mode (no source patch)."""

from verl.plugin.platform import set_platform


def register_platform() -> None:
    """Make the ``cpu`` platform the current one in this process.

    ``import verl`` resolves a platform before plugins load (to ``nvidia`` on a
    machine without GPU), so this replaces it; it must run before modules that
    cache the device name at import (the FSDP engine) are imported. We do not
    set ``VERL_PLATFORM``: child processes would then fail in ``import verl``,
    which resolves the platform before our plugin has registered ``cpu``.
    """
    from tip_verl.cpu.platform import PlatformCPU

    set_platform(PlatformCPU())


def _register_engine(model_type: str, engine_cls) -> None:
    from verl.workers.engine.base import EngineRegistry

    registry = EngineRegistry._engines.get(model_type, {})
    backends = [backend for backend in ("fsdp", "fsdp2") if "cpu" not in registry.get(backend, {})]
    if backends:
        EngineRegistry.register(model_type=model_type, backend=backends, device="cpu")(engine_cls)


def register_engines() -> None:
    """Register verl's FSDP/FSDP2 engines (actor and critic) for the ``cpu`` device.

    They are registered for ``cuda``/``npu`` only, but go through the platform
    layer for everything device-specific, so they run on the CPU as they are.
    """
    from verl.workers.engine.fsdp import transformer_impl
    from verl.workers.engine.fsdp.transformer_impl import (
        FSDPEngineWithLMHead,
        FSDPEngineWithValueHead,
    )

    if transformer_impl.device_name != "cpu":
        raise RuntimeError(
            "verl's FSDP engine was imported before CPU mode was activated (it caches the device name at "
            "import): call tip_verl.cpu.activate_if_requested() before importing verl's trainer or workers."
        )
    _register_engine("language_model", FSDPEngineWithLMHead)
    _register_engine("value_model", FSDPEngineWithValueHead)
