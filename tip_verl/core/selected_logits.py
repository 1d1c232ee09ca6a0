"""Log-probs and entropies of the LM head at selected token positions only.

TIP trains on a subset of the response tokens. The usual loss stage builds
full-vocabulary logits for every position (``hidden @ W.T`` of shape (B, T, V)),
a log-softmax of the same size that autograd keeps for backward, and a
gradient of the same size again. For the tokens TIP drops all of that is wasted.

:func:`selected_token_logprobs` gathers the hidden states of the selected
positions, applies the LM head and the log-softmax in chunks of ``chunk_size``
selected tokens and keeps, for backward, only the selected hidden states and
two floats per selected token. The backward recomputes each chunk's logits, so
the peak memory of the loss stage is O(chunk_size x V) plus O(N x H) for the N
selected tokens, in both passes.

Pure torch: nothing here imports verl.

Typical use::

    logp, ent = selected_token_logprobs(hidden, lm_head.weight, selected, targets,
                                        chunk_size=1024, return_entropy=True)
    loss = -(advantages[selected] * logp).sum() / logp.numel()
    logp_bt = scatter_selected(logp, selected)   # (B, T), zeros where not selected

Zero selected tokens is not an error: the result is an empty tensor of shape
(0,) that still belongs to the autograd graph (its backward gives zero
gradients). A caller that averages over the selected tokens must guard the
count itself, since the mean of an empty tensor is NaN.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

__all__ = ["selected_token_logprobs", "scatter_selected", "SelectedTokenLogProbs"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # softmax statistics in at least float32, even for bf16/fp16 heads
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float
) -> torch.Tensor:
    """Logits of one chunk.

    Args:
        h: (C, H) hidden states of the chunk.
        weight: (V, H) LM head weight.
        bias: (V,) or None.
    Returns:
        (C, V) logits divided by ``temperature``, in float32 or wider.
    """
    z = h.to(weight.dtype) @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.to(_compute_dtype(z.dtype))
    if temperature != 1.0:
        z.div_(temperature)  # z is this chunk's own buffer: no second C x V copy
    return z


class SelectedTokenLogProbs(torch.autograd.Function):
    """Chunked LM head + log-softmax over already gathered selected tokens.

    forward(h_sel, weight, bias, targets, chunk_size, vocab_chunk_size, temperature, return_entropy)
        h_sel: (N, H) hidden states of the selected tokens.
        weight: (V, H) LM head weight.
        bias: (V,) or None.
        targets: (N,) int64 target ids.
    returns (logp, entropy):
        logp: (N,) log p(target) under softmax(logits / temperature).
        entropy: (N,) entropy of that distribution in nats (zeros, with no
            gradient path, when return_entropy is False).

    Saved for backward: h_sel, weight, bias, targets and the (N,) logsumexp
    and entropy; the logits are recomputed tile by tile (:func:`lm_head_backward`).
    """

    @staticmethod
    def forward(ctx, h_sel, weight, bias, targets, chunk_size, vocab_chunk_size, temperature, return_entropy):
        # an output the loss does not use arrives as None in backward, not as zeros
        ctx.set_materialize_grads(False)
        # backward recomputes the logits: under the same autocast state as here, or they differ
        dev = h_sel.device.type
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        n = h_sel.shape[0]
        cdt = _compute_dtype(torch.promote_types(h_sel.dtype, weight.dtype))
        logp = torch.empty(n, dtype=cdt, device=h_sel.device)
        lse = torch.empty(n, dtype=cdt, device=h_sel.device)
        ent = torch.zeros(n, dtype=cdt, device=h_sel.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _chunk_logits(h_sel[s:e], weight, bias, temperature)  # (C, V)
            z_t = z.gather(1, targets[s:e, None]).squeeze(1)
            m = z.amax(dim=-1, keepdim=True)  # (C, 1)
            z.sub_(m)  # shifted logits, in place
            if return_entropy:
                ex = z.exp()  # (C, V) unnormalised probabilities
                sum_ex = ex.sum(-1)
                # sum_v ex_v * z_v as a batched dot product: no third (C, V) buffer
                ez = torch.bmm(ex[:, None, :], z[:, :, None]).view(-1)
                del ex
            else:
                sum_ex = z.exp_().sum(-1)  # in place: one (C, V) buffer
            log_sum = sum_ex.log()
            lse_c = m.squeeze(1) + log_sum
            lse[s:e] = lse_c
            logp[s:e] = z_t - lse_c
            if return_entropy:
                ent[s:e] = log_sum - ez / sum_ex
            del z
        ctx.save_for_backward(h_sel, weight, bias, targets, lse, ent)
        ctx.chunk_size, ctx.vocab_chunk_size = chunk_size, vocab_chunk_size
        ctx.temperature = temperature
        ctx.return_entropy = return_entropy
        if not return_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        h_sel, weight, bias, targets, lse, ent = ctx.saved_tensors
        n, cdt = h_sel.shape[0], lse.dtype
        use_ent = ctx.return_entropy and grad_ent is not None
        if grad_logp is None:
            grad_logp = torch.zeros(n, dtype=cdt, device=h_sel.device)

        # d logp_y / dz = onehot(y) - p;  d H / dz = -p * (log p + H)
        def logit_grad(z, s, e, v0, v1):
            logq = z.sub_(lse[s:e, None])  # log-softmax of the tile, (C, Vb)
            g_lp = grad_logp[s:e].to(cdt)
            if use_ent:
                p = logq.exp()
                gz = logq.add_(ent[s:e, None]).mul_(p).mul_(-grad_ent[s:e, None].to(cdt))
                gz.sub_(p.mul_(g_lp[:, None]))
                del p
            else:
                gz = logq.exp_().mul_(-g_lp[:, None])
            local = targets[s:e] - v0
            inside = (local >= 0) & (local < v1 - v0)  # targets that fall in this vocabulary block
            return gz.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None], (g_lp * inside)[:, None])

        grad_h, grad_w, grad_b = lm_head_backward(
            h_sel, weight, bias, logit_grad, ctx.needs_input_grad[:3], cdt,
            ctx.chunk_size, ctx.vocab_chunk_size, ctx.temperature, ctx.autocast,
        )
        return grad_h, grad_w, grad_b, None, None, None, None, None


def checked_vocab_chunk_size(vocab_chunk_size: Optional[int], chunk_size: int, weight: torch.Tensor) -> int:
    """Vocabulary rows per block of the head-gradient sum; by default chunk_size * V // H rows, so the
    (rows, H) float32 sum is no larger than one chunk's (chunk_size, V) float32 logits."""
    if vocab_chunk_size is None:
        vocab, hidden = weight.shape
        return max(1, min(vocab, chunk_size * vocab // hidden))
    if not isinstance(vocab_chunk_size, int) or isinstance(vocab_chunk_size, bool) or vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size must be an int >= 1 (vocabulary rows per block) or None; got {vocab_chunk_size!r}")
    return vocab_chunk_size


# torch.addmm(..., out_dtype=torch.float32): a bf16/fp16 matmul that sums into float32 (CUDA, torch >= 2.8)
_ADDMM_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)


def _accumulates_low_in_float32(weight: torch.Tensor, cdt: torch.dtype) -> bool:
    """Whether a float32 sum of products of the bf16/fp16 head can use the low-precision matmul with a
    float32 output: on CUDA it runs at the bf16 rate and sums exactly; elsewhere a float32 matmul does."""
    return (
        _ADDMM_OUT_DTYPE and weight.is_cuda and cdt == torch.float32
        and weight.dtype in (torch.bfloat16, torch.float16)
    )


def lm_head_backward(
    h_sel: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    logit_grad: Callable[[torch.Tensor, int, int, int, int], torch.Tensor],
    needs: Tuple[bool, bool, bool],
    cdt: torch.dtype,
    chunk_size: int,
    vocab_chunk_size: int,
    temperature: float,
    autocast: tuple,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of a loss on the tempered logits ``(h_sel @ weight.T + bias) / temperature``, tile by tile.

    Args:
        h_sel: (N, H) hidden states; weight: (V, H); bias: (V,) or None.
        logit_grad: ``logit_grad(z, s, e, v0, v1)`` gets ``z`` (C, Vb), the tempered logits of tokens
            s:e and vocabulary rows v0:v1 in ``cdt`` (it may overwrite them), and returns d loss / d z,
            (C, Vb) in ``cdt``.
        needs: whether h_sel, weight and bias need their gradients.
        cdt: the compute dtype (float32 or wider).
        chunk_size: tokens per tile; vocab_chunk_size: vocabulary rows per tile where the vocabulary
            is split (see below).
        autocast: (device type, dtype, enabled) of the forward, under which the logits are recomputed.

    Returns:
        (grad_h (N, H), grad_w (V, H), grad_b (V,)), each None where not needed, in the inputs' dtypes.

    A bf16/fp16 head gradient summed over several token chunks is summed in float32. Held whole that
    sum is a V x H float32 buffer (1.16 GiB at V 151,936, H 2048), so then the vocabulary is split in
    blocks of ``vocab_chunk_size`` rows, each block's sum is taken over every token chunk and cast into
    the head gradient, and the hidden states' gradient is summed over the blocks in an (N, H) float32
    buffer instead. Otherwise the vocabulary is one block.
    """
    need_h, need_w, need_b = needs
    n, vocab = h_sel.shape[0], weight.shape[0]
    sum_w_wide = need_w and weight.dtype != cdt and n > chunk_size
    block = vocab_chunk_size if sum_w_wide else vocab
    split = block < vocab
    exact_low = sum_w_wide and _accumulates_low_in_float32(weight, cdt)
    grad_h = torch.zeros(h_sel.shape, dtype=cdt if split else h_sel.dtype, device=h_sel.device) if need_h else None
    # one block summed in float32 is cast whole at the end; several are cast into the head gradient block by block
    grad_w = torch.zeros_like(weight) if need_w and not (sum_w_wide and not split) else None
    grad_b = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need_b else None
    ac_dev, ac_dtype, ac_on = autocast
    for v0 in range(0, vocab, block):
        v1 = min(v0 + block, vocab)
        w_block = weight[v0:v1]
        b_block = None if bias is None else bias[v0:v1]
        w_sum = torch.zeros(w_block.shape, dtype=cdt, device=weight.device) if sum_w_wide else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            with torch.autocast(device_type=ac_dev, dtype=ac_dtype, enabled=ac_on):
                z = _chunk_logits(h_sel[s:e], w_block, b_block, temperature).to(cdt)  # (C, Vb)
            gz = logit_grad(z, s, e, v0, v1)
            del z
            if temperature != 1.0:
                gz.div_(temperature)
            if need_b:
                grad_b[v0:v1] += gz.sum(0)
            if sum_w_wide and not exact_low:
                w_sum.addmm_(gz.t(), h_sel[s:e].to(cdt))
            gz = gz.to(weight.dtype)
            if exact_low:
                torch.addmm(w_sum, gz.t(), h_sel[s:e].to(weight.dtype), out_dtype=torch.float32, out=w_sum)
            if need_w and not sum_w_wide:
                grad_w[v0:v1].addmm_(gz.t(), h_sel[s:e].to(weight.dtype))
            if need_h and split and exact_low:
                torch.addmm(grad_h[s:e], gz, w_block, out_dtype=torch.float32, out=grad_h[s:e])
            elif need_h and split:
                grad_h[s:e] += gz @ w_block
            elif need_h:
                grad_h[s:e] = (gz @ w_block).to(h_sel.dtype)
            del gz
        if sum_w_wide and split:
            grad_w[v0:v1] = w_sum
        elif sum_w_wide:
            grad_w = w_sum.to(weight.dtype)
        del w_sum
    if need_h and split:
        grad_h = grad_h.to(h_sel.dtype)
    if need_b:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


def check_chunking(chunk_size: int, temperature: float) -> None:
    """Raise unless chunk_size is an int >= 1 and temperature a number > 0."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 (selected tokens per chunk); got {chunk_size!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0; got {temperature!r}")


def check_lm_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], prefix: str = "") -> None:
    """Raise unless hidden (..., H), weight (V, H) and bias (V,) or None fit; `prefix` names them (e.g. "teacher_")."""
    if hidden.dim() < 2:
        raise ValueError(f"{prefix}hidden must have shape (B, T, H); got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}weight must be the LM head weight of shape (V, H) with H = {prefix}hidden.shape[-1] = "
            f"{hidden.shape[-1]}; got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{prefix}bias must have shape (V,) = ({weight.shape[0]},) or be None; got {tuple(bias.shape)}"
        )


def _validate(hidden, weight, bias, selected, targets, chunk_size, temperature):
    check_chunking(chunk_size, temperature)
    check_lm_head(hidden, weight, bias)
    lead = tuple(hidden.shape[:-1])
    if tuple(selected.shape) != lead:
        raise ValueError(f"selected must have shape {lead} (hidden.shape[:-1]); got {tuple(selected.shape)}")
    if selected.dtype != torch.bool:
        raise ValueError(f"selected must be a bool mask; got dtype {selected.dtype} (pass mask.bool())")
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets must have shape {lead} (hidden.shape[:-1]); got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must hold integer token ids; got dtype {targets.dtype}")


def selected_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    selected: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    vocab_chunk_size: Optional[int] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs of the targets (and entropies) at the selected positions only.

    Equal, values and gradients, to ``log_softmax((hidden @ weight.T + bias) /
    temperature)`` gathered at ``targets`` and read at ``selected``, without
    ever building logits for unselected positions or more than ``chunk_size``
    rows of logits at a time.

    Args:
        hidden: (B, T, H) final hidden states (after the final norm). Any
            leading shape S works as long as ``selected`` and ``targets`` have
            shape S, e.g. (N_tokens, H) for a packed batch.
        weight: (V, H) LM head weight.
        selected: (B, T) bool mask of the positions to compute.
        targets: (B, T) integer target ids; only the selected ones are read
            and must lie in [0, V).
        bias: (V,) LM head bias, or None.
        chunk_size: number of selected tokens per chunk (>= 1); peak memory of
            the logits buffers is a few chunk_size x V floats.
        vocab_chunk_size: vocabulary rows per block of the float32 head-gradient
            sum of a bf16/fp16 head over several chunks (>= 1; default
            chunk_size * V // H, no larger than one chunk's logits).
        temperature: logits are divided by it before the softmax (> 0).
        return_entropy: also return the full-vocabulary entropy (nats).

    Returns:
        (logp, entropy): ``logp`` (N,) and ``entropy`` (N,) or None, where
        N = selected.sum(); order is the row-major order of the True entries
        of ``selected`` (the order of ``hidden[selected]``). Both are float32
        (float64 if the inputs are float64) and differentiable w.r.t.
        ``hidden``, ``weight`` and ``bias``. With N = 0 they are empty.

    Raises:
        ValueError: on shape or dtype mismatch, chunk_size or vocab_chunk_size
            < 1, temperature <= 0, or a selected target outside [0, V).
    """
    _validate(hidden, weight, bias, selected, targets, chunk_size, temperature)
    vocab_chunk_size = checked_vocab_chunk_size(vocab_chunk_size, chunk_size, weight)
    h_sel = hidden[selected]  # (N, H)
    t_sel = targets[selected].long()  # (N,)
    if t_sel.numel():
        low, high = (int(bound) for bound in torch.aminmax(t_sel))
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(
                f"targets at selected positions must lie in [0, V) with V = {weight.shape[0]}; got range [{low}, {high}]"
            )
    logp, ent = SelectedTokenLogProbs.apply(
        h_sel, weight, bias, t_sel, chunk_size, vocab_chunk_size, float(temperature), bool(return_entropy)
    )
    return logp, (ent if return_entropy else None)


def scatter_selected(values: torch.Tensor, selected: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Put per-selected-token values back at their positions.

    Args:
        values: (N,) values in the order of ``hidden[selected]``, N = selected.sum().
        selected: (B, T) bool mask (any shape S).
        fill: value at unselected positions.

    Returns:
        (B, T) tensor (shape S) of ``values.dtype``: ``values`` at the selected
        positions, ``fill`` elsewhere; differentiable w.r.t. ``values``.
    """
    if selected.dtype != torch.bool:
        raise ValueError(f"selected must be a bool mask; got dtype {selected.dtype} (pass mask.bool())")
    if values.dim() != 1:
        raise ValueError(f"values must have shape (N,); got {tuple(values.shape)}")
    n = int(selected.sum())
    if values.shape[0] != n:
        raise ValueError(f"values has {values.shape[0]} entries but selected has {n} True positions; they must match")
    out = torch.full(selected.shape, fill, dtype=values.dtype, device=values.device)
    return out.masked_scatter(selected.to(values.device), values)
