"""Peak memory and time of one whole actor update step at a real model shape.

One step is: the transformer (random weights, built from a Qwen3 config, bf16,
gradient checkpointing on as verl's scripts set it) on one packed sequence of T
tokens -> per-token log-probs of the next token -> the policy-gradient loss
-(A * logp) averaged over the selected tokens -> backward to every parameter,
then, in a second phase of the same subprocess, the same with an AdamW step
(after one unmeasured step that creates the optimizer state, as in a run).
The ways differ only in how the log-probs are computed:

  naive     model(...).logits for all T tokens (bf16), log_softmax, gather,
            masked with the selection (what verl's engine runs without
            `use_fused_kernels`: full logits, `logprobs_from_logits_v2` for bf16).
  fused     verl 0.9.1's `use_fused_kernels` forward with the torch backend,
            `verl.models.transformers.dense_common.forward_with_torch_backend`,
            called on the model: the base model, then `FusedLinearForPPO`
            (chunks of 512) on all T tokens; masked afterwards. Needs verl; skipped
            with a message where verl is not installed.
  selected  the base model, then tip_verl.core.selected_logits.
            selected_token_logprobs on the hidden states of the selected tokens
            only (chunks of --chunk-size).
  selected_whole_vocab
            `selected` with one whole V x H float32 sum of a bf16 head's gradient (vocab_chunk_size = V),
            as the selected head summed it before it summed by vocabulary blocks.
  body      the base model alone, loss = mean of its final hidden states, no LM
            head: subtracted from `naive` it gives the LM head's share of the step.

`naive`, `fused` and `body` do not depend on the ratio and run once per
(shape, layers, T). Every row runs in a fresh subprocess; `naive` and `selected`
import only torch, transformers and tip_verl.core.

Memory is parameters + gradients + activations (+ the AdamW state in the second
phase) above the bare process:
  cuda  torch.cuda.max_memory_allocated() after reset_peak_memory_stats()
        (also max_memory_reserved, what the caching allocator holds).
  cpu   peak RSS as benchmarks/bench_selected_memory.py measures it: the RSS
        before the model is built is the baseline, the kernel's peak-RSS counter
        (VmHWM) is reset (/proc/self/clear_refs, 5) after the model is built,
        the peak is VmHWM minus the baseline; glibc serves allocations above
        128 KiB with mmap (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the RSS.
Time per step is the fastest of --steps steps (on CUDA, after synchronize).

--layers may be fewer than the model's 28: the per-layer part of the peak is
then the slope between the smallest and the largest layer count measured, the
deviation of the middle counts from that line is printed (it shows whether the
peak is linear in the layers), and the peak at the full depth is extrapolated
from it, marked as such.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import sys
import time

from fresh_process import reset_peak_rss, rss_kib, run_worker

# Qwen3 configs as published (config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B); `tiny` is for --quick.
SHAPES = {
    "qwen3-0.6b": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    ),
    "qwen3-1.7b": dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=4096, tie_word_embeddings=True,
    ),
}
WAYS = ["naive", "fused", "selected", "selected_whole_vocab", "body"]
RATIO_FREE = ("naive", "fused", "body")
ALL_T = [2048, 8192]
ALL_RATIOS = [1.0, 0.5, 0.2, 0.1]
GIB = 2**30


def build_model(shape: str, layers: int, dtype, device):
    """Qwen3ForCausalLM of the named shape with `layers` decoder layers, random weights, in train mode."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{**SHAPES[shape], "num_hidden_layers": layers}, use_cache=False)
    config._attn_implementation = "sdpa"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the training dtype: no float32 copy of the weights
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_batch(vocab_size: int, T: int, ratio: float, device, seed: int = 0) -> dict:
    """One packed sequence: input_ids (1, T), next-token labels (1, T), selected (1, T) bool
    with round(ratio * T) True (at least 1), advantages (1, T) float32."""
    import torch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (1, T), generator=g)
    selected = torch.zeros(1, T, dtype=torch.bool)
    selected[0, torch.randperm(T, generator=g)[: max(1, round(ratio * T))]] = True
    batch = dict(
        input_ids=input_ids,
        labels=torch.roll(input_ids, shifts=-1, dims=-1),
        selected=selected,
        advantages=torch.randn(1, T, generator=g),
    )
    return {k: v.to(device) for k, v in batch.items()}


def step_loss(way: str, model, batch: dict, chunk_size: int = 512):
    """The forward pass and the policy loss -(A * logp) averaged over the selected tokens (a scalar)."""
    import torch

    selected, advantages = batch["selected"], batch["advantages"]
    n_selected = selected.sum()
    if way == "naive":
        logits = model(input_ids=batch["input_ids"]).logits  # (1, T, V)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, batch["labels"][..., None]).squeeze(-1)
        return -(advantages * logp * selected).sum() / n_selected
    if way == "fused":
        from verl.models.transformers.dense_common import forward_with_torch_backend

        out = forward_with_torch_backend(
            model, input_ids=batch["input_ids"], shift_labels=batch["labels"], return_dict=True
        )
        return -(advantages * out.log_probs * selected).sum() / n_selected
    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state  # (1, T, H)
    if way == "body":
        return hidden.float().mean()
    if way in ("selected", "selected_whole_vocab"):
        from tip_verl.core.selected_logits import selected_token_logprobs

        weight = model.lm_head.weight
        whole = weight.shape[0] if way == "selected_whole_vocab" else None  # one (V, H) float32 sum, as before
        logp, _ = selected_token_logprobs(
            hidden, weight, selected, batch["labels"], chunk_size=chunk_size, vocab_chunk_size=whole
        )  # (N,)
        return -(advantages[selected] * logp).sum() / n_selected
    raise ValueError(f"unknown way {way!r}; choose one of {WAYS}")


class PeakMeter:
    """Peak memory above the bare process: CUDA allocator counters, or peak RSS on CPU."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")
        gc.collect()
        if self.cuda:
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_kib("VmRSS") * 1024
            self.base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.exact = True

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            return
        if not reset_peak_rss():
            self.exact = False  # falls back to ru_maxrss, which cannot be reset (includes the build)

    def peak(self) -> dict:
        if self.cuda:
            self.torch.cuda.synchronize()
            return dict(
                peak_gib=(self.torch.cuda.max_memory_allocated() - self.base) / GIB,
                reserved_gib=self.torch.cuda.max_memory_reserved() / GIB,
            )
        if self.exact:
            return dict(peak_gib=(rss_kib("VmHWM") * 1024 - self.base) / GIB)
        return dict(peak_gib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base) / GIB)


ADAMW_IMPLEMENTATIONS = ("foreach", "fused", "for_loop")


def make_adamw(model, implementation: str):
    """torch's AdamW in one of its implementations: `foreach` (torch's default on CUDA: each update op runs
    over all parameters at once, with parameter-sized temporaries), `fused` (one kernel, CUDA), `for_loop`."""
    import torch

    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"AdamW implementation must be one of {ADAMW_IMPLEMENTATIONS}; got {implementation!r}")
    flags = dict(foreach=implementation == "foreach", fused=implementation == "fused" or None)
    return torch.optim.AdamW(model.parameters(), lr=1e-6, **flags)


def worker(spec: dict) -> dict:
    """Build the model and batch of `spec`, run the step phases, return peaks (GiB) and fastest times (s)."""
    import torch

    torch.manual_seed(0)
    device, way = spec["device"], spec["way"]
    # one step of the tiny model first: the libraries and kernels this way loads on first use stay
    # below the baseline, so the peak is the step's memory alone
    tiny = build_model("tiny", 1, getattr(torch, spec["dtype"]), device)
    step_loss(way, tiny, make_batch(SHAPES["tiny"]["vocab_size"], 16, 0.5, device), 8).backward()
    del tiny
    meter = PeakMeter(device)
    model = build_model(spec["shape"], spec["layers"], getattr(torch, spec["dtype"]), device)
    batch = make_batch(SHAPES[spec["shape"]]["vocab_size"], spec["T"], spec["ratio"], device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_adamw(model, spec.get("adamw", "foreach")) if spec["optimizer"] else None
    result = {**spec, "n_selected": int(batch["selected"].sum()), "n_params": n_params}
    for phase, opt in [("", None)] + ([("opt_", optimizer)] if optimizer else []):
        if opt is not None:
            # the first AdamW step creates its state after the backward; in a run it is there all step long
            step_loss(way, model, batch, spec["chunk_size"]).backward()
            opt.step()
            model.zero_grad(set_to_none=True)
        meter.reset()
        times = []
        for _ in range(spec["steps"]):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step_loss(way, model, batch, spec["chunk_size"])
            loss.backward()
            if opt is not None:
                opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
            del loss
        result.update({phase + k: v for k, v in meter.peak().items()})
        result[phase + "step_s"] = min(times)
    result["peak_exact"] = meter.exact
    return result


def runnable_ways(ways: list) -> list:
    """`naive` first, then the others asked for; `fused` dropped, with a message, where verl is missing."""
    ways = ["naive"] + [w for w in ways if w != "naive"]
    if "fused" in ways and importlib.util.find_spec("verl") is None:
        print("# skip way `fused`: verl is not installed (pip install verl==0.9.1); the other ways need only torch")
        ways.remove("fused")
    return ways


def extrapolate(points: dict, depth: int) -> dict:
    """Linear fit of a peak in the number of layers, from the smallest and largest count measured.

    Args:
        points: {layers: peak_gib} for at least two layer counts.
        depth: the layer count to extrapolate to.
    Returns:
        per_layer_gib (slope), at_depth_gib (the line at `depth`) and max_dev_gib, the largest
        distance of the other measured counts from the line (0.0 with two counts).
    """
    lo, hi = min(points), max(points)
    if lo == hi:
        raise ValueError(f"need two different layer counts to extrapolate; got only {lo} (set --layers)")
    slope = (points[hi] - points[lo]) / (hi - lo)
    line = lambda n: points[lo] + slope * (n - lo)  # noqa: E731
    return dict(
        per_layer_gib=slope,
        at_depth_gib=line(depth),
        max_dev_gib=max((abs(points[n] - line(n)) for n in points), default=0.0),
    )


def _fmt(x, width: int, digits: int) -> str:
    """A number right-aligned in `width` columns, or '-' where there is none."""
    return f"{x:>{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["qwen3-0.6b", "qwen3-1.7b"], choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, nargs="+", help="decoder layers to build (default: the model's 28)")
    p.add_argument("--T", type=int, nargs="+", default=ALL_T, help="tokens in the packed sequence")
    p.add_argument("--ratios", type=float, nargs="+", default=ALL_RATIOS, help="fractions of selected tokens")
    p.add_argument(
        "--ways", nargs="+", default=[w for w in WAYS if w != "selected_whole_vocab"], choices=WAYS,
        help="`naive` always runs (the baseline)",
    )
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--chunk-size", type=int, default=512, help="selected tokens per chunk (verl's fused path: 512)")
    p.add_argument("--steps", type=int, default=3, help="steps per phase; time is the fastest")
    p.add_argument("--no-optimizer", action="store_true", help="skip the second phase (step with AdamW)")
    p.add_argument("--adamw", default="foreach", choices=ADAMW_IMPLEMENTATIONS, help="torch's AdamW implementation")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per subprocess")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shape, 2 layers, T=256, ratio 0.5")
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument(
        "--report", nargs="+", metavar="JSON",
        help="run nothing: print the LM head's share and the extrapolation from the --json files of earlier runs",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    if a.report:
        rows = [r for path in a.report for r in json.load(open(path))]
        report_head_share(rows)
        report_extrapolation(rows)
        return 0
    if a.quick:
        a.shapes, a.layers, a.T, a.ratios, a.steps = ["tiny"], [2], [256], [0.5], 1
    ways = runnable_ways(a.ways)

    print(f"# load average at start: {os.getloadavg()}", flush=True)
    print(
        f"# device={a.device} dtype={a.dtype} chunk_size={a.chunk_size} steps={a.steps} threads={a.threads} "
        f"gradient checkpointing on; opt_ columns: the same step with AdamW (state included)", flush=True
    )
    hdr = (
        f"{'shape':>10} {'L':>2} {'T':>5} {'way':>8} {'ratio':>5} {'N':>5} {'peak GiB':>8} {'/naive':>6} "
        f"{'s/step':>7} {'/naive':>6} {'opt GiB':>7} {'/naive':>6} {'opt s':>7}"
    )
    print(hdr, flush=True)
    rows = []
    for shape in a.shapes:
        for T in a.T:
            for layers in a.layers or [SHAPES[shape]["num_hidden_layers"]]:
                base = None
                for way in ways:
                    for ratio in [1.0] if way in RATIO_FREE else a.ratios:
                        spec = dict(
                            shape=shape, layers=layers, T=T, way=way, ratio=ratio, device=a.device,
                            dtype=a.dtype, chunk_size=a.chunk_size, steps=a.steps, optimizer=not a.no_optimizer,
                            adamw=a.adamw,
                        )
                        try:
                            r = run_worker(__file__, spec, a.threads)
                        except RuntimeError as e:
                            print(f"# {shape} L={layers} T={T} ratio={ratio}: {e}", flush=True)
                            continue
                        if way == "naive":
                            base = r
                        rel = lambda k: r[k] / base[k] if base and k in r else "-"  # noqa: E731
                        r.update(mem_ratio=rel("peak_gib"), time_ratio=rel("step_s"), opt_mem_ratio=rel("opt_peak_gib"))
                        rows.append(r)
                        print(
                            f"{shape:>10} {layers:>2} {T:>5} {way:>8} {ratio if way not in RATIO_FREE else '-':>5} "
                            f"{r['n_selected']:>5} {r['peak_gib']:>8.3f} {_fmt(r['mem_ratio'], 6, 3)} "
                            f"{r['step_s']:>7.2f} {_fmt(r['time_ratio'], 6, 2)} "
                            f"{_fmt(r.get('opt_peak_gib', '-'), 7, 3)} {_fmt(r['opt_mem_ratio'], 6, 3)} "
                            f"{_fmt(r.get('opt_step_s', '-'), 7, 2)}" + ("" if r["peak_exact"] else " (ru_maxrss)"),
                            flush=True,
                        )
    report_head_share(rows)
    report_extrapolation(rows)
    print(f"# load average at end: {os.getloadavg()}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _key(r: dict) -> tuple:
    return (r["shape"], r["T"], r["way"], r["ratio"] if r["way"] not in RATIO_FREE else "-")


def report_head_share(rows: list) -> None:
    """The LM head's share of the naive step's peak: 1 - body / naive, at each measured (shape, L, T)."""
    peaks = {(r["shape"], r["layers"], r["T"], r["way"]): r for r in rows}
    lines = []
    for (shape, layers, T, way), naive in peaks.items():
        body = peaks.get((shape, layers, T, "body"))
        if way == "naive" and body:
            share = 1 - body["peak_gib"] / naive["peak_gib"]
            both = "opt_peak_gib" in naive and "opt_peak_gib" in body
            opt = 1 - body["opt_peak_gib"] / naive["opt_peak_gib"] if both else "-"
            lines.append(f"{shape:>10} {layers:>2} {T:>5} {share:>10.3f} {_fmt(opt, 10, 3)}")
    if lines:
        print("# LM head's share of the naive step's peak, 1 - body/naive (measured)")
        print(f"{'shape':>10} {'L':>2} {'T':>5} {'share':>10} {'with AdamW':>10}")
        print("\n".join(lines))


def expected_per_layer_gib(by_layers: dict) -> tuple:
    """What one more decoder layer should add to the peak, without the optimizer, at the two moments
    where a step peaks: in the LM head's backward, before any layer has its gradient (its parameters and
    the one (T, H) hidden state that gradient checkpointing keeps per layer), and at the end of the
    backward (its parameters and their gradients; the checkpoints are freed by then).

    Args:
        by_layers: {layers: result row} of one (shape, T, way, ratio) at two or more layer counts.
    Returns:
        (at_head_gib, at_end_gib) per layer.
    """
    lo, hi = min(by_layers), max(by_layers)
    row = by_layers[lo]
    itemsize = 2 if row["dtype"] == "bfloat16" else 4
    params = (by_layers[hi]["n_params"] - row["n_params"]) / (hi - lo)
    checkpoint = row["T"] * SHAPES[row["shape"]]["hidden_size"]
    return (params + checkpoint) * itemsize / GIB, 2 * params * itemsize / GIB


def report_extrapolation(rows: list) -> None:
    """Per-layer slope, linearity and the peak extrapolated to the model's depth, for every row measured at
    two or more layer counts below that depth; ratios to the naive way's extrapolated peak.

    A way whose peak is in the LM head's backward grows by a layer's parameters per layer, the `body` way
    (peak at the end of the backward) by its parameters and gradients: at depth the second can overtake
    the first, so the peak at depth is the larger of the way's own line and the body's."""
    series = {}
    for r in rows:
        series.setdefault(_key(r), {})[r["layers"]] = r
    fits = {}
    for key, by_layers in series.items():
        depth = SHAPES[key[0]]["num_hidden_layers"]
        if len(by_layers) < 2 or max(by_layers) >= depth:
            continue
        fits[key] = {
            k: extrapolate({n: r[k] for n, r in by_layers.items()}, depth)
            for k in ("peak_gib", "opt_peak_gib") if all(k in r for r in by_layers.values())
        }
        fits[key]["expected"] = expected_per_layer_gib(by_layers)
    if not fits:
        return

    def at_depth(key, k):
        own = fits[key].get(k)
        body = fits.get((key[0], key[1], "body", "-"), {}).get(k)
        if own is None:
            return "-", ""
        if body is not None and body["at_depth_gib"] > own["at_depth_gib"]:
            return body["at_depth_gib"], "body"
        return own["at_depth_gib"], "own"

    print("# EXTRAPOLATED to the full depth: each way's line peak(L_min) + per_layer * (L - L_min), per_layer from")
    print("# the smallest and largest L measured (max_dev: distance of the other measured L from it), or the body's")
    print("# line where that is higher (bound); expected per layer: parameters + one checkpointed (T, H) hidden")
    print("# state (peak in the LM head's backward), or parameters + gradients (peak at the end of the backward)")
    print(f"{'shape':>10} {'T':>5} {'way':>8} {'ratio':>5} {'GiB/layer':>9} {'exp head':>8} {'exp end':>7} "
          f"{'max_dev':>7} {'at depth':>8} {'bound':>5} {'/naive':>6} {'opt GiB':>7} {'/naive':>6}")
    for key, fit in fits.items():
        naive = (key[0], key[1], "naive", "-")
        peak, bound = at_depth(key, "peak_gib")
        opt, _ = at_depth(key, "opt_peak_gib")
        rel = lambda x, k: x / at_depth(naive, k)[0] if naive in fits and x != "-" else "-"  # noqa: E731
        print(
            f"{key[0]:>10} {key[1]:>5} {key[2]:>8} {key[3]:>5} {fit['peak_gib']['per_layer_gib']:>9.4f} "
            f"{fit['expected'][0]:>8.4f} {fit['expected'][1]:>7.4f} {fit['peak_gib']['max_dev_gib']:>7.4f} "
            f"{peak:>8.3f} {bound:>5} {_fmt(rel(peak, 'peak_gib'), 6, 3)} {_fmt(opt, 7, 3)} "
            f"{_fmt(rel(opt, 'opt_peak_gib'), 6, 3)}"
        )


if __name__ == "__main__":
    sys.exit(main())
