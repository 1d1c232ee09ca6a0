"""`tip-verl doctor`: the preflight to run on every node before a tip-verl run.

It looks at this node the way verl's own processes will: the versions of verl and its stack, whether a
plain `import verl` (through the `verl.plugins` entry point, as in every Ray worker) gives verl's
registries our names, and whether the selected-token patch is applied to this node's verl.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tip_verl.verl_ext.registration import FIX

VERL_VERSION = "0.9.1"
PLUGIN_NAME = "tip_verl"
PLUGIN_MODULE = "tip_verl.verl_ext.plugin"
REPORTED_DISTRIBUTIONS = ("verl", "torch", "transformers", "ray", "vllm", "sglang", "megatron-core", "tip-verl")
OPTIONAL_DISTRIBUTIONS = ("vllm", "sglang", "megatron-core")
PROBE_PREFIX = "tip-verl-doctor-probe: "
SELECTED_LOGPROBS_PATCH = "verl-0.9.1-tip-selected-logprobs.patch"
# One line the patch adds to each file it changes: all present = applied, some = a half-applied patch.
SELECTED_LOGPROBS_PATCH_MARKERS = {
    "verl/workers/utils/padding.py": "def padding_2_no_padding_response(",
    "verl/models/transformers/dense_common.py": "tip_selected: Optional[torch.BoolTensor] = None,",
    "verl/workers/engine/fsdp/transformer_impl.py": 'if use_fused_kernels and "tip_selected" in micro_batch.keys():',
}


@dataclass
class Check:
    status: str  # "ok", "warn" or "FAIL"
    what: str
    detail: str = ""


def installed_versions() -> dict[str, str]:
    """{distribution: version}; optional engines only when installed."""
    versions = {}
    for name in REPORTED_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name not in OPTIONAL_DISTRIBUTIONS:
                versions[name] = "not installed"
    return versions


def check_verl_version(version: str) -> Check:
    if version == VERL_VERSION:
        return Check("ok", f"verl {version}")
    return Check("FAIL", f"verl {version}", f'tip-verl is built on verl {VERL_VERSION}: pip install "verl=={VERL_VERSION}"')


def check_plugin_loading() -> Check:
    """Whether verl will import our entry point (or the module named in VERL_USE_EXTERNAL_MODULES)."""
    policy = os.getenv("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    modules = {m.strip() for m in os.getenv("VERL_USE_EXTERNAL_MODULES", "").split(",")}
    installed = any(ep.name == PLUGIN_NAME for ep in importlib.metadata.entry_points(group="verl.plugins"))
    allowed = policy == "auto" or (policy != "none" and PLUGIN_NAME in {p.strip() for p in policy.split(",")})
    what = f"verl.plugins entry point {PLUGIN_NAME} (VERL_USE_EXTERNAL_PLUGINS={policy})"
    if PLUGIN_MODULE in modules:
        return Check("ok", f"VERL_USE_EXTERNAL_MODULES loads {PLUGIN_MODULE}")
    if not installed:
        return Check("FAIL", what, f"not installed in this Python: {FIX}")
    if not allowed:
        return Check("FAIL", what, f"verl skips it: unset VERL_USE_EXTERNAL_PLUGINS or add {PLUGIN_NAME} to it")
    return Check("ok", what)


def probe_registries() -> None:
    """In a fresh process: import verl and its registries as the trainer does; print what holds our names."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import verl  # noqa: F401  (loads the verl.plugins entry points)
        from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY
        from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
        from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY  # what main_ppo's get_trainer_cls reads
    found = {
        "tip_opd": "tip_opd" in ADV_ESTIMATOR_REGISTRY,
        "tip_sync": "tip_sync" in TRAINER_REGISTRY,
        "losses": sorted(name for name in DISTILLATION_LOSS_REGISTRY if name.startswith("tip_")),
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("tip-verl:")],
    }
    print(PROBE_PREFIX + json.dumps(found))


def check_registrations() -> list[Check]:
    """Our names in verl's registries as a fresh process sees them (this one may have imported our modules)."""
    probe = subprocess.run(
        [sys.executable, "-c", f"from {__name__} import probe_registries; probe_registries()"],
        capture_output=True, text=True,
    )
    lines = [line for line in probe.stdout.splitlines() if line.startswith(PROBE_PREFIX)]
    if probe.returncode != 0 or not lines:
        return [Check("FAIL", "import verl and its registries", f"{probe.stderr.strip()[-2000:]}; {FIX}")]
    found = json.loads(lines[-1][len(PROBE_PREFIX):])
    why = " ".join(found["warnings"]) or FIX
    try:
        from tip_verl.verl_ext.losses import ESTIMATOR_LOSSES, TOPK_LOSSES

        missing_losses = [name for name in ESTIMATOR_LOSSES + TOPK_LOSSES if name not in found["losses"]]
    except Exception as error:  # the import the plugin's registration needs
        missing_losses, why = ["tip_*"], f"{why} (importing tip_verl.verl_ext.losses: {error!r})"

    def registered(what: str, ok: bool, detail: str = "") -> Check:
        return Check("ok", what, detail) if ok else Check("FAIL", what, f"not registered after `import verl`: {why}")

    return [
        registered("advantage estimator tip_opd", found["tip_opd"]),
        registered("trainer mode tip_sync", found["tip_sync"]),
        registered("distillation losses tip_*", not missing_losses, ", ".join(found["losses"])),
    ]


def installed_verl_root() -> Path:
    """The directory holding the installed `verl` package (where the patch applies with -p1)."""
    return Path(importlib.util.find_spec("verl").submodule_search_locations[0]).parent


def selected_logprobs_patch_files(root: Path) -> list[str]:
    """The files under `root` that carry the selected-token patch's change."""
    return [
        relative
        for relative, marker in SELECTED_LOGPROBS_PATCH_MARKERS.items()
        if marker in (root / relative).read_text(encoding="utf-8")
    ]


def check_selected_logprobs_patch(require: bool, root: Optional[Path] = None) -> Check:
    root = root or installed_verl_root()
    source_tree_patch = Path(__file__).resolve().parents[2] / "patches" / SELECTED_LOGPROBS_PATCH
    patch_file = source_tree_patch if source_tree_patch.exists() else f"patches/{SELECTED_LOGPROBS_PATCH} (tip-verl source tree)"
    apply = f"patch -p1 -d {root} < {patch_file}"
    patched = selected_logprobs_patch_files(root)
    what = f"selected-token patch {SELECTED_LOGPROBS_PATCH} on {root / 'verl'}"
    if len(patched) == len(SELECTED_LOGPROBS_PATCH_MARKERS):
        return Check("ok", what, "applied")
    if patched:
        return Check(
            "FAIL", what, f"half applied (only {', '.join(patched)}): "
            f'pip install --force-reinstall --no-deps "verl=={VERL_VERSION}", then {apply}'
        )
    return Check(
        "FAIL" if require else "warn", what,
        "not applied: mix=teacher_only / preselect=true then build every token's logits (docs/memory.md); "
        f"to apply: {apply}",
    )


def run_doctor(require_patch: bool = False) -> int:
    """Print the checks; 0 when nothing FAILs, else 1."""
    versions = installed_versions()
    print(f"tip-verl doctor on {socket.gethostname()}")
    print("  " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    checks = [check_verl_version(versions["verl"])]
    if versions["verl"] != "not installed":
        checks += [check_plugin_loading(), *check_registrations(), check_selected_logprobs_patch(require_patch)]
    for check in checks:
        print(f"  {check.status:<4}  {check.what}" + (f": {check.detail}" if check.detail else ""))
    failed = [check for check in checks if check.status == "FAIL"]
    print(f"{len(failed)} problem(s): fix them before training on this node." if failed else "ready")
    return 1 if failed else 0
