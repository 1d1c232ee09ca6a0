"""A plain `import verl` in a fresh process registers our names through the `verl.plugins` entry point."""

import os
import subprocess
import sys

CHECK = """
import verl
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
print(get_adv_estimator_fn("tip_opd").__module__, TRAINER_REGISTRY["tip_sync"].__name__)
"""


def run_fresh_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_fresh_import_verl_registers_estimator_and_trainer():
    result = run_fresh_python(CHECK)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["tip_verl.verl_ext.estimator", "TipSyncTrainer"]


def test_disabling_verl_plugins_leaves_verl_untouched():
    result = run_fresh_python(CHECK, VERL_USE_EXTERNAL_PLUGINS="none")
    assert result.returncode != 0
    assert "tip_opd" in result.stderr
