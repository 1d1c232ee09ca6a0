"""A plain `import verl` in a fresh process loads our `verl.plugins` entry point: light, and loud when it fails."""

import json
import os
import subprocess
import sys

REGISTERED = """
import json, sys
import verl
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY
trainer_imported_before_trainer_base = "tip_verl.verl_ext.trainer" in sys.modules
from verl.trainer.ppo.v1.trainer_base import get_trainer_cls
print(json.dumps({
    "tip_opd": ADV_ESTIMATOR_REGISTRY["tip_opd"].__module__,
    "losses": sorted(name for name in DISTILLATION_LOSS_REGISTRY if name.startswith("tip_")),
    "trainer_imported_before_trainer_base": trainer_imported_before_trainer_base,
    "tip_sync": get_trainer_cls("tip_sync").__name__,
}))
"""

MODULES_AFTER_IMPORT_VERL = """
import json, sys
import verl
print(json.dumps(sorted(sys.modules)))
"""

TIP_LOSSES = ["tip_abs", "tip_entropy_aware_topk", "tip_forward_kl_topk", "tip_k1", "tip_k2", "tip_k3", "tip_kl",
              "tip_low_var_kl", "tip_mse"]


def run_fresh_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )


def last_json_line(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fresh_import_verl_registers_estimator_losses_and_trainer_when_verl_imports_their_registries():
    found = last_json_line(run_fresh_python(REGISTERED))
    assert found["tip_opd"] == "tip_verl.verl_ext.estimator"
    assert found["losses"] == TIP_LOSSES
    assert found["trainer_imported_before_trainer_base"] is False
    assert found["tip_sync"] == "TipSyncTrainer"


def test_import_verl_loads_no_verl_module_that_verl_does_not_load_itself():
    with_plugin = set(last_json_line(run_fresh_python(MODULES_AFTER_IMPORT_VERL)))
    without_plugin = set(last_json_line(run_fresh_python(MODULES_AFTER_IMPORT_VERL, VERL_USE_EXTERNAL_PLUGINS="none")))
    added = with_plugin - without_plugin
    assert "tip_verl.verl_ext.plugin" in added
    assert not {m for m in added if m.startswith("verl.")}, sorted(added)
    assert not {"tip_verl.verl_ext.trainer", "tip_verl.verl_ext.estimator", "tip_verl.verl_ext.losses"} & added
    assert not {"verl.trainer.ppo.core_algos", "verl.trainer.ppo.v1", "verl.trainer.distillation.losses"} & added
    assert len(added) <= 10, sorted(added)  # tip_verl, its cpu switch, verl_ext and its registration module


def test_plugin_imported_after_verls_registries_registers_at_once():
    code = """
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
assert "tip_opd" not in ADV_ESTIMATOR_REGISTRY
import tip_verl.verl_ext.plugin
print("tip_opd" in ADV_ESTIMATOR_REGISTRY)
"""
    result = run_fresh_python(code, VERL_USE_EXTERNAL_PLUGINS="none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "True"


def test_a_registration_that_fails_warns_on_stderr_with_the_fix():
    code = """
import sys
sys.modules["tip_verl.verl_ext.trainer"] = None  # a broken install: importing our trainer module fails
import verl
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
print("tip_sync" in TRAINER_REGISTRY, "sync" in TRAINER_REGISTRY)
"""
    result = run_fresh_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["False", "True"]  # verl's own trainers are untouched
    assert "RuntimeWarning: tip-verl: registering the trainer mode tip_sync with verl" in result.stderr
    assert "reinstall tip-verl next to verl 0.9.1 on this node and run `tip-verl doctor`" in result.stderr


def test_cpu_mode_is_switched_on_by_import_verl():
    code = "import verl\nfrom verl.plugin.platform import get_platform\nprint(type(get_platform()).__name__)"
    result = run_fresh_python(code, TIP_VERL_CPU="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "PlatformCPU"


def test_disabling_verl_plugins_leaves_verl_untouched():
    result = run_fresh_python(REGISTERED, VERL_USE_EXTERNAL_PLUGINS="none")
    assert result.returncode != 0
    assert "tip_opd" in result.stderr


def test_doctor_passes_here_and_prints_the_registrations():
    result = subprocess.run(["tip-verl", "doctor"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for registered in ("advantage estimator tip_opd", "trainer mode tip_sync", "distillation losses tip_*: tip_abs"):
        assert any(line.split(None, 1)[-1].startswith(registered) and line.split()[0] == "ok" for line in lines), lines
    assert any(line.strip().startswith("verl 0.9.1, torch ") for line in lines), lines
    assert lines[-1] == "ready"


def test_doctor_fails_with_the_fix_when_verl_skips_the_plugin():
    result = subprocess.run(["tip-verl", "doctor"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none"})
    assert result.returncode == 1
    assert "FAIL  trainer mode tip_sync: not registered after `import verl`" in result.stdout
    assert "unset VERL_USE_EXTERNAL_PLUGINS or add tip_verl to it" in result.stdout


def test_doctor_tells_an_applied_a_missing_and_a_half_applied_selected_token_patch(tmp_path):
    from tip_verl.verl_ext.doctor import (
        SELECTED_LOGPROBS_PATCH,
        SELECTED_LOGPROBS_PATCH_MARKERS,
        check_selected_logprobs_patch,
    )
    from verl_patching import INSTALLED_VERL, apply_to_copy_of_installed_verl

    stock = check_selected_logprobs_patch(require=False, root=INSTALLED_VERL.parent)
    assert stock.status == "warn" and f"patch -p1 -d {INSTALLED_VERL.parent} < " in stock.detail
    assert check_selected_logprobs_patch(require=True, root=INSTALLED_VERL.parent).status == "FAIL"
    files = list(SELECTED_LOGPROBS_PATCH_MARKERS)
    apply_to_copy_of_installed_verl(SELECTED_LOGPROBS_PATCH, files, tmp_path)  # every file the patch changes
    assert check_selected_logprobs_patch(require=True, root=tmp_path).status == "ok"
    (tmp_path / files[0]).write_text((INSTALLED_VERL.parent / files[0]).read_text())
    half = check_selected_logprobs_patch(require=False, root=tmp_path)
    assert half.status == "FAIL" and "half applied" in half.detail
