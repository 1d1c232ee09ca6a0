"""CPU mode: run verl's own trainer (``verl.trainer.main_ppo``) without a GPU.

Nothing here is active unless CPU mode is asked for with ``TIP_VERL_CPU=1``.
Then :func:`activate_if_requested`, called by our ``verl.plugins`` entry point
in every process that imports verl (Ray workers included), registers:

- a ``cpu`` platform (:mod:`tip_verl.cpu.platform`),
- verl's FSDP engines for the ``cpu`` device (:mod:`tip_verl.cpu.registration`),
- an ``hf`` rollout and teacher backend that runs Hugging Face models on the
  CPU (:mod:`tip_verl.cpu.hf_replica`, :mod:`tip_verl.cpu.hf_adapter`),
- two small compatibility shims where verl has no hook (:mod:`tip_verl.cpu.compat`).

See ``docs/cpu_mode.md``.
"""

import os

CPU_MODE_ENV = "TIP_VERL_CPU"

_active = False


def cpu_mode_requested() -> bool:
    """True when the environment asks for CPU mode (``TIP_VERL_CPU=1``)."""
    return os.environ.get(CPU_MODE_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def activate_if_requested() -> bool:
    """Register the CPU platform, engines and ``hf`` rollout if CPU mode is asked for.

    Idempotent and cheap when CPU mode is off (GPU users see no change).
    Returns whether CPU mode is active in this process.
    """
    global _active
    if _active or not cpu_mode_requested():
        return _active
    from tip_verl.cpu import compat, registration

    registration.register_platform()
    registration.register_engines()
    registration.register_hf_rollout()
    compat.apply()
    _active = True
    return True
