"""One prepared check for a GPU: CUDA correctness, selection speed, loss-stage and whole-step memory.

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check       # one GPU: about 4 minutes on an H200
    PYTHONPATH=. python benchmarks/gpu_check.py --tiny --out check    # CPU, tiny shapes (CI runs this)

Needs torch, transformers and tip_verl.core only (no verl, Ray or vLLM); liger-kernel, where installed, adds
the fused-linear reference rows. Writes OUT/gpu_check.json and OUT/gpu_check.md after every section, so a
run cut short keeps what it measured. Sections:

1. correctness   every selection rule picks the same tokens on the device as on the CPU for the same seed
                 (ratios 0.5 and 0.1); the selected-token LM head (log-probs, entropies) and the selected-token
                 divergence (reverse KL, forward KL, JSD) equal the naive full-logit computation in float64 on
                 the same (rounded) inputs, values and gradients, in float32 and bf16. Error: the largest
                 absolute difference over the largest magnitude of the reference; tolerances 1e-4 (float32)
                 and 2e-2 (bf16: the logits themselves are a bf16 matmul).
2. selection     each rule at ratios 0.5 and 0.1 on ragged batches of 512 x 4096 and 4096 x 8192 against one
                 stable torch.sort of the same keys (median of 10, after a warm-up).
3. loss stage    hidden (T, H) -> LM head (V 151,936) -> log-probs of the targets -> -(A * logp) over the
                 selected tokens -> backward to hidden and head, bf16, T 8192 and 32768, H 2048 and 4096:
                 `naive` (full bf16 logits, log_softmax, gather, mask), `selected` at ratios 1, 0.5 and 0.1,
                 `selected_whole_vocab` at 0.5 (one whole V x H float32 head-gradient sum, as before the
                 blocks) and `liger` (Liger's fused linear cross-entropy on all T tokens, the unselected ones
                 ignored). The same for the JSD to a teacher head at T 8192, H 2048: `naive_jsd`, `selected_jsd`
                 at 1, 0.5 and 0.1, `liger_jsd` (Liger's fused linear JSD, beta 0.5, the same objective; its
                 value is compared with ours at ratio 1). Peak: torch.cuda.max_memory_allocated above the inputs.
4. whole step    benchmarks/bench_step_memory.py's step at the Qwen3-1.7B shape, all 28 layers, T 8192, bf16,
                 gradient checkpointing, without and with AdamW (bf16 state): `naive`, `selected` 0.5 and 0.1,
                 `selected` 0.5 with one whole V x H float32 head-gradient sum, `body` (no LM head), each in a
                 fresh process; plus the per-GPU figure of an 8-way FSDP shard (below).

The 8-way FSDP figure (per GPU, full sharding) is derived from the measured peaks: each GPU keeps 1/8 of the
weights, gradients, AdamW state and the optimizer step's temporaries, and its own activations and LM-head
buffers whole. In the backward that is the peak without optimizer minus 7/8 of the bf16 weights plus 1/8 of
the bf16 state, the gradients live at that peak counted whole (an upper bound: FSDP reduce-scatters each
layer's gradient as it is made); at the optimizer step it is 1/8 of the peak with AdamW; the larger of the two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from bench_selection import ragged_batch
from fresh_process import run_worker
from tip_verl.core.selected_divergence import DIVERGENCE_LOSS_NAMES, selected_token_divergence
from tip_verl.core.selected_logits import selected_token_logprobs
from tip_verl.core.selection import SELECTION_RULES, SelectionInputs, select_tokens

GIB = 2**30
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
STEP_SCRIPT = str(Path(__file__).with_name("bench_step_memory.py"))


class Plan:
    """The shapes of each section: the GPU's, or tiny ones that a CPU runs in a minute."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.selection_batches = [(16, 64)] if tiny else [(512, 4096), (4096, 8192)]
        self.selection_repeats = 2 if tiny else 10
        self.head = dict(T=64, V=512, H=32, chunk=16) if tiny else dict(T=2048, V=32768, H=1024, chunk=256)
        self.vocab = 2048 if tiny else 151936
        self.loss_T = [256] if tiny else [8192, 32768]
        self.loss_H = [64] if tiny else [2048, 4096]
        self.jsd = (256, 64) if tiny else (8192, 2048)
        self.chunk = 64 if tiny else 512
        self.steps = 2 if tiny else 3
        self.step_spec = (
            dict(shape="tiny", layers=2, T=256, steps=1) if tiny else dict(shape="qwen3-1.7b", layers=28, T=8192, steps=2)
        )


# ---------------------------------------------------------------------------------------------- timing, memory


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(fn, device: str, steps: int) -> dict:
    """Fastest of `steps` calls (after one warm-up), and on CUDA the peak allocated above what was live before."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds = min(timed(fn, device) for _ in range(steps))
    out = dict(ms=seconds * 1e3)
    if device.startswith("cuda"):
        out["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
    return out


# ---------------------------------------------------------------------------------------------- 1. correctness


def check_selection_devices(device: str, plan: Plan) -> list:
    """Masks of every rule on `device` against the CPU's, same batch, same seed."""
    rows = []
    mask, entropy, divergence = ragged_batch(*plan.selection_batches[0])
    for rule in ["all", *sorted(SELECTION_RULES)]:
        for ratio in (0.5, 0.1):
            masks = []
            for dev in ("cpu", device):
                inputs = SelectionInputs(
                    mask.to(dev), entropy.to(dev), divergence.to(dev), 0.98, torch.Generator().manual_seed(0)
                )
                masks.append(select_tokens(rule, ratio, inputs).cpu())
            mismatched = int((masks[0] != masks[1]).sum())
            rows.append(dict(rule=rule, ratio=ratio, selected=int(masks[0].sum()), mismatched=mismatched,
                             ok=mismatched == 0))
    return rows


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0 where both vanish)."""
    scale = want.abs().max().item()
    diff = (got.double() - want.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def head_inputs(plan: Plan, device: str, dtype: torch.dtype, teacher: bool) -> dict:
    """Random LM-head inputs drawn in float64 on the CPU, rounded to `dtype`, on `device`."""
    shape = plan.head
    g = torch.Generator().manual_seed(0)
    T, V, H = shape["T"], shape["V"], shape["H"]
    tensors = dict(
        hidden=torch.randn(T, H, generator=g, dtype=torch.float64),
        weight=torch.randn(V, H, generator=g, dtype=torch.float64) * H**-0.5,
        targets=torch.randint(0, V, (T,), generator=g),
        selected=torch.rand(T, generator=g) < 0.5,
        adv=torch.randn(T, generator=g, dtype=torch.float64),
        ent_coef=torch.randn(T, generator=g, dtype=torch.float64),
    )
    if teacher:
        tensors["teacher_hidden"] = torch.randn(T, H, generator=g, dtype=torch.float64)
        tensors["teacher_weight"] = torch.randn(V, H, generator=g, dtype=torch.float64) * H**-0.5
    floats = ("hidden", "weight", "teacher_hidden", "teacher_weight")
    return {k: (v.to(dtype) if k in floats else v).to(device) for k, v in tensors.items()}


def naive_divergence(log_s: torch.Tensor, log_t: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-row divergence of (N, V) log-probabilities, float64 reference."""
    if loss == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if loss == "forward_kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    log_m = torch.logaddexp(log_s, log_t) - math.log(2.0)
    return 0.5 * (log_s.exp() * (log_s - log_m)).sum(-1) + 0.5 * (log_t.exp() * (log_t - log_m)).sum(-1)


def check_head(device: str, plan: Plan) -> list:
    """The selected-token head and divergence against float64 full logits on the same rounded inputs."""
    rows = []
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        for loss in ("logprobs", *DIVERGENCE_LOSS_NAMES):
            x = head_inputs(plan, device, dtype, teacher=loss != "logprobs")
            ours = {k: x[k].detach().clone().requires_grad_() for k in ("hidden", "weight")}
            ref = {k: x[k].detach().double().requires_grad_() for k in ("hidden", "weight")}
            sel, adv = x["selected"], x["adv"]
            if loss == "logprobs":
                logp, ent = selected_token_logprobs(
                    ours["hidden"], ours["weight"], sel, x["targets"], chunk_size=plan.head["chunk"],
                    return_entropy=True,
                )
                log_q = torch.log_softmax(ref["hidden"][sel] @ ref["weight"].t(), dim=-1)
                logp_ref = log_q.gather(-1, x["targets"][sel][:, None]).squeeze(-1)
                ent_ref = -(log_q.exp() * log_q).sum(-1)
                values = [("logp", logp, logp_ref), ("entropy", ent, ent_ref)]
                objective = lambda lp, en: (-(adv[sel] * lp) + x["ent_coef"][sel] * en).sum()  # noqa: E731
                objective(logp, ent).backward()
                objective(logp_ref, ent_ref).backward()
            else:
                div = selected_token_divergence(
                    ours["hidden"], ours["weight"], x["teacher_hidden"], x["teacher_weight"], sel, loss=loss,
                    chunk_size=plan.head["chunk"],
                )
                log_s = torch.log_softmax(ref["hidden"][sel] @ ref["weight"].t(), dim=-1)
                log_t = torch.log_softmax(
                    x["teacher_hidden"].double()[sel] @ x["teacher_weight"].double().t(), dim=-1
                )
                div_ref = naive_divergence(log_s, log_t, loss)
                values = [("divergence", div, div_ref)]
                (adv[sel] * div).sum().backward()
                (adv[sel] * div_ref).sum().backward()
            errors = {name: relative_error(got, want) for name, got, want in values}
            errors.update({f"grad_{k}": relative_error(ours[k].grad, ref[k].grad) for k in ours})
            worst = max(errors.values())
            rows.append(dict(function=loss, dtype=dtype_name, **errors, worst=worst, tolerance=TOLERANCE[dtype_name],
                             ok=worst <= TOLERANCE[dtype_name]))
    return rows


# ---------------------------------------------------------------------------------------------- 2. selection


def bench_selection(device: str, plan: Plan) -> list:
    rows = []
    for rollouts, tokens in plan.selection_batches:
        mask, entropy, divergence = (t.to(device) for t in ragged_batch(rollouts, tokens))

        def sort():
            return torch.sort(entropy, dim=-1, descending=True, stable=True)

        sort_ms = statistics.median(timed(sort, device) for _ in range(plan.selection_repeats + 1)) * 1e3
        for ratio in (0.5, 0.1):
            for rule in sorted(SELECTION_RULES):
                def run():
                    inputs = SelectionInputs(mask, entropy, divergence, 0.98, torch.Generator().manual_seed(0))
                    return select_tokens(rule, ratio, inputs)

                run()
                ms = statistics.median(timed(run, device) for _ in range(plan.selection_repeats)) * 1e3
                rows.append(dict(batch=f"{rollouts} x {tokens}", ratio=ratio, rule=rule, ms=ms, sort_ms=sort_ms,
                                 per_sort=ms / sort_ms))
    return rows


# ---------------------------------------------------------------------------------------------- 3. loss stage


def liger_modules():
    """Liger's fused linear cross-entropy and JSD, or (None, reason)."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except Exception as e:  # noqa: BLE001 - any import failure only drops the reference rows
        return None, f"{type(e).__name__}: {e}"
    return (LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD), None


def logprob_stage_ways(x: dict, plan: Plan, ratios: list, liger) -> dict:
    """Name -> a closure running one forward + backward of the log-prob loss stage."""
    hidden, weight, targets, adv = x["hidden"], x["weight"], x["targets"], x["adv"]

    def finish(loss):
        loss.backward()
        hidden.grad = weight.grad = None

    def naive():
        sel = x["selected"][0.5]
        logp = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        finish(-(adv * logp * sel).sum() / sel.sum())

    def selected(ratio, vocab_chunk_size=None):
        sel = x["selected"][ratio]
        logp, _ = selected_token_logprobs(
            hidden, weight, sel, targets, chunk_size=plan.chunk, vocab_chunk_size=vocab_chunk_size
        )
        finish(-(adv[sel] * logp).sum() / sel.sum())

    ways = {"naive": naive}
    ways.update({f"selected {r:g}": (lambda r=r: selected(r)) for r in ratios})
    ways["selected_whole_vocab 0.5"] = lambda: selected(0.5, weight.shape[0])
    if liger is not None:
        flce = liger[0](reduction="sum")
        labels = torch.where(x["selected"][0.5], targets, torch.full_like(targets, -100))
        ways["liger 0.5"] = lambda: finish(flce(weight, hidden, labels) / x["selected"][0.5].sum())
    return ways


def jsd_stage_ways(x: dict, plan: Plan, ratios: list, liger) -> tuple:
    """Name -> closure for the JSD loss stage, and the values of ours at ratio 1 and Liger's (same objective)."""
    hidden, weight, t_hidden, t_weight = x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"]
    values = {}

    def finish(loss, name):
        values[name] = loss.item()
        loss.backward()
        hidden.grad = weight.grad = None

    def naive():
        log_s = torch.log_softmax(hidden @ weight.t(), dim=-1)
        with torch.no_grad():
            log_t = torch.log_softmax(t_hidden @ t_weight.t(), dim=-1)
        log_m = torch.logaddexp(log_s, log_t) - math.log(2.0)
        jsd = 0.5 * (log_s.exp() * (log_s - log_m)).sum(-1) + 0.5 * (log_t.exp() * (log_t - log_m)).sum(-1)
        finish(jsd.float().mean(), "naive_jsd")

    def selected(ratio):
        sel = x["selected"][ratio]
        div = selected_token_divergence(hidden, weight, t_hidden, t_weight, sel, loss="jsd", chunk_size=plan.chunk)
        finish(div.sum() / sel.sum(), f"selected_jsd {ratio:g}")

    ways = {"naive_jsd": naive}
    ways.update({f"selected_jsd {r:g}": (lambda r=r: selected(r)) for r in ratios})
    if liger is not None:
        fljsd = liger[1](jsd_beta=0.5)
        ways["liger_jsd 1"] = lambda: finish(fljsd(hidden, weight, t_hidden, t_weight, None), "liger_jsd 1")
    return ways, values


def stage_inputs(T: int, H: int, V: int, device: str, ratios: list, teacher: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    x = dict(
        hidden=(torch.randn(T, H, generator=g) * 0.5).to(device, torch.bfloat16).requires_grad_(),
        weight=(torch.randn(V, H, generator=g) * H**-0.5).to(device, torch.bfloat16).requires_grad_(),
        targets=torch.randint(0, V, (T,), generator=g).to(device),
        adv=torch.randn(T, generator=g).to(device),
    )
    order = torch.randperm(T, generator=g)
    x["selected"] = {}
    for r in sorted(set(ratios) | {0.5}):
        sel = torch.zeros(T, dtype=torch.bool)
        sel[order[: max(1, round(r * T))]] = True
        x["selected"][r] = sel.to(device)
    if teacher:
        x["teacher_hidden"] = (torch.randn(T, H, generator=g) * 0.5).to(device, torch.bfloat16)
        x["teacher_weight"] = (torch.randn(V, H, generator=g) * H**-0.5).to(device, torch.bfloat16)
    return x


def bench_loss_stage(device: str, plan: Plan, liger) -> list:
    rows = []
    ratios = [1.0, 0.5, 0.1]
    cases = [("logprobs", T, H) for T in plan.loss_T for H in plan.loss_H] + [("jsd", *plan.jsd)]
    for stage, T, H in cases:
        x = stage_inputs(T, H, plan.vocab, device, ratios, teacher=stage == "jsd")
        if stage == "logprobs":
            ways, values = logprob_stage_ways(x, plan, ratios, liger), {}
        else:
            ways, values = jsd_stage_ways(x, plan, ratios, liger)
        base = None
        for name, fn in ways.items():
            try:
                r = measure(fn, device, plan.steps)
            except torch.cuda.OutOfMemoryError as e:
                r = dict(error=f"out of memory: {str(e).splitlines()[0]}")
                torch.cuda.empty_cache()
            way, _, ratio = name.partition(" ")
            row = dict(stage=stage, T=T, H=H, V=plan.vocab, way=way, ratio=float(ratio) if ratio else None, **r)
            if base is None:
                base = row
            for key in ("peak_gib", "ms"):
                if key in row and key in base:
                    row[f"{key}_per_naive"] = row[key] / base[key]
            if name in values:
                row["value"] = values[name]
            rows.append(row)
        del x
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- 4. whole step


def bench_whole_step(device: str, plan: Plan, adamw: str, whole_vocab: bool) -> dict:
    runs = [("naive", 1.0), ("body", 1.0), ("selected", 0.5), ("selected", 0.1)]
    runs += [("selected_whole_vocab", 0.5)] if whole_vocab else []
    rows = []
    for way, ratio in runs:
        spec = dict(plan.step_spec, way=way, ratio=ratio, device=device, dtype="bfloat16", chunk_size=plan.chunk,
                    optimizer=True, adamw=adamw)
        try:
            r = run_worker(STEP_SCRIPT, spec, threads=2 if plan.tiny else 8)
        except RuntimeError as e:
            r = dict(spec, error=str(e)[-400:])
        r["label"] = way + (f" {ratio:g}" if way.startswith("selected") else "")
        rows.append(r)
    naive = rows[0]
    for r in rows:
        for key in ("peak_gib", "opt_peak_gib", "step_s", "opt_step_s"):
            if key in r and key in naive:
                r[f"{key}_per_naive"] = r[key] / naive[key]
        if "opt_peak_gib" in r:
            weights, state = r["n_params"] * 2 / GIB, r["n_params"] * 4 / GIB  # bf16 weights, two bf16 moments
            in_backward = r["peak_gib"] - 7 / 8 * weights + state / 8
            r["fsdp8_gib"] = max(in_backward, r["opt_peak_gib"] / 8)
    for r in rows:
        if "fsdp8_gib" in r and "fsdp8_gib" in naive:
            r["fsdp8_per_naive"] = r["fsdp8_gib"] / naive["fsdp8_gib"]
    return dict(spec=dict(plan.step_spec, adamw=adamw), rows=rows)


# ---------------------------------------------------------------------------------------------- report


def fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def table(rows: list, columns: list) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    out = [f"# GPU check ({report['device_name']})", "", f"`{report['command']}`, {report['date']}, "
           f"torch {report['torch']}, {report['elapsed_s']:.0f} s", ""]
    sections = report["sections"]
    if "selection_devices" in sections:
        bad = [r for r in sections["selection_devices"] if not r["ok"]]
        out += ["## 1. Correctness", "", f"Selection rules, device against CPU: "
                f"{len(sections['selection_devices']) - len(bad)} of {len(sections['selection_devices'])} "
                "(rule, ratio) pairs pick identical tokens.", ""]
        if bad:
            out += [table(bad, ["rule", "ratio", "selected", "mismatched"]), ""]
    if "head" in sections:
        out += [table(sections["head"], ["function", "dtype", "logp", "entropy", "divergence", "grad_hidden",
                                         "grad_weight", "tolerance", "ok"]), ""]
    if "selection_speed" in sections:
        out += ["## 2. Selection against one torch.sort", "",
                table(sections["selection_speed"], ["batch", "ratio", "rule", "ms", "sort_ms", "per_sort"]), ""]
    if "loss_stage" in sections:
        out += ["## 3. Loss stage (bf16, V 151,936 on a GPU)", "",
                table(sections["loss_stage"], ["stage", "T", "H", "way", "ratio", "peak_gib", "peak_gib_per_naive",
                                               "ms", "ms_per_naive", "value", "error"]), ""]
    if "whole_step" in sections:
        step = sections["whole_step"]
        out += [f"## 4. Whole step ({step['spec']})", "",
                table(step["rows"], ["label", "n_selected", "peak_gib", "peak_gib_per_naive", "step_s",
                                     "opt_peak_gib", "opt_peak_gib_per_naive", "opt_step_s", "fsdp8_gib",
                                     "fsdp8_per_naive", "reserved_gib", "error"]), ""]
    for name, err in report["errors"].items():
        out += [f"Section `{name}` failed: `{err}`", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke run that CI can afford")
    p.add_argument("--device", help="default: cuda where available, else cpu")
    p.add_argument("--sections", nargs="+", default=["correctness", "selection", "loss_stage", "whole_step"],
                   choices=["correctness", "selection", "loss_stage", "whole_step"])
    p.add_argument("--adamw", default="foreach", choices=["foreach", "fused", "for_loop"],
                   help="torch's AdamW implementation in the whole step (foreach: torch's default on CUDA)")
    p.add_argument("--no-whole-vocab", action="store_true",
                   help="whole step: skip the run with one whole V x H float32 head-gradient sum")
    p.add_argument("--loss-T", type=int, nargs="+", help="loss stage: sequence lengths (default 8192 32768)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and a.tiny:
        p.error("--tiny is the CPU smoke run; drop it on a GPU (or pass --device cpu)")
    if not device.startswith("cuda") and not a.tiny:
        p.error("no GPU here: pass --tiny for the CPU smoke run")
    plan = Plan(a.tiny)
    plan.loss_T = a.loss_T or plan.loss_T
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    liger, liger_missing = liger_modules() if device.startswith("cuda") else (None, "CPU run (Liger needs Triton)")
    report = dict(
        command="python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        date=time.strftime("%Y-%m-%d"), torch=torch.__version__, python=platform.python_version(),
        device_name=torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({platform.machine()})",
        liger=liger_missing or "installed", sections={}, errors={}, elapsed_s=0.0,
    )
    start = time.perf_counter()
    jobs = {
        "correctness": [("selection_devices", lambda: check_selection_devices(device, plan)),
                        ("head", lambda: check_head(device, plan))],
        "selection": [("selection_speed", lambda: bench_selection(device, plan))],
        "loss_stage": [("loss_stage", lambda: bench_loss_stage(device, plan, liger))],
        "whole_step": [("whole_step", lambda: bench_whole_step(device, plan, a.adamw, not a.no_whole_vocab))],
    }
    for section in a.sections:
        for name, job in jobs[section]:
            print(f"# {name} ...", flush=True)
            try:
                report["sections"][name] = job()
            except Exception as e:  # noqa: BLE001 - one failed section must not cost the others' figures
                traceback.print_exc()
                report["errors"][name] = f"{type(e).__name__}: {e}"
            report["elapsed_s"] = time.perf_counter() - start
            (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
            (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    correct = all(r["ok"] for name in ("selection_devices", "head") for r in report["sections"].get(name, []))
    return 0 if correct and not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
