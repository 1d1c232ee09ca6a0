"""Entry point of group `verl.plugins`: verl imports it in every process that imports verl, Ray workers too.

With TIP_VERL_CPU=1 it first switches on the CPU mode (see docs/cpu_mode.md). Then it arranges for the
`tip_opd` advantage estimator, the `tip_*` distillation losses and the `tip_sync` V1 trainer to be
registered when verl imports the module holding each registry (see registration.py), so a process that
never builds a trainer does not pay for importing one. A failure warns on stderr with the fix.
"""

from tip_verl.verl_ext.registration import register_when_verl_imports, warn_not_registered

try:
    from tip_verl.cpu import activate_if_requested

    activate_if_requested()  # before verl's trainer and engines are imported: they read the device at import
except Exception as error:
    warn_not_registered("CPU mode (TIP_VERL_CPU=1)", error)

register_when_verl_imports()
