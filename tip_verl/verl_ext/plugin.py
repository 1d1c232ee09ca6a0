"""Entry point of group `verl.plugins`: verl imports it in every process that imports verl, Ray workers too.

Importing registers the `tip_opd` advantage estimator, the `tip_sync` V1 trainer and the `tip_*`
distillation losses; with TIP_VERL_CPU=1 it first switches on the CPU mode (see docs/cpu_mode.md).
"""

from tip_verl.cpu import activate_if_requested

activate_if_requested()  # before verl's trainer and engines are imported: they read the device at import

from tip_verl.verl_ext import estimator, losses, trainer  # noqa: E402,F401  (registration on import)
