"""One registry of distillation divergences for the demo loop and verl: each hand-written gradient (the fast path)
against autograd through the divergence's plain definition, a divergence registered from outside trained
through autograd, and verl's loss_mode names following from the registry."""

import pytest
import torch

from tip_verl.core.distill_losses import (
    DIVERGENCES,
    HAND_WRITTEN_GRADIENTS,
    autograd_divergence,
    divergence_names,
    full_vocabulary_divergence,
    register_divergence,
)
from tip_verl.local.loop import LoopConfig

B, T, H, HT, V = 3, 5, 6, 4, 11
TEMPERATURE = 0.7


def lm_heads(seed=0):
    """Student and teacher hidden states and LM heads in float64, with the selected positions."""
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    student_weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(B, T, HT, generator=g, dtype=torch.float64)
    teacher_weight = 2.0 * torch.randn(V, HT, generator=g, dtype=torch.float64)
    selected = torch.rand(B, T, generator=g) < 0.6
    return student_hidden, student_weight, teacher_hidden, teacher_weight, selected


def values_and_grads(divergence_of, seed=0):
    student_hidden, student_weight, teacher_hidden, teacher_weight, selected = lm_heads(seed)
    values = divergence_of(student_hidden, student_weight, teacher_hidden, teacher_weight, selected)
    g = torch.Generator().manual_seed(seed + 1)
    (values * torch.rand(values.shape, generator=g, dtype=values.dtype)).sum().backward()
    return values.detach(), student_hidden.grad, student_weight.grad


def dense(per_token):
    """per_token over every position's logits, built in full, read at the selected ones."""

    def divergence_of(student_hidden, student_weight, teacher_hidden, teacher_weight, selected):
        student_logits = student_hidden @ student_weight.t() / TEMPERATURE
        teacher_logits = teacher_hidden @ teacher_weight.t() / TEMPERATURE
        return per_token(student_logits.reshape(-1, V), teacher_logits.reshape(-1, V))[selected.reshape(-1)]

    return divergence_of


def through_autograd(per_token):
    def divergence_of(student_hidden, student_weight, teacher_hidden, teacher_weight, selected):
        return autograd_divergence(
            per_token, student_hidden[selected], student_weight, teacher_hidden[selected], teacher_weight,
            chunk_size=3, temperature=TEMPERATURE,
        )

    return divergence_of


def by_name(name):
    def divergence_of(*heads):
        return full_vocabulary_divergence(name, *heads, chunk_size=3, temperature=TEMPERATURE)

    return divergence_of


@pytest.mark.parametrize("name", HAND_WRITTEN_GRADIENTS)
def test_each_hand_written_gradient_equals_autograd_through_its_definition(name):
    assert DIVERGENCES[name].teacher == "logits"
    fast = values_and_grads(by_name(name))
    slow = values_and_grads(through_autograd(DIVERGENCES[name].per_token))
    for fast_part, slow_part in zip(fast, slow):
        torch.testing.assert_close(fast_part, slow_part, rtol=1e-10, atol=1e-12)


def test_chunked_autograd_equals_the_dense_definition():
    per_token = DIVERGENCES["jsd"].per_token
    for chunked, full in zip(values_and_grads(through_autograd(per_token)), values_and_grads(dense(per_token))):
        torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-14)


@pytest.fixture
def squared_hellinger():
    """A divergence registered from outside the package, with no hand-written gradient."""

    @register_divergence("squared_hellinger", teacher="logits")
    def squared_hellinger(student_logits, teacher_logits):
        half_log_s = 0.5 * torch.log_softmax(student_logits, dim=-1)
        half_log_t = 0.5 * torch.log_softmax(teacher_logits, dim=-1)
        return 1.0 - torch.logsumexp(half_log_s + half_log_t, dim=-1).exp()

    yield squared_hellinger
    del DIVERGENCES["squared_hellinger"]


def test_a_registered_divergence_trains_through_autograd(squared_hellinger):
    assert "squared_hellinger" in divergence_names("logits")
    assert "squared_hellinger" not in HAND_WRITTEN_GRADIENTS
    registered = values_and_grads(by_name("squared_hellinger"))
    for chunked, full in zip(registered, values_and_grads(dense(squared_hellinger))):
        torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-14)
    assert (registered[0] > 0).all()
    LoopConfig(loss="squared_hellinger")
    LoopConfig(tip_loss={"correct_loss": "squared_hellinger"})


def test_no_selected_token_gives_an_empty_result_in_the_graph(squared_hellinger):
    student_hidden, student_weight, teacher_hidden, teacher_weight, selected = lm_heads()
    none = torch.zeros_like(selected)
    for name in ("squared_hellinger", "reverse_kl"):
        values = full_vocabulary_divergence(
            name, student_hidden, student_weight, teacher_hidden, teacher_weight, none, chunk_size=3, temperature=1.0
        )
        assert values.shape == (0,) and values.requires_grad


def test_registry_refuses_a_taken_name_a_reserved_one_and_an_unknown_teacher_signal():
    with pytest.raises(ValueError, match="'jsd' is already registered or reserved"):
        register_divergence("jsd", teacher="logits")(lambda s, t: s)
    with pytest.raises(ValueError, match="'none' is already registered or reserved"):
        register_divergence("none", teacher="logits")(lambda s, t: s)
    with pytest.raises(ValueError, match="teacher='vocabulary'.*one of"):
        register_divergence("tv", teacher="vocabulary")
    with pytest.raises(ValueError, match="loss='k3'.*not a full-vocabulary divergence"):
        full_vocabulary_divergence("k3", *lm_heads(), chunk_size=3, temperature=1.0)
    with pytest.raises(ValueError, match="loss='k3'"):
        LoopConfig(loss="k3")


def test_verl_loss_modes_follow_from_the_registry():
    from verl.trainer.distillation.losses import get_distillation_loss_settings

    from tip_verl.verl_ext.losses import ENTROPY_AWARE_TOPK, ESTIMATOR_LOSSES, TOPK_LOSSES

    assert ESTIMATOR_LOSSES == tuple("tip_" + name for name in divergence_names("sampled_token"))
    assert TOPK_LOSSES == (*("tip_" + name for name in divergence_names("topk")), ENTROPY_AWARE_TOPK)
    assert {"tip_k3", "tip_low_var_kl", "tip_kl", "tip_forward_kl_topk"} <= set(ESTIMATOR_LOSSES + TOPK_LOSSES)
    for loss_mode in ESTIMATOR_LOSSES:
        assert get_distillation_loss_settings(loss_mode).use_estimator
    for loss_mode in TOPK_LOSSES:
        assert get_distillation_loss_settings(loss_mode).use_topk
