"""CPU mode refuses Ulysses sequence parallelism when the tip_sync trainer starts (verl's composed config, no run)."""

import os
import re

import pytest
import verl
from hydra import compose, initialize_config_dir

from tip_verl.cpu import CPU_MODE_ENV
from tip_verl.verl_ext.trainer import TipSyncTrainer


def verl_config(*overrides):
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(
            config_name="ppo_trainer",
            overrides=["trainer.use_v1=true", "trainer.v1.trainer_mode=tip_sync", *overrides],
        )


@pytest.mark.parametrize(
    "override",
    [
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",  # the ref's defaults to it: the actor's is named
        "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=4",
        "actor_rollout_ref.ref.fsdp_config.ulysses_sequence_parallel_size=2",
        "critic.ulysses_sequence_parallel_size=2",
    ],
)
def test_cpu_mode_refuses_ulysses_naming_the_key_and_the_fix(override, monkeypatch):
    monkeypatch.setenv(CPU_MODE_ENV, "1")
    with pytest.raises(ValueError, match=rf"^{re.escape(override)}: Ulysses .* in CPU mode .* Set it to 1"):
        TipSyncTrainer(verl_config(override))


def test_cpu_mode_starts_without_ulysses(monkeypatch):
    monkeypatch.setenv(CPU_MODE_ENV, "1")
    TipSyncTrainer(verl_config())


def test_ulysses_outside_cpu_mode_is_untouched(monkeypatch):
    monkeypatch.delenv(CPU_MODE_ENV, raising=False)
    TipSyncTrainer(verl_config("actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"))
