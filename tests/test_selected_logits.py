"""Selected-token LM head vs. the full-vocabulary computation masked to the same tokens,
and the verl 0.9.1 patch that routes the actor's log-probs through it."""

import importlib.metadata
import importlib.util
import py_compile

import pytest
import torch
from tensor_sizes import LargestTensor
from verl_patching import apply_to_copy_of_installed_verl

from tip_verl.core.selected_logits import scatter_selected, selected_token_logprobs

transformers = pytest.importorskip("transformers")

V, H = 97, 32
B, T = 3, 11


def _tiny_llama(tie=False, dtype=torch.float64):
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _batch(ratio, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    selected = torch.rand(B, T, generator=g) < ratio
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    ent_coef = torch.randn(B, T, generator=g, dtype=torch.float64)
    return ids[:, :-1], ids[:, 1:], selected, adv, ent_coef


def _naive(hidden, weight, bias, targets, selected, temperature=1.0):
    """Reference: logits for every token, log_softmax, gather, mask."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature
    logq = torch.log_softmax(logits, dim=-1)
    logp = logq.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    m = selected.to(logp.dtype)
    return logp * m, ent * m


def _loss(logp_bt, ent_bt, adv, ent_coef):
    return -(adv * logp_bt).sum() + (ent_coef * ent_bt).sum()


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
@pytest.mark.parametrize("tie", [False, True])
def test_matches_full_computation_through_llama(chunk_size, tie):
    model = _tiny_llama(tie=tie)
    inp, targets, selected, adv, ent_coef = _batch(0.4)
    assert 0 < int(selected.sum()) < selected.numel()

    def run(route):
        model.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=inp).last_hidden_state  # (B, T, H), after the final norm
        hidden.retain_grad()
        w = model.lm_head.weight
        if route == "naive":
            logp_bt, ent_bt = _naive(hidden, w, None, targets, selected)
        else:
            logp, ent = selected_token_logprobs(
                hidden, w, selected, targets, chunk_size=chunk_size, return_entropy=True
            )
            logp_bt, ent_bt = scatter_selected(logp, selected), scatter_selected(ent, selected)
        _loss(logp_bt, ent_bt, adv, ent_coef).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logp_bt.detach(), ent_bt.detach(), hidden.grad.clone(), grads

    ref = run("naive")
    got = run("selected")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-9, atol=1e-10)
    # with tied embeddings the head weight is listed once, as the embedding
    head = "model.embed_tokens.weight" if tie else "lm_head.weight"
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert got[3].keys() == ref[3].keys() and head in ref[3]
    for name in ref[3]:
        torch.testing.assert_close(got[3][name], ref[3][name], rtol=1e-9, atol=1e-10, msg=name)
    # unselected positions get no gradient at all
    assert torch.all(got[2][~selected] == 0)


def test_bias_temperature_and_float32():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    selected = torch.rand(2, 9, generator=g) < 0.5
    adv = torch.randn(2, 9, generator=g)

    def grads(route):
        for t in (hidden, weight, bias):
            t.grad = None
        if route == "naive":
            logp_bt, ent_bt = _naive(hidden, weight, bias, targets, selected, temperature=0.7)
        else:
            logp, ent = selected_token_logprobs(
                hidden, weight, selected, targets, bias=bias, chunk_size=2, temperature=0.7, return_entropy=True
            )
            logp_bt, ent_bt = scatter_selected(logp, selected), scatter_selected(ent, selected)
        (-(adv * logp_bt).sum() - 0.3 * ent_bt.sum()).backward()
        return logp_bt.detach(), ent_bt.detach(), hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()

    for r, s in zip(grads("naive"), grads("selected")):
        torch.testing.assert_close(s, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [7, 64])  # several chunks (float32 head-gradient sum) and one chunk
def test_logprob_only_and_bf16_head_in_float32_statistics(chunk_size):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, 20, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, 40, (1, 20), generator=g)
    selected = torch.ones(1, 20, dtype=torch.bool)
    logp, ent = selected_token_logprobs(hidden, weight, selected, targets, chunk_size=chunk_size)
    assert ent is None and logp.dtype == torch.float32 and logp.shape == (20,)
    h2 = hidden.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    # same semantics: bf16 logits, softmax statistics in float32
    ref = torch.log_softmax((h2 @ w2.t()).float(), -1).gather(-1, targets[..., None]).reshape(-1)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    logp.sum().backward()
    ref.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("vocab_chunk_size", [1, 7, None, 40])
def test_bf16_head_gradient_is_summed_in_float32_by_vocabulary_blocks(vocab_chunk_size):
    """Several chunks of a bf16 head: the float32 sum of the head gradient is kept one block of
    vocabulary rows at a time (default chunk_size * V // H = 17 rows), never as a (V, H) float32 buffer
    unless the block is the vocabulary; values and gradients equal float64 on the same bf16 inputs."""
    g = torch.Generator().manual_seed(5)
    n, h, v, chunk = 24, 16, 40, 7
    hidden = torch.randn(1, n, h, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(v, h, generator=g).bfloat16().requires_grad_()
    bias = torch.randn(v, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (1, n), generator=g)
    selected = torch.ones(1, n, dtype=torch.bool)
    adv, ent_coef = torch.randn(n, generator=g), torch.randn(n, generator=g)
    with LargestTensor() as sizes:
        logp, ent = selected_token_logprobs(
            hidden, weight, selected, targets, bias=bias, chunk_size=chunk, vocab_chunk_size=vocab_chunk_size,
            temperature=0.7, return_entropy=True,
        )
        (-(adv * logp).sum() + (ent_coef * ent).sum()).backward()
    rows = vocab_chunk_size or chunk * v // h
    assert sizes.by_dtype[torch.float32] <= max(chunk * v, rows * h, n * h)
    params64 = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logp64, ent64 = _naive(*params64, targets, selected, temperature=0.7)
    (-(adv.double() * logp64.reshape(-1)).sum() + (ent_coef.double() * ent64.reshape(-1)).sum()).backward()
    # the logits themselves are a bf16 matmul: everything agrees to bf16 rounding, relative to its scale
    pairs = [(logp, logp64), (ent, ent64)] + [(t.grad, p.grad) for t, p in zip((hidden, weight, bias), params64)]
    for got, want in pairs:
        want = want.reshape(got.shape)
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=2e-2)
    assert all(t.grad.dtype == torch.bfloat16 for t in (hidden, weight, bias))


def test_vocab_chunk_size_below_one_is_refused():
    with pytest.raises(ValueError, match="vocab_chunk_size must be an int >= 1"):
        selected_token_logprobs(
            torch.randn(1, 3, 4), torch.randn(5, 4), torch.ones(1, 3, dtype=torch.bool),
            torch.zeros(1, 3, dtype=torch.long), vocab_chunk_size=0,
        )


@pytest.mark.parametrize("use", ["logp", "entropy"])
def test_only_one_output_in_the_loss(use):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(21, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 21, (2, 6), generator=g)
    selected = torch.rand(2, 6, generator=g) < 0.6
    logp, ent = selected_token_logprobs(hidden, weight, selected, targets, chunk_size=2, return_entropy=True)
    (logp if use == "logp" else ent).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_lp, ref_ent = _naive(hidden, weight, None, targets, selected)
    (ref_lp if use == "logp" else ref_ent).sum().backward()
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], weight.grad)


def test_under_autocast_like_the_fsdp_engine():
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(1, 12, 16, generator=g, requires_grad=True)
    weight = torch.randn(30, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 30, (1, 12), generator=g)
    selected = torch.rand(1, 12, generator=g) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = selected_token_logprobs(hidden, weight, selected, targets, chunk_size=2)
        ref = torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    logp.sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (ref * selected).sum().backward()
    torch.testing.assert_close(logp, ref[selected], rtol=1e-5, atol=1e-5)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], hidden.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1], weight.grad, rtol=2e-2, atol=2e-2)


def test_chunk_larger_than_count_and_all_selected_equal_one_chunk():
    model = _tiny_llama()
    inp, targets, _, _, _ = _batch(1.0)
    hidden = model.model(input_ids=inp).last_hidden_state.detach()
    sel = torch.ones(B, T, dtype=torch.bool)
    a, _ = selected_token_logprobs(hidden, model.lm_head.weight, sel, targets, chunk_size=1)
    b, _ = selected_token_logprobs(hidden, model.lm_head.weight, sel, targets, chunk_size=10**6)
    ref = torch.log_softmax(model(input_ids=inp).logits, -1).gather(-1, targets[..., None]).reshape(-1)
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)


def test_zero_selected_returns_empty_and_backward_gives_zero_grads():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 13, (2, 5))
    selected = torch.zeros(2, 5, dtype=torch.bool)
    logp, ent = selected_token_logprobs(hidden, weight, selected, targets, chunk_size=4, return_entropy=True)
    assert logp.shape == (0,) and ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)
    assert scatter_selected(logp, selected).shape == (2, 5)


def test_packed_leading_shape_and_scatter_fill():
    hidden = torch.randn(12, 8, dtype=torch.float64)
    weight = torch.randn(10, 8, dtype=torch.float64)
    targets = torch.randint(0, 10, (12,))
    selected = torch.arange(12) % 3 == 0
    logp, _ = selected_token_logprobs(hidden, weight, selected, targets, chunk_size=3)
    ref = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    out = scatter_selected(logp, selected, fill=float("nan"))
    torch.testing.assert_close(out[selected], ref[selected])
    assert torch.isnan(out[~selected]).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_size=0), "chunk_size must be an int >= 1"),
        (dict(chunk_size=2.5), "chunk_size must be an int >= 1"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(weight=torch.randn(13, 7)), r"weight must be the LM head weight of shape \(V, H\)"),
        (dict(bias=torch.randn(12)), r"bias must have shape \(V,\)"),
        (dict(selected=torch.ones(2, 4, dtype=torch.bool)), r"selected must have shape \(2, 5\)"),
        (dict(selected=torch.ones(2, 5)), "selected must be a bool mask"),
        (dict(targets=torch.zeros(2, 6, dtype=torch.long)), r"targets must have shape \(2, 5\)"),
        (dict(targets=torch.zeros(2, 5)), "targets must hold integer token ids"),
        (dict(targets=torch.full((2, 5), 13)), r"must lie in \[0, V\) with V = 13"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, match):
    args = dict(
        hidden=torch.randn(2, 5, 8),
        weight=torch.randn(13, 8),
        selected=torch.ones(2, 5, dtype=torch.bool),
        targets=torch.zeros(2, 5, dtype=torch.long),
        chunk_size=2,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        selected_token_logprobs(**args)


def test_scatter_rejects_count_mismatch():
    with pytest.raises(ValueError, match="must match"):
        scatter_selected(torch.zeros(3), torch.ones(2, 2, dtype=torch.bool))


# --- the verl 0.9.1 patch (patches/verl-0.9.1-tip-selected-logprobs.patch) ---

PATCH_NAME = "verl-0.9.1-tip-selected-logprobs.patch"
PATCHED_FILES = [
    "verl/workers/utils/padding.py",
    "verl/models/transformers/dense_common.py",
    "verl/workers/engine/fsdp/transformer_impl.py",
]


@pytest.fixture(scope="module")
def patched_verl(tmp_path_factory):
    """Copy of the installed verl files the patch touches, with the patch applied."""
    return apply_to_copy_of_installed_verl(PATCH_NAME, PATCHED_FILES, tmp_path_factory.mktemp("verl_copy"))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_patch_applies_to_installed_verl_and_compiles(patched_verl):
    assert importlib.metadata.version("verl") == "0.9.1", "the patch is pinned to verl 0.9.1"
    for f in PATCHED_FILES:
        py_compile.compile(str(patched_verl / f), doraise=True)
    assert "tip_selected" in (patched_verl / PATCHED_FILES[1]).read_text()


def test_patched_forward_matches_verl_fused_path_at_selected_tokens(patched_verl):
    dense = _load(patched_verl / PATCHED_FILES[1], "patched_dense_common")
    model = _tiny_llama(dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (1, 15), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    selected = torch.rand(1, 15, generator=g) < 0.4
    selected[0, 0] = True
    adv = torch.randn(1, 15, generator=g)

    def run(tip_selected):
        model.zero_grad(set_to_none=True)
        out = dense.forward_with_torch_backend(
            model, input_ids=ids, return_dict=True, temperature=0.8, shift_labels=labels, tip_selected=tip_selected
        )
        m = selected.float()
        (-(adv * out.log_probs * m).sum() + (out.entropy * m).sum()).backward()
        return out.log_probs.detach() * m, out.entropy.detach().float() * m, {
            n: p.grad.clone() for n, p in model.named_parameters()
        }, out.log_probs.detach()

    ref = run(None)  # verl's own FusedLinearForPPO over every token
    got = run(selected)
    # the selected-token route really ran: nothing was computed for the other positions
    assert torch.all(got[3][~selected] == 0) and torch.all(ref[3][~selected] != 0)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-4, atol=1e-6, msg=n)


def test_patched_packing_helper_inverts_no_padding_2_padding(patched_verl):
    from tensordict import TensorDict

    padding = _load(patched_verl / PATCHED_FILES[0], "patched_padding")
    # left-padded prompts (P=4), right-padded responses (R=5)
    prompt_lens, resp_lens = torch.tensor([2, 4, 3]), torch.tensor([5, 1, 3])
    P, R = 4, 5
    attn = torch.zeros(3, P + R, dtype=torch.long)
    for i in range(3):
        attn[i, P - prompt_lens[i] : P] = 1
        attn[i, P : P + resp_lens[i]] = 1
    response_mask = attn[:, P:].clone()
    ids = torch.randint(1, V, (3, P + R))
    data = TensorDict(
        {
            "input_ids": ids,
            "attention_mask": attn,
            "response_mask": response_mask,
            "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
            "prompts": ids[:, :P],
            "responses": ids[:, P:],
        },
        batch_size=[3],
    )
    data = padding.left_right_2_no_padding(data)
    selected = (torch.rand(3, R, generator=torch.Generator().manual_seed(2)) < 0.5) & response_mask.bool()
    packed = padding.padding_2_no_padding_response(selected.long(), data)
    assert packed.shape == (int(attn.sum()),) and int(packed.sum()) == int(selected.sum())
    back = padding.no_padding_2_padding(packed, data)
    assert torch.equal(back.bool(), selected)


def test_patched_packing_helper_with_nested_prompts_and_responses(patched_verl):
    from tensordict import TensorDict

    padding = _load(patched_verl / PATCHED_FILES[0], "patched_padding")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, V, (n,), generator=g) for n in (2, 4, 3)]
    responses = [torch.randint(1, V, (n,), generator=g) for n in (5, 1, 3)]

    def nested(xs):
        return torch.nested.as_nested_tensor(xs, layout=torch.jagged)

    data = TensorDict(
        {
            "prompts": nested(prompts),
            "responses": nested(responses),
            "input_ids": nested([torch.cat([p, r]) for p, r in zip(prompts, responses)]),
        },
        batch_size=[3],
    )
    valid = torch.arange(5)[None, :] < torch.tensor([5, 1, 3])[:, None]
    selected = (torch.rand(3, 5, generator=g) < 0.5) & valid
    packed = padding.padding_2_no_padding_response(selected.long(), data)
    assert packed.shape == (18,)
    assert torch.equal(padding.no_padding_2_padding(packed, data).bool(), selected)
