"""Every examples/run_*.sh composes against verl 0.9.1's own hydra config and passes verl's and our checks.

Each script runs under bash with a stub `python3` on PATH that records its arguments, so the overrides are
exactly what the script would hand to `python3 -m verl.trainer.main_ppo` (arrays, defaults, arithmetic
expanded by bash). They are composed with verl's `trainer/config` (ppo_trainer, or the config the script names
with --config-name), then checked by verl's `validate_config`, verl's DistillationConfig, the registries, and
our TipConfig / TipLossConfig. `algorithm_overrides` / `algorithm_summary` extract a script's algorithm
settings for a CPU run of the same algorithm.
"""

import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "examples").glob("run_*.sh") if not p.name.endswith("_cpu.sh"))  # GPU scripts
VERL_CONFIG_DIR = Path(importlib.util.find_spec("verl").submodule_search_locations[0]) / "trainer" / "config"
ALGORITHM_PREFIXES = (
    "algorithm.",
    "+algorithm.",
    "distillation.distillation_loss.",
    "actor_rollout_ref.actor.calculate_entropy=",
    "actor_rollout_ref.actor.loss_agg_mode=",
    "trainer.use_v1=",
    "trainer.v1.trainer_mode=",
)


def script_arguments(script: Path) -> list[str]:
    """The arguments `script` passes to `python3 -m verl.trainer.main_ppo`, as bash expands them."""
    with tempfile.TemporaryDirectory() as tmp:
        stub, record = Path(tmp) / "python3", Path(tmp) / "args"
        stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "$TIP_ARGS_RECORD"\n')
        stub.chmod(0o755)
        env = {**os.environ, "PATH": f"{tmp}{os.pathsep}{os.environ['PATH']}", "TIP_ARGS_RECORD": str(record)}
        subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, timeout=30)
        args = [a.decode() for a in record.read_bytes().split(b"\0")[:-1]]
    assert args[:2] == ["-m", "verl.trainer.main_ppo"], f"{script.name} must launch python3 -m verl.trainer.main_ppo"
    return args[2:]


def split_config_name(args: list[str]) -> tuple[str, list[str]]:
    """(verl config name, hydra overrides) from main_ppo's arguments."""
    names = [a.split("=", 1)[1] for a in args if a.startswith("--config-name=")]
    return (names[-1] if names else "ppo_trainer"), [a for a in args if not a.startswith("--")]


def compose_verl(args: list[str]):
    config_name, overrides = split_config_name(args)
    with initialize_config_dir(config_dir=str(VERL_CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def validate(config) -> None:
    """verl's own checks of a composed config (as main_ppo and the trainer run them), then ours."""
    from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    import tip_verl.verl_ext.plugin  # noqa: F401  (registers tip_opd, tip_sync and the tip_* losses)
    from tip_verl.verl_ext.checks import check_startup

    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    assert config.algorithm.adv_estimator in ADV_ESTIMATOR_REGISTRY, config.algorithm.adv_estimator
    if config.distillation.enabled:
        loss_mode = config.distillation.distillation_loss.loss_mode
        assert loss_mode in DISTILLATION_LOSS_REGISTRY, f"distillation loss_mode {loss_mode} is not registered"
        omega_conf_to_dataclass(config.distillation)
    check_startup(config)


def algorithm_overrides(args: list[str]) -> list[str]:
    """The script's algorithm settings as hydra overrides, to append to a CPU run of the same algorithm."""
    return [a for a in split_config_name(args)[1] if a.startswith(ALGORITHM_PREFIXES)]


def algorithm_summary(config) -> dict:
    """Rule, ratio, mix, route (advantage | loss), loss_mode and schedule of a composed config."""
    from tip_verl.verl_ext.losses import TIP_PREFIX, check_loss_route

    tip, tip_loss = check_loss_route(config)
    loss_mode = config.distillation.distillation_loss.loss_mode if config.distillation.enabled else None
    on_loss_route = bool(loss_mode and loss_mode.startswith(TIP_PREFIX))
    return {
        "route": "loss" if on_loss_route else "advantage" if config.algorithm.adv_estimator == "tip_opd" else None,
        "rule": tip.rule,
        "ratio": tip.ratio,
        "mix": tip.mix if config.algorithm.adv_estimator == "tip_opd" else None,
        "loss_mode": loss_mode,
        "schedule": tip_loss.schedule,
    }


EXPECTED = {
    "run_qwen3_8b_to_1p7b_hybrid_fsdp.sh": ("advantage", "soft_or", 0.5),
    "run_qwen3_8b_to_1p7b_hybrid_megatron.sh": ("advantage", "soft_or", 0.5),
    "run_qwen3_8b_to_1p7b_hybrid_multinode.sh": ("advantage", "soft_or", 0.5),
    "run_qwen3_8b_to_1p7b_opd_soft_or.sh": ("loss", "soft_or", 0.5),
    "run_qwen3_8b_to_1p7b_opd_q3_10pct.sh": ("loss", "q3", 0.1),
    "run_qwen3_8b_to_1p7b_opd_selected_head.sh": ("advantage", "soft_or", 0.5),
}


def test_every_example_is_listed():
    assert sorted(p.name for p in SCRIPTS) == sorted(EXPECTED)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_composes_and_validates(script):
    args = script_arguments(script)
    config = compose_verl(args)
    validate(config)
    summary = algorithm_summary(config)
    assert (summary["route"], summary["rule"], summary["ratio"]) == EXPECTED[script.name]
    assert config.trainer.v1.trainer_mode == "tip_sync" and config.trainer.use_v1
    assert all(a in args for a in algorithm_overrides(args))
    if "megatron" in script.name:
        assert config.actor_rollout_ref.actor.strategy == "megatron"
        assert config.actor_rollout_ref.actor.megatron.tensor_model_parallel_size == 2


def test_selected_head_script_sets_everything_but_the_patch(monkeypatch):
    from tip_verl.verl_ext import selected_lm_head
    from tip_verl.verl_ext.checks import updates_selected_only

    config = compose_verl(script_arguments(REPO / "examples" / "run_qwen3_8b_to_1p7b_opd_selected_head.sh"))
    assert updates_selected_only(config)
    monkeypatch.setattr(selected_lm_head, "verl_is_patched", lambda: False)
    advice = selected_lm_head.selected_lm_head_advice(config)  # only the patch is missing
    assert "patches/verl-0.9.1-tip-selected-logprobs.patch" in advice and "actor_rollout_ref" not in advice
    monkeypatch.setattr(selected_lm_head, "verl_is_patched", lambda: True)
    assert selected_lm_head.selected_lm_head_advice(config) is None


BROKEN = [
    # (text in the FSDP hybrid script or the file it sources, its replacement, the error it must cause, words of
    # its message)
    ("ppo_mini_batch_size=", "ppo_mini_batch_sise=", ConfigCompositionException, "ppo_mini_batch_sise"),
    ("actor.use_kl_loss=false", "actor.use_kl_los=false", ConfigCompositionException, "use_kl_los"),
    ("actor_rollout_ref.actor.use_kl_loss=", "+actor_rollout_ref.actor.use_kl_los=", InstantiationException, "use_kl_los"),
    ("+algorithm.tip.ratio=", "+algorithm.tip.ration=", ValueError, "Unknown key.*ration"),
    ("+algorithm.tip.mix=${TIP_MIX}", "+algorithm.tip.mix=swap", ValueError, "mix='swap'"),
    ("+algorithm.tip.ratio=${TIP_RATIO}", "+algorithm.tip.ratio=1.5", ValueError, "ratio=1.5"),
    ("distillation_loss.loss_mode=k3", "distillation_loss.loss_mode=tip_k4", AssertionError, "tip_k4 is not registered"),
]


@pytest.mark.parametrize("old, new, error, match", BROKEN, ids=[b[1] for b in BROKEN])
def test_a_broken_script_fails(tmp_path, old, new, error, match):
    script = "run_qwen3_8b_to_1p7b_hybrid_fsdp.sh"
    sources = {path.name: path.read_text() for path in (REPO / "examples").glob("*.sh")}
    holders = [name for name in (script, "common_qwen3_8b_to_1p7b.sh") if old in sources[name]]
    assert len(holders) == 1, f"{old!r} must stand once in the script or the file it sources: {holders}"
    sources[holders[0]] = sources[holders[0]].replace(old, new)
    for name, text in sources.items():  # a copy of examples/, so the script sources the broken file
        (tmp_path / name).write_text(text)
    with pytest.raises(error, match=match):
        validate(compose_verl(script_arguments(tmp_path / script)))


def test_multinode_script_passes_the_run_env_to_its_workers_and_keeps_token_auth(monkeypatch):
    """Ray workers of a running cluster do not inherit the launching shell: the scripts hand them the file
    logger's path (and the names in RAY_ENV_VARS) through the job's runtime_env, as strings, leave num_cpus and
    num_gpus null (Ray refuses them when joining), and refuse to run several nodes without token authentication."""
    from ray.runtime_env import RuntimeEnv

    script = REPO / "examples" / "run_qwen3_8b_to_1p7b_hybrid_multinode.sh"
    passed = {"VERL_FILE_LOGGER_PATH": "/shared/run 1/metrics.jsonl", "WANDB_MODE": "offline", "TIP_TEST_NUMBER": "1"}
    for name, value in passed.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_ENV_VARS", "WANDB_MODE TIP_TEST_NUMBER")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    config = compose_verl(script_arguments(script))
    ray_init = config.ray_kwargs.ray_init
    env_vars = dict(ray_init.runtime_env.env_vars)
    assert env_vars == passed
    RuntimeEnv(env_vars=env_vars)  # Ray's own check: names and values must be strings
    assert ray_init.num_cpus is None and ray_init.get("num_gpus") is None
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(subprocess.CalledProcessError) as refused:
        script_arguments(script)
    assert b"RAY_AUTH_MODE=token" in refused.value.stderr
