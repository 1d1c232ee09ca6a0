"""CPU mode: run verl's own trainer (``verl.trainer.main_ppo``) without a GPU.

Nothing here is active unless CPU mode is asked for with ``TIP_VERL_CPU=1``.
Then :func:`activate_if_requested`, called by our ``verl.plugins`` entry point
in every process that imports verl (Ray workers and vLLM's processes included):

- stops the process, naming the fix, if vLLM's CPU build cannot run here
  (:func:`tip_verl.cpu.vllm_cpu.check_installation`);
- registers a ``cpu`` platform (:mod:`tip_verl.cpu.platform`) and verl's FSDP
  engines for the ``cpu`` device (:mod:`tip_verl.cpu.registration`);
- installs two shims where verl has no hook (:mod:`tip_verl.cpu.compat`) and
  three for verl's own vLLM rollout and teacher on vLLM's CPU build
  (:mod:`tip_verl.cpu.vllm_cpu`).

See ``docs/cpu_mode.md``.
"""

import os

CPU_MODE_ENV = "TIP_VERL_CPU"

_active = False


def cpu_mode_requested() -> bool:
    """True when the environment asks for CPU mode (``TIP_VERL_CPU=1``)."""
    return os.environ.get(CPU_MODE_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def activate_if_requested() -> bool:
    """Check vLLM's CPU build, register the CPU platform and engines, install the shims, if CPU mode is asked for.

    Idempotent and cheap when CPU mode is off (GPU users see no change).
    Returns whether CPU mode is active in this process.
    """
    global _active
    if _active or not cpu_mode_requested():
        return _active
    from tip_verl.cpu import compat, registration, vllm_cpu

    vllm_cpu.check_installation()
    registration.register_platform()
    registration.register_engines()
    compat.apply()
    vllm_cpu.register_vllm_version()
    vllm_cpu.keep_linear_weights()
    vllm_cpu.drop_batch_invariant_kernels()
    _active = True
    return True
