"""Chunked full-vocabulary student/teacher divergence at selected tokens vs. the naive full computation
masked to the same tokens, a hand-computed 3-token case, float64 gradcheck, and the exact per-position KL."""

import math

import pytest
import torch
import torch.nn.functional as F
from tensor_sizes import LargestTensor

from tip_verl.core.selected_divergence import (
    DIVERGENCE_LOSS_NAMES,
    exact_token_kl,
    selected_token_divergence,
)

B, T, H, HT, V = 3, 7, 16, 24, 37


def _inputs(dtype=torch.float64, seed=0, ratio=0.6, bias=True):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    student = {
        "hidden": randn(B, T, H).requires_grad_(),
        "weight": randn(V, H, scale=H**-0.5 * 2).requires_grad_(),
        "bias": randn(V, scale=0.3).requires_grad_() if bias else None,
    }
    teacher = {
        "hidden": randn(B, T, HT),
        "weight": randn(V, HT, scale=HT**-0.5 * 2),
        "bias": randn(V) if bias else None,
    }
    selected = torch.rand(B, T, generator=g) < ratio
    upstream = torch.rand(int(selected.sum()), generator=g, dtype=torch.float64).to(dtype)  # per-token loss weights
    return student, teacher, selected, upstream


def _logits(model, temperature):
    z = model["hidden"] @ model["weight"].t()
    if model["bias"] is not None:
        z = z + model["bias"]
    return z / temperature


def _naive(student, teacher, selected, loss, temperature=1.0):
    """Reference: (B, T, V) logits for both models, log_softmax, the divergence at every position, masked select.
    The KLs go through torch's F.kl_div, the JSD through the mixture in probability space."""
    log_s = torch.log_softmax(_logits(student, temperature), dim=-1)
    log_t = torch.log_softmax(_logits(teacher, temperature), dim=-1)
    if loss == "reverse_kl":
        per_pos = F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)
    elif loss == "forward_kl":
        per_pos = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.log((log_s.exp() + log_t.exp()) / 2)
        kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
        kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
        per_pos = 0.5 * kl_s + 0.5 * kl_t
    return per_pos[selected]


def _chunked(student, teacher, selected, loss, chunk_size, temperature=1.0, vocab_chunk_size=None):
    return selected_token_divergence(
        student["hidden"], student["weight"], teacher["hidden"], teacher["weight"], selected,
        loss=loss, student_bias=student["bias"], teacher_bias=teacher["bias"],
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, temperature=temperature,
    )


def _grads(student, value, upstream):
    params = [p for p in student.values() if p is not None]
    return torch.autograd.grad((value * upstream).sum(), params)


@pytest.mark.parametrize("loss", DIVERGENCE_LOSS_NAMES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_values_and_gradients_equal_the_naive_masked_computation(loss, dtype, tol):
    student, teacher, selected, upstream = _inputs(dtype)
    n = int(selected.sum())
    assert 0 < n < B * T
    naive = _naive(student, teacher, selected, loss, temperature=0.8)
    naive_grads = _grads(student, naive, upstream)
    for chunk_size in (1, 4, n, n + 5):
        value = _chunked(student, teacher, selected, loss, chunk_size, temperature=0.8)
        assert value.shape == (n,) and value.dtype == dtype
        torch.testing.assert_close(value, naive, rtol=tol, atol=tol)
        for got, want in zip(_grads(student, value, upstream), naive_grads):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("loss", DIVERGENCE_LOSS_NAMES)
def test_gradcheck_float64(loss):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(5, 6, generator=g, dtype=torch.float64)
    selected = torch.tensor([[True, False, True], [True, True, False]])

    def fn(h, w, b):
        return selected_token_divergence(
            h, w, teacher_hidden, teacher_weight, selected, loss=loss, student_bias=b, chunk_size=2, temperature=0.7
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_hand_computed_three_token_vocabulary():
    # identity heads, hidden = log-probs: pS = [.5, .25, .25], pT = [.8, .1, .1]
    p_s = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    p_t = torch.tensor([0.8, 0.1, 0.1], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    teacher_hidden = p_t.log().view(1, 1, 3)
    selected = torch.ones(1, 1, dtype=torch.bool)
    # KL(pS||pT) = .5 ln(.5/.8) + .5 ln(.25/.1) = .5 ln(25/16) = ln 1.25
    # KL(pT||pS) = .8 ln 1.6 + .2 ln .4
    # M = [.65, .175, .175]: KL(pS||M) = .5 ln(.5/.65) + .5 ln(.25/.175); KL(pT||M) = .8 ln(.8/.65) + .2 ln(.1/.175)
    expected = {
        "reverse_kl": (math.log(1.25), 0.2231436),
        "forward_kl": (0.8 * math.log(1.6) + 0.2 * math.log(0.4), 0.1927448),
        "jsd": (
            0.5 * (0.5 * math.log(0.5 / 0.65) + 0.5 * math.log(0.25 / 0.175))
            + 0.5 * (0.8 * math.log(0.8 / 0.65) + 0.2 * math.log(0.1 / 0.175)),
            0.0506718,
        ),
    }
    # d/dz of KL(pS||pT) = pS (log pS/pT - KL) = [.5 (ln .625 - ln 1.25), .25 (ln 2.5 - ln 1.25), ...]
    #                   = ln 2 [-.5, .25, .25]
    # d/dz of KL(pT||pS) = pS - pT = [-.3, .15, .15]
    expected_grad = {
        "reverse_kl": [-0.5 * math.log(2), 0.25 * math.log(2), 0.25 * math.log(2)],
        "forward_kl": [-0.3, 0.15, 0.15],
    }
    for loss, (closed_form, decimal) in expected.items():
        assert closed_form == pytest.approx(decimal, abs=1e-7)
        hidden = p_s.log().view(1, 1, 3).requires_grad_()
        value = selected_token_divergence(hidden, eye, teacher_hidden, eye, selected, loss=loss)
        assert value.item() == pytest.approx(closed_form, abs=1e-12)
        if loss in expected_grad:
            (grad,) = torch.autograd.grad(value.sum(), hidden)
            torch.testing.assert_close(grad.view(3), torch.tensor(expected_grad[loss], dtype=torch.float64))
    kl, entropy = exact_token_kl(p_s.log().view(1, 1, 3), eye, teacher_hidden, eye, selected)
    assert kl.item() == pytest.approx(math.log(1.25), abs=1e-12)
    assert entropy.item() == pytest.approx(1.5 * math.log(2), abs=1e-12)  # .5 ln 2 + 2 * .25 ln 4


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_exact_token_kl_equals_a_per_position_loop(chunk_size):
    student, teacher, mask, _ = _inputs(torch.float32, seed=5)
    kl, entropy = exact_token_kl(
        student["hidden"], student["weight"], teacher["hidden"], teacher["weight"], mask,
        student_bias=student["bias"], teacher_bias=teacher["bias"], chunk_size=chunk_size, temperature=1.5,
    )
    assert kl.shape == entropy.shape == (B, T) and not kl.requires_grad
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                assert kl[b, t] == 0 and entropy[b, t] == 0
                continue
            z_s = (student["weight"] @ student["hidden"][b, t] + student["bias"]).double().tolist()
            z_t = (teacher["weight"] @ teacher["hidden"][b, t] + teacher["bias"]).double().tolist()
            norm_s = sum(math.exp(z / 1.5) for z in z_s)
            norm_t = sum(math.exp(z / 1.5) for z in z_t)
            want_kl = want_ent = 0.0
            for zs, zt in zip(z_s, z_t):
                ps, pt = math.exp(zs / 1.5) / norm_s, math.exp(zt / 1.5) / norm_t
                want_kl += ps * math.log(ps / pt)
                want_ent -= ps * math.log(ps)
            assert kl[b, t].item() == pytest.approx(want_kl, rel=1e-4, abs=1e-6)
            assert entropy[b, t].item() == pytest.approx(want_ent, rel=1e-5)


@pytest.mark.parametrize("loss", DIVERGENCE_LOSS_NAMES)
def test_no_tensor_larger_than_a_chunk_of_the_vocabulary_is_built(loss):
    # small hidden sizes, so that a (N, V) tensor of the selected tokens is larger than every legitimate buffer
    b, t, h, ht, chunk_size = 3, 50, 4, 6, 4
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    weight = torch.randn(V, h, generator=g, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(b, t, ht, generator=g), torch.randn(V, ht, generator=g)
    selected = torch.rand(b, t, generator=g) < 0.5
    bound = max(chunk_size * V, V * ht, b * t * ht)  # a chunk of logits, a head, the hidden states
    assert bound < int(selected.sum()) * V < b * t * V
    with LargestTensor() as mode:
        div = selected_token_divergence(
            hidden, weight, teacher_hidden, teacher_weight, selected, loss=loss, chunk_size=chunk_size
        )
        div.sum().backward()
        exact_token_kl(hidden, weight, teacher_hidden, teacher_weight, selected, chunk_size=chunk_size)
    assert mode.largest <= bound
    with LargestTensor() as naive_mode:  # the check does see the naive route's (B, T, V) logits
        student = {"hidden": hidden, "weight": weight, "bias": None}
        _naive(student, {"hidden": teacher_hidden, "weight": teacher_weight, "bias": None}, selected, loss)
    assert naive_mode.largest >= b * t * V


def test_zero_selected_tokens_give_an_empty_result_in_the_graph():
    student, teacher, _, _ = _inputs()
    value = _chunked(student, teacher, torch.zeros(B, T, dtype=torch.bool), "jsd", chunk_size=4)
    assert value.shape == (0,) and value.requires_grad
    value.sum().backward()
    assert torch.count_nonzero(student["hidden"].grad) == 0 and torch.count_nonzero(student["weight"].grad) == 0


def test_no_gradient_reaches_the_teacher():
    student, teacher, selected, _ = _inputs()
    for v in teacher.values():
        v.requires_grad_()
    _chunked(student, teacher, selected, "reverse_kl", chunk_size=4).sum().backward()
    assert all(v.grad is None for v in teacher.values())
    assert student["weight"].grad is not None


# several chunks of 4 tokens: the bf16 head gradient is summed in float32 over vocabulary blocks of
# 1 row, the default (4 * V // H = 9 rows) and the whole vocabulary
@pytest.mark.parametrize("loss", DIVERGENCE_LOSS_NAMES)
@pytest.mark.parametrize("vocab_chunk_size", [1, None, V])
def test_bf16_heads_match_float64_within_bf16_rounding(loss, vocab_chunk_size):
    student64, teacher, selected, upstream = _inputs(torch.float64)
    student16 = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in student64.items()}
    teacher16 = {k: v.to(torch.bfloat16) for k, v in teacher.items()}
    with LargestTensor() as sizes:
        value = _chunked(student16, teacher16, selected, loss, chunk_size=4, vocab_chunk_size=vocab_chunk_size)
        got = _grads(student16, value, upstream.float())
    assert value.dtype == torch.float32
    rows = vocab_chunk_size or 4 * V // H
    # float32 buffers: a chunk's logits (4, V), a block of the head-gradient sum (rows, H), the (N, H)
    # sum of the hidden states' gradient; a whole (V, H) float32 sum only where one block is the vocabulary
    assert sizes.by_dtype[torch.float32] <= max(4 * V, rows * H, int(selected.sum()) * H)
    rounded = {k: v.detach().to(torch.bfloat16).double().requires_grad_() for k, v in student64.items()}
    teacher_rounded = {k: v.double() for k, v in teacher16.items()}
    naive = _naive(rounded, teacher_rounded, selected, loss)
    torch.testing.assert_close(value.double(), naive, rtol=0.05, atol=0.02)
    for g16, want in zip(got, _grads(rounded, naive, upstream)):
        assert g16.dtype == torch.bfloat16
        torch.testing.assert_close(g16.double(), want, rtol=0.05, atol=0.02)


def test_bad_input_raises_with_the_setting_to_fix():
    student, teacher, selected, _ = _inputs()
    h, w, th, tw = student["hidden"], student["weight"], teacher["hidden"], teacher["weight"]
    with pytest.raises(ValueError, match="--loss.*`loss`"):
        _chunked(student, teacher, selected, "kl", chunk_size=4)
    with pytest.raises(ValueError, match="share the vocabulary"):
        selected_token_divergence(h, w, th, tw[:-1], selected)
    with pytest.raises(ValueError, match="same positions"):
        selected_token_divergence(h, w, th[:, :-1], tw, selected)
    with pytest.raises(ValueError, match="bool"):
        selected_token_divergence(h, w, th, tw, selected.long())
    with pytest.raises(ValueError, match="chunk_size"):
        _chunked(student, teacher, selected, "jsd", chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        _chunked(student, teacher, selected, "jsd", chunk_size=4, temperature=0.0)
    with pytest.raises(ValueError, match="teacher_weight"):
        exact_token_kl(h, w, th, tw[:, :-1], selected)
