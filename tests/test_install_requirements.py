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


def test_cpu_extra_pins_the_cpu_torch_build(setup_args):
    base, extras = setup_args
    (torch_pin,) = [req for req in extras["cpu"] if req.name == "torch"]
    assert [(spec.operator, spec.version) for spec in torch_pin.specifier] == [("==", "2.13.0")]
    assert Version("2.13.0") in base["torch"].specifier


def test_ci_runs_the_readmes_test_command_with_the_cpu_extra():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("pip install -e ") and "&&" in line]
    assert commands == ['pip install -e ".[cpu]" && tip-verl demo', 'pip install -e ".[cpu,test]" && python -m pytest']
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
