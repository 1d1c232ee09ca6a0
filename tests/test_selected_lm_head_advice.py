"""What the `tip_sync` trainer tells a teacher_only run that would still build every token's logits."""

import pytest
from omegaconf import OmegaConf

import tip_verl.verl_ext.plugin  # noqa: F401  (registers the tip_* losses the advice may look up)
from tip_verl.verl_ext import selected_lm_head
from tip_verl.verl_ext.selected_lm_head import selected_lm_head_advice, verl_is_patched


def config(strategy="fsdp", loss_mode="k3", **model):
    settings = {"use_remove_padding": True, "use_fused_kernels": True}
    settings.update({"fused_kernel_options": {"impl_backend": "torch"}}, **model)
    return OmegaConf.create(
        {
            "actor_rollout_ref": {"model": settings, "actor": {"strategy": strategy}},
            "distillation": {"enabled": True, "distillation_loss": {"loss_mode": loss_mode}},
        }
    )


def test_unpatched_verl_is_named_with_the_patch(monkeypatch):
    monkeypatch.setattr(selected_lm_head, "verl_is_patched", lambda: False)
    advice = selected_lm_head_advice(config())
    assert "patches/verl-0.9.1-tip-selected-logprobs.patch" in advice and "no memory saved" in advice
    assert "use_fused_kernels" not in advice


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"use_fused_kernels": False}, "actor_rollout_ref.model.use_fused_kernels=true"),
        ({"use_remove_padding": False}, "actor_rollout_ref.model.use_remove_padding=true"),
        ({"fused_kernel_options": {"impl_backend": "triton"}}, "fused_kernel_options.impl_backend=torch"),
        ({"strategy": "megatron"}, "actor_rollout_ref.actor.strategy=fsdp"),
        ({"loss_mode": "forward_kl_topk"}, "not the top-k forward_kl_topk"),
    ],
)
def test_each_missing_setting_is_named(monkeypatch, changes, named):
    monkeypatch.setattr(selected_lm_head, "verl_is_patched", lambda: True)
    assert selected_lm_head_advice(config()) is None
    assert selected_lm_head_advice(config(fused_kernel_options={"impl_backend": "liger"})) is None
    changes = dict(changes)
    strategy, loss_mode = changes.pop("strategy", "fsdp2"), changes.pop("loss_mode", "k3")
    advice = selected_lm_head_advice(config(strategy, loss_mode, **changes))
    assert named in advice and "patches/" not in advice


def test_verl_is_patched_reads_the_forward_signature(monkeypatch):
    from verl.models.transformers import dense_common

    assert verl_is_patched() == ("tip_selected" in dense_common.forward_with_torch_backend.__code__.co_varnames)

    def patched(self, input_ids=None, tip_selected=None, **loss_kwargs):
        return None

    monkeypatch.setattr(dense_common, "forward_with_torch_backend", patched)
    assert verl_is_patched()
