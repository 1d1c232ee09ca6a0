"""Entry point of group `verl.plugins`: verl imports it in every process that imports verl, Ray workers too.

Importing registers the `tip_opd` advantage estimator and the `tip_sync` V1 trainer.
"""

from tip_verl.verl_ext import estimator, trainer  # noqa: F401  (registration on import)
from tip_verl.verl_ext import losses  # noqa: F401,E402  (registers the tip_* distillation losses)
