"""Full-vocabulary divergences between student and teacher at selected token positions only.

The paper's loss route backpropagates a divergence between the student's and the teacher's
next-token distributions, over the whole vocabulary, on the tokens TIP keeps. Built naively that
is two (B, T, V) logits tensors, two log-softmaxes of the same size kept by autograd and a
(B, T, V) gradient, also for the dropped tokens.

:func:`selected_token_divergence` gathers the student's and the teacher's hidden states at the
selected positions and applies both LM heads, the log-softmaxes and the divergence in chunks of
``chunk_size`` selected tokens. It keeps for backward only the selected hidden states and three
floats per selected token; the backward recomputes each chunk's logits and forms the gradient of
the divergence w.r.t. the student's logits analytically. Peak memory is O(chunk_size x V) plus
O(N x H) for the N selected tokens, in both passes.

:func:`exact_token_kl` is the no-grad companion for the selection rules: the exact per-position
KL(pS || pT) over the vocabulary (the paper's d_t) and the student's entropy, from one chunked
pass over the valid positions.

Divergences, per position, with pS = softmax(student logits / temperature), pT the same for the
teacher (as TRL's GKD, the temperature divides both):

    reverse_kl  KL(pS || pT) = sum_v pS_v (log pS_v - log pT_v)    (mode seeking)
    forward_kl  KL(pT || pS) = sum_v pT_v (log pT_v - log pS_v)    (mass covering)
    jsd         0.5 KL(pS || M) + 0.5 KL(pT || M),  M = (pS + pT) / 2

``jsd`` is the generalized Jensen-Shannon divergence of TRL's GKD (``generalized_jsd_loss``) at
its default beta = 0.5, where it is the symmetric JSD (bounded by log 2).

Gradients of each divergence w.r.t. the student's (tempered) logits z, used by the backward:

    reverse_kl  pS * (log pS - log pT - KL(pS || pT))
    forward_kl  pS - pT
    jsd         0.5 * pS * (log pS - log M - KL(pS || M))

No gradient flows to the teacher: its hidden states, weight and bias are detached.

Pure torch: nothing here imports verl.

Typical use::

    div = selected_token_divergence(student_hidden, student.lm_head.weight,
                                    teacher_hidden, teacher.lm_head.weight, selected,
                                    loss="reverse_kl", chunk_size=1024)
    loss = div.sum() / max(div.numel(), 1)
    kl_bt, entropy_bt = exact_token_kl(student_hidden.detach(), student.lm_head.weight,
                                       teacher_hidden, teacher.lm_head.weight, mask)

Zero selected tokens is not an error: the result is an empty tensor of shape (0,) that still
belongs to the autograd graph (its backward gives zero gradients). A caller that averages over
the selected tokens must guard the count itself, since the mean of an empty tensor is NaN.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from tip_verl.core.selected_logits import (
    _chunk_logits,
    _compute_dtype,
    check_chunking,
    check_lm_head,
    checked_vocab_chunk_size,
    lm_head_backward,
)

__all__ = ["DIVERGENCE_LOSS_NAMES", "selected_token_divergence", "exact_token_kl", "SelectedTokenDivergence"]

DIVERGENCE_LOSS_NAMES = ("reverse_kl", "forward_kl", "jsd")

_LOG_2 = math.log(2.0)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[c, v] * b[c, v] for (C, V) inputs, as a batched dot product: no third (C, V) buffer."""
    return torch.bmm(a[:, None, :], b[:, :, None]).view(-1)


def _chunk_log_softmax(
    h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of one chunk's tempered logits, in place, and its log-sum-exp.

    Args:
        h: (C, H) hidden states; weight: (V, H); bias: (V,) or None.
        dtype: the compute dtype (float32 or wider) of the result.
    Returns:
        (log_p, lse): (C, V) log-probabilities and (C,) log-sum-exp of the tempered logits.
    """
    z = _chunk_logits(h, weight, bias, temperature).to(dtype)
    lse = torch.logsumexp(z, dim=-1)
    return z.sub_(lse[:, None]), lse


def _recomputed_log_softmax(h, weight, bias, temperature, lse, dtype):
    """The (C, V) log-softmax of a chunk from its saved (C,) log-sum-exp: one matmul, no reduction."""
    return _chunk_logits(h, weight, bias, temperature).to(dtype).sub_(lse[:, None])


def _kl_(p_a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from (C, V) p_a, log p_a and log p_b; overwrites ``log_b`` with log_a - log_b.

    The difference is formed before the dot product, not as two dot products: no cancellation
    when the two distributions are close.
    """
    return _row_dot(p_a, log_b.neg_().add_(log_a))


def _log_mixture(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """log M with M = (pS + pT) / 2, from the two (C, V) log-probabilities."""
    return torch.logaddexp(log_s, log_t).sub_(_LOG_2)


def _chunk_divergence(log_s: torch.Tensor, log_t: torch.Tensor, loss: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Divergence per row, and the row constant its logit gradient subtracts; overwrites its inputs.

    Args:
        log_s, log_t: (C, V) student and teacher log-probabilities.
    Returns:
        (divergence, shift): (C,) each. ``shift`` is KL(pS || pT) for reverse_kl, KL(pS || M) for
        jsd (see the module docstring) and unused (zeros) for forward_kl.
    """
    if loss == "reverse_kl":
        divergence = _kl_(log_s.exp(), log_s, log_t)
        return divergence, divergence
    if loss == "forward_kl":
        divergence = _kl_(log_t.exp(), log_t, log_s)
        return divergence, torch.zeros_like(divergence)
    log_m = _log_mixture(log_s, log_t)
    p = log_s.exp()
    kl_s = _row_dot(p, log_s.sub_(log_m))
    kl_t = _row_dot(torch.exp(log_t, out=p), log_t.sub_(log_m))
    return 0.5 * (kl_s + kl_t), kl_s


def _chunk_logit_grad(log_s: torch.Tensor, log_t: torch.Tensor, shift: torch.Tensor, loss: str) -> torch.Tensor:
    """d divergence / d tempered student logits, (C, V); overwrites ``log_s`` and ``log_t``.

    Args:
        log_s, log_t: (C, V) student and teacher log-probabilities.
        shift: (C,) from :func:`_chunk_divergence`.
    """
    if loss == "forward_kl":
        return log_s.exp_().sub_(log_t.exp_())
    p_s = log_s.exp()
    if loss == "reverse_kl":
        return log_s.sub_(log_t).sub_(shift[:, None]).mul_(p_s)
    log_m = _log_mixture(log_s, log_t)
    return log_s.sub_(log_m).sub_(shift[:, None]).mul_(p_s).mul_(0.5)


class SelectedTokenDivergence(torch.autograd.Function):
    """Chunked student and teacher LM heads + full-vocabulary divergence over gathered tokens.

    forward(h_sel, weight, bias, teacher_h_sel, teacher_weight, teacher_bias, loss, chunk_size, vocab_chunk_size,
            temperature)
        h_sel: (N, H) student hidden states of the selected tokens.
        weight: (V, H) student LM head weight; bias: (V,) or None.
        teacher_h_sel: (N, Ht) teacher hidden states of the same tokens, no grad.
        teacher_weight: (V, Ht) teacher LM head weight; teacher_bias: (V,) or None; no grad.
        loss: one of DIVERGENCE_LOSS_NAMES.
    returns:
        (N,) divergence per selected token, float32 or wider.

    Saved for backward: the inputs and three (N,) floats (both log-sum-exps and the gradient's
    row constant); the logits of both models are recomputed tile by tile (:func:`lm_head_backward`).
    """

    @staticmethod
    def forward(
        ctx, h_sel, weight, bias, teacher_h_sel, teacher_weight, teacher_bias, loss, chunk_size, vocab_chunk_size,
        temperature,
    ):
        # backward recomputes the logits: under the same autocast state as here, or they differ
        dev = h_sel.device.type
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        n = h_sel.shape[0]
        cdt = _compute_dtype(
            torch.promote_types(
                torch.promote_types(h_sel.dtype, weight.dtype),
                torch.promote_types(teacher_h_sel.dtype, teacher_weight.dtype),
            )
        )
        divergence = torch.empty(n, dtype=cdt, device=h_sel.device)
        lse_s = torch.empty(n, dtype=cdt, device=h_sel.device)
        lse_t = torch.empty(n, dtype=cdt, device=h_sel.device)
        shift = torch.empty(n, dtype=cdt, device=h_sel.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            log_s, lse_s[s:e] = _chunk_log_softmax(h_sel[s:e], weight, bias, temperature, cdt)
            log_t, lse_t[s:e] = _chunk_log_softmax(teacher_h_sel[s:e], teacher_weight, teacher_bias, temperature, cdt)
            divergence[s:e], shift[s:e] = _chunk_divergence(log_s, log_t, loss)
            del log_s, log_t
        ctx.save_for_backward(h_sel, weight, bias, teacher_h_sel, teacher_weight, teacher_bias, lse_s, lse_t, shift)
        ctx.loss, ctx.chunk_size, ctx.vocab_chunk_size, ctx.temperature = loss, chunk_size, vocab_chunk_size, temperature
        return divergence

    @staticmethod
    def backward(ctx, grad_divergence):
        h_sel, weight, bias, teacher_h_sel, teacher_weight, teacher_bias, lse_s, lse_t, shift = ctx.saved_tensors
        ac_dev, ac_dtype, ac_on = ctx.autocast
        loss, temperature, cdt = ctx.loss, ctx.temperature, lse_s.dtype

        def logit_grad(z, s, e, v0, v1):
            log_s = z.sub_(lse_s[s:e, None])
            t_bias = None if teacher_bias is None else teacher_bias[v0:v1]
            with torch.autocast(device_type=ac_dev, dtype=ac_dtype, enabled=ac_on):
                log_t = _recomputed_log_softmax(
                    teacher_h_sel[s:e], teacher_weight[v0:v1], t_bias, temperature, lse_t[s:e], cdt
                )
            gz = _chunk_logit_grad(log_s, log_t, shift[s:e], loss)  # (C, Vb)
            return gz.mul_(grad_divergence[s:e, None].to(cdt))

        grad_h, grad_w, grad_b = lm_head_backward(
            h_sel, weight, bias, logit_grad, ctx.needs_input_grad[:3], cdt,
            ctx.chunk_size, ctx.vocab_chunk_size, temperature, ctx.autocast,
        )
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def _validate(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
    mask_name, mask, chunk_size, temperature,
):
    check_chunking(chunk_size, temperature)
    check_lm_head(student_hidden, student_weight, student_bias, prefix="student_")
    check_lm_head(teacher_hidden, teacher_weight, teacher_bias, prefix="teacher_")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"student and teacher must share the vocabulary: student_weight has V = {student_weight.shape[0]} rows, "
            f"teacher_weight {teacher_weight.shape[0]}"
        )
    lead = tuple(student_hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_hidden must cover the same positions as student_hidden: leading shape {lead}; "
            f"got {tuple(teacher_hidden.shape[:-1])}"
        )
    if tuple(mask.shape) != lead:
        raise ValueError(f"{mask_name} must have shape {lead} (student_hidden.shape[:-1]); got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{mask_name} must be a bool mask; got dtype {mask.dtype} (pass {mask_name}.bool())")


def selected_token_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    selected: torch.Tensor,
    *,
    loss: str = "reverse_kl",
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    vocab_chunk_size: Optional[int] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Full-vocabulary divergence between student and teacher at the selected positions only.

    Equal, values and gradients, to building both models' logits ``hidden @ weight.T + bias`` for
    every position, dividing by ``temperature``, taking ``log_softmax``, the divergence per position
    and reading it at ``selected``, without ever building logits for unselected positions or more
    than ``chunk_size`` rows of logits at a time.

    Args:
        student_hidden: (B, T, H) student final hidden states (after the final norm), with grad.
            Any leading shape S works as long as ``teacher_hidden`` and ``selected`` have it too.
        student_weight: (V, H) student LM head weight.
        teacher_hidden: (B, T, Ht) teacher final hidden states at the same positions (detached).
        teacher_weight: (V, Ht) teacher LM head weight, same vocabulary (detached).
        selected: (B, T) bool mask of the positions to compute.
        loss: "reverse_kl" (KL(pS || pT)), "forward_kl" (KL(pT || pS)) or "jsd" (0.5 KL(pS || M) +
            0.5 KL(pT || M), M = (pS + pT) / 2, TRL GKD's generalized JSD at beta = 0.5).
        student_bias, teacher_bias: (V,) LM head biases, or None.
        chunk_size: number of selected tokens per chunk (>= 1); peak memory of the logits buffers
            is a few chunk_size x V floats.
        vocab_chunk_size: vocabulary rows per block of the float32 head-gradient sum of a
            bf16/fp16 head over several chunks (>= 1; default chunk_size * V // H).
        temperature: both models' logits are divided by it before the softmax (> 0).

    Returns:
        (N,) divergence in nats per selected token, N = selected.sum(), in the row-major order of
        the True entries of ``selected`` (the order of ``student_hidden[selected]``); float32
        (float64 if the inputs are float64), differentiable w.r.t. ``student_hidden``,
        ``student_weight`` and ``student_bias``. With N = 0 it is empty.

    Raises:
        ValueError: on an unknown ``loss``, shape or dtype mismatch, chunk_size < 1 or
            temperature <= 0.
    """
    if loss not in DIVERGENCE_LOSS_NAMES:
        raise ValueError(
            f"loss must be one of {DIVERGENCE_LOSS_NAMES} (option --loss, config key `loss`); got {loss!r}"
        )
    _validate(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        "selected", selected, chunk_size, temperature,
    )
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    return SelectedTokenDivergence.apply(
        student_hidden[selected],
        student_weight,
        student_bias,
        teacher_hidden.detach()[selected],
        teacher_weight.detach(),
        teacher_bias,
        loss,
        chunk_size,
        checked_vocab_chunk_size(vocab_chunk_size, chunk_size, student_weight),
        float(temperature),
    )


@torch.no_grad()
def exact_token_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact per-position KL(pS || pT) over the vocabulary and the student's entropy, no grad.

    The divergence axis of the selection rules when both full distributions are at hand (the
    paper's d_t), with the entropy axis from the same chunks. Logits are built only at the
    ``mask`` positions, ``chunk_size`` at a time.

    Args:
        student_hidden: (B, T, H) student final hidden states; student_weight: (V, H).
        teacher_hidden: (B, T, Ht) teacher final hidden states; teacher_weight: (V, Ht).
        mask: (B, T) bool, True at the valid (response) positions.
        student_bias, teacher_bias: (V,) or None.
        chunk_size: valid positions per chunk (>= 1).
        temperature: both models' logits are divided by it before the softmax (> 0).

    Returns:
        (kl, entropy): (B, T) each, KL(pS || pT) and the entropy of pS in nats at the ``mask``
        positions, 0 elsewhere; float32 (float64 for float64 inputs), no grad.

    Raises:
        ValueError: on shape or dtype mismatch, chunk_size < 1 or temperature <= 0.
    """
    _validate(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        "mask", mask, chunk_size, temperature,
    )
    h_s, h_t = student_hidden[mask], teacher_hidden[mask]
    cdt = _compute_dtype(
        torch.promote_types(
            torch.promote_types(h_s.dtype, student_weight.dtype), torch.promote_types(h_t.dtype, teacher_weight.dtype)
        )
    )
    n = h_s.shape[0]
    kl = torch.empty(n, dtype=cdt, device=h_s.device)
    entropy = torch.empty(n, dtype=cdt, device=h_s.device)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        log_s, _ = _chunk_log_softmax(h_s[s:e], student_weight, student_bias, temperature, cdt)
        log_t, _ = _chunk_log_softmax(h_t[s:e], teacher_weight, teacher_bias, temperature, cdt)
        p_s = log_s.exp()
        entropy[s:e] = -_row_dot(p_s, log_s)
        kl[s:e] = _kl_(p_s, log_s, log_t)
        del log_s, log_t, p_s
    zeros = torch.zeros(mask.shape, dtype=cdt, device=h_s.device)
    return zeros.masked_scatter(mask, kl), zeros.masked_scatter(mask, entropy)
