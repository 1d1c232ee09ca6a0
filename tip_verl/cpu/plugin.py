"""Module form of CPU-mode activation, for ``VERL_USE_EXTERNAL_MODULES=tip_verl.cpu.plugin``.

verl imports the modules named there in every process that imports verl; this
one switches CPU mode on when ``TIP_VERL_CPU=1``, exactly like our
``verl.plugins`` entry point does once the package is installed.
"""

from tip_verl.cpu import activate_if_requested

activate_if_requested()
