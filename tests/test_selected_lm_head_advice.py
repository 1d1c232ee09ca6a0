"""What the `tip_sync` trainer tells a teacher_only run that would still build every token's logits."""

import pytest
from omegaconf import OmegaConf

from tip_verl.verl_ext import selected_lm_head
from tip_verl.verl_ext.selected_lm_head import selected_lm_head_advice, verl_is_patched


def config(strategy="fsdp", **model):
    settings = {"use_remove_padding": True, "use_fused_kernels": True, "fused_kernel_options": {"impl_backend": "torch"}}
    settings.update(model)
    return OmegaConf.create({"actor_rollout_ref": {"model": settings, "actor": {"strategy": strategy}}})


def test_installed_verl_is_not_patched():
    assert not verl_is_patched()  # the tests run against verl 0.9.1 as published


def test_unpatched_verl_is_named_with_the_patch():
    advice = selected_lm_head_advice(config())
    assert "patches/verl-0.9.1-tip-selected-logprobs.patch" in advice and "no memory saved" in advice
    assert "use_fused_kernels" not in advice


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"use_fused_kernels": False}, "actor_rollout_ref.model.use_fused_kernels=True"),
        ({"use_remove_padding": False}, "actor_rollout_ref.model.use_remove_padding=True"),
        ({"fused_kernel_options": {"impl_backend": "triton"}}, "fused_kernel_options.impl_backend=torch"),
        ({"strategy": "megatron"}, "actor_rollout_ref.actor.strategy=fsdp"),
    ],
)
def test_each_missing_setting_is_named(monkeypatch, changes, named):
    monkeypatch.setattr(selected_lm_head, "verl_is_patched", lambda: True)
    assert selected_lm_head_advice(config()) is None
    strategy = changes.pop("strategy", "fsdp2")
    advice = selected_lm_head_advice(config(strategy, **changes))
    assert named in advice and "patches/" not in advice
