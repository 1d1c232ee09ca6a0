"""Start-up refusals of loss-route settings verl's engines cannot run (tip_verl/verl_ext/checks.py).

Each refusal is checked on an example script composed against verl's own config (so the key it names exists
there), next to a setting that passes; the fused-kernel one also by what it prevents: verl's FSDP engine hands
the loss no top-k forward KL after a fused forward, and the top-k TIP loss then fails.
"""

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from test_examples_compose import REPO, compose_verl, script_arguments, validate
from test_megatron_layout import configs, micro_batch, world
from verl.utils import tensordict_utils as tu

from tip_verl.core.selection import rules_reading
from tip_verl.verl_ext.checks import DYNAMIC_CP_KEY, FUSED_KERNELS_KEY, check_loss_route_engine
from tip_verl.verl_ext.losses import compute_tip_topk_loss

LOSS_ROUTE_SCRIPT = REPO / "examples" / "run_qwen3_8b_to_1p7b_opd_soft_or.sh"
MEGATRON_SCRIPT = REPO / "examples" / "run_qwen3_8b_to_1p7b_hybrid_megatron.sh"
MEGATRON_LOSS_ROUTE = [  # the Megatron script's advantage route switched to the loss route (as the opd scripts)
    "algorithm.adv_estimator=grpo",
    "actor_rollout_ref.actor.calculate_entropy=true",
    "distillation.distillation_loss.loss_mode=tip_k3",
    "distillation.distillation_loss.use_task_rewards=false",
    "distillation.distillation_loss.loss_max_clamp=null",
]


def loss_route_config(monkeypatch, loss_mode: str, *overrides: str):
    monkeypatch.setenv("LOSS_MODE", loss_mode)
    return compose_verl([*script_arguments(LOSS_ROUTE_SCRIPT), *overrides])


@pytest.mark.parametrize("loss_mode", ["tip_forward_kl_topk", "tip_entropy_aware_topk"])
def test_topk_loss_with_fused_kernels_is_refused(monkeypatch, loss_mode):
    config = loss_route_config(monkeypatch, loss_mode, f"{FUSED_KERNELS_KEY}=true")
    with pytest.raises(ValueError, match=f"{FUSED_KERNELS_KEY}=false"):
        validate(config)


def test_sampled_token_loss_with_fused_kernels_passes(monkeypatch):
    validate(loss_route_config(monkeypatch, "tip_k3", f"{FUSED_KERNELS_KEY}=true"))


def test_veomni_computes_the_topk_loss_in_its_fused_kernel():
    config = {"actor_rollout_ref": {"actor": {"strategy": "veomni"}, "model": {"use_fused_kernels": True}}}
    check_loss_route_engine(config, "soft_or", "tip_forward_kl_topk", uses_topk=True)


def test_fused_forward_hands_the_loss_no_topk_kl():
    """What the refusal prevents: verl's FSDP engine after a fused forward (log-probs and entropy from the kernel)
    builds a model output without `distillation_losses`, and the top-k TIP loss cannot run on it."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    case = "topk_soft_or"
    data = micro_batch(case, world())
    tu.assign_non_tensor(
        data, use_remove_padding=True, use_fused_kernels=True, calculate_entropy=True, distillation_use_topk=True,
        distillation_only=True,
    )
    total = int(data["input_ids"].offsets()[-1])
    engine = SimpleNamespace(use_ulysses_sp=False)  # the engine state prepare_model_outputs reads on this path
    engine._gather_and_unpad_packed = partial(FSDPEngineWithLMHead._gather_and_unpad_packed, engine)
    kernel_output = SimpleNamespace(log_probs=torch.rand(1, total), entropy=torch.rand(1, total))
    output_args = {
        "input_ids_rmpad_rolled": torch.zeros(total, dtype=torch.long),
        "temperature_rmpad": torch.ones(total),
        "pad_size": 0,
        "temperature_is_one": True,
    }
    actor, distill = configs(case, "fsdp2")
    loss_fn = partial(compute_tip_topk_loss, actor, distill)
    model_output = FSDPEngineWithLMHead.prepare_model_outputs(engine, kernel_output, output_args, data, loss_fn)
    assert sorted(model_output) == ["entropy"], "distillation_only: no log-probs, and no top-k KL from the kernel"
    with pytest.raises(KeyError, match="distillation_losses"):
        compute_tip_topk_loss(actor, distill, model_output, data)


def megatron_loss_route_config(rule: str, dynamic_cp: bool):
    args = [*script_arguments(MEGATRON_SCRIPT), *MEGATRON_LOSS_ROUTE, f"algorithm.tip.rule={rule}"]
    if dynamic_cp:  # verl's McoreEngineConfig needs the per-rank token budget of its scheduler
        args += [f"{DYNAMIC_CP_KEY}=true", "actor_rollout_ref.actor.megatron.max_seqlen_per_dp_cp_rank=8192"]
    return compose_verl(args)


@pytest.mark.parametrize("rule", rules_reading("random"))
def test_random_rule_with_dynamic_context_parallel_is_refused(rule):
    with pytest.raises(ValueError, match=f"{DYNAMIC_CP_KEY}=false"):
        validate(megatron_loss_route_config(rule, dynamic_cp=True))


@pytest.mark.parametrize("rule, dynamic_cp", [("soft_or", True), ("random", False)])
def test_megatron_loss_route_passes_without_both(rule, dynamic_cp):
    validate(megatron_loss_route_config(rule, dynamic_cp))
