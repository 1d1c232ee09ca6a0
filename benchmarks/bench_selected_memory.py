"""Peak memory and time of the loss stage: full-token vs. selected-token LM head.

One step of the loss stage is: hidden (T, H) -> LM head (V, H) -> log-softmax ->
log-prob of the target -> per-token policy-gradient style loss -> backward to
hidden and to the head weight. Three ways are compared:

  full    the naive way: logits for all T tokens, log_softmax, gather, mask
          with the selection mask (what a trainer does when it drops tokens
          only in the loss).
  gather  select first: the same naive code on hidden[selected] only
          (standard autograd keeps the N x V log-softmax for backward).
  tip     tip_verl.core.selected_logits.selected_token_logprobs: selected
          tokens only, in chunks of --chunk-size, logits recomputed in backward.
  verl    verl 0.9.1's own chunked path (FusedLinearForPPO, torch backend,
          chunks of 512, what `use_fused_kernels` with the torch backend runs):
          all T tokens, no full logits tensor; masked afterwards.

`full` and `verl` do not depend on the ratio and run once per (T, V).

--divergence compares, instead, the loss route's full-vocabulary reverse KL to a
teacher head (V, H) without grad, averaged over the selected tokens:

  kl_full  the naive way: student and teacher logits for all T tokens,
           log_softmax, KL(pS || pT) per token, masked (the baseline).
  kl_tip   tip_verl.core.selected_divergence.selected_token_divergence:
           selected tokens only, in chunks of --chunk-size, both models'
           logits recomputed in backward.

Each (method, T, V, ratio) runs in a fresh subprocess. The subprocess builds its
inputs, resets the kernel's peak-RSS counter (/proc/self/clear_refs, value 5),
records its current RSS as the baseline, runs --steps steps, and reports
peak RSS (VmHWM, the counter behind getrusage's ru_maxrss) minus the baseline.
If the counter cannot be reset, it falls back to ru_maxrss after minus
ru_maxrss before (noted in the output). glibc is told to serve every
allocation above 128 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors
leave the RSS at once and the peak is the peak of live memory.

Time per step is the fastest of the --steps steps. Both memory and time are
reported as ratios to the `full` method at the same T and V.

H is small by default (256) so the largest case (T=8192, V=152k) fits in
~12 GiB of RAM: the loss-stage buffers scale with T x V, not H; H only changes
the matmul cost (so time ratios at real H lean more towards the matmuls).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from fresh_process import reset_peak_rss, rss_kib, run_worker

ALL_T = [2048, 8192]
ALL_V = [32000, 152064]
ALL_RATIOS = [1.0, 0.5, 0.2, 0.1]
METHODS = ["full", "gather", "tip", "verl"]
DIVERGENCE_METHODS = ["kl_full", "kl_tip"]
RATIO_FREE = ("full", "verl", "kl_full")


def worker(spec: dict) -> dict:
    import gc

    import torch

    torch.manual_seed(0)
    T, V, H, ratio = spec["T"], spec["V"], spec["H"], spec["ratio"]
    dtype = getattr(torch, spec["dtype"])
    method = spec["method"]

    hidden = torch.randn(T, H, dtype=dtype).mul_(0.5).requires_grad_()
    weight = torch.randn(V, H, dtype=dtype).mul_(H**-0.5).requires_grad_()
    targets = torch.randint(0, V, (T,))
    n_sel = max(1, round(ratio * T))
    selected = torch.zeros(T, dtype=torch.bool)
    selected[torch.randperm(T)[:n_sel]] = True
    adv = torch.randn(T, dtype=torch.float32)
    if method.startswith("kl_"):
        teacher_hidden = torch.randn(T, H, dtype=dtype).mul_(0.5)
        teacher_weight = torch.randn(V, H, dtype=dtype).mul_(H**-0.5)

    if method == "tip":
        from tip_verl.core.selected_logits import selected_token_logprobs
    if method == "kl_tip":
        from tip_verl.core.selected_divergence import selected_token_divergence
    if method == "verl":
        from verl.utils.experimental.torch_functional import FusedLinearForPPO

        fused = FusedLinearForPPO(chunk_size=512, impl_backend="torch")

    def step():
        if method == "full":
            logp = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
            m = selected.to(logp.dtype)
            loss = -(adv * logp * m).sum() / m.sum()
        elif method == "gather":
            h = hidden[selected]
            logp = torch.log_softmax(h @ weight.t(), dim=-1).gather(-1, targets[selected][:, None]).squeeze(-1)
            loss = -(adv[selected] * logp).sum() / n_sel
        elif method == "kl_full":
            log_s = torch.log_softmax(hidden @ weight.t(), dim=-1)
            with torch.no_grad():
                log_t = torch.log_softmax(teacher_hidden @ teacher_weight.t(), dim=-1)
            kl = (log_s.exp() * (log_s - log_t)).sum(-1)
            m = selected.to(kl.dtype)
            loss = (kl * m).sum() / m.sum()
        elif method == "kl_tip":
            kl = selected_token_divergence(
                hidden[None], weight, teacher_hidden[None], teacher_weight, selected[None],
                loss="reverse_kl", chunk_size=spec["chunk_size"],
            )
            loss = kl.sum() / n_sel
        elif method == "verl":
            logp, _ = fused(hidden, weight, targets)
            m = selected.to(logp.dtype)
            loss = -(adv * logp * m).sum() / m.sum()
        else:  # tip
            logp, _ = selected_token_logprobs(
                hidden[None], weight, selected[None], targets[None], chunk_size=spec["chunk_size"]
            )
            loss = -(adv[selected] * logp).sum() / n_sel
        loss.backward()
        hidden.grad = None
        weight.grad = None
        return float(loss)

    gc.collect()
    before_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = reset_peak_rss()
    base = rss_kib("VmRSS")
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if reset:
        peak_kib = rss_kib("VmHWM") - base
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_maxrss
    return {**spec, "n_sel": n_sel, "peak_mib": peak_kib / 1024, "step_s": min(times), "peak_reset": reset}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--T", type=int, nargs="+", default=ALL_T, help="sequence lengths (tokens), default 2048 8192")
    p.add_argument("--V", type=int, nargs="+", default=ALL_V, help="vocabulary sizes, default 32000 152064")
    p.add_argument("--ratios", type=float, nargs="+", default=ALL_RATIOS, help="fractions of selected tokens")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="`full` always runs (baseline)")
    p.add_argument("--H", type=int, default=256, help="hidden size (default 256, small to fit in RAM)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="hidden/head dtype")
    p.add_argument("--chunk-size", type=int, default=512, help="selected tokens per chunk for `tip`")
    p.add_argument("--steps", type=int, default=3, help="steps per configuration; time is the fastest")
    p.add_argument("--threads", type=int, default=2, help="torch threads per subprocess")
    p.add_argument("--max-gib", type=float, default=12.0, help="skip configurations estimated above this")
    p.add_argument("--quick", action="store_true", help="small subset: T=2048, V=32000, ratios 1 0.5 0.1")
    p.add_argument(
        "--divergence", action="store_true",
        help="compare the full-vocabulary reverse KL to a teacher instead: kl_full (baseline) vs. kl_tip",
    )
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    if a.quick:
        a.T, a.V, a.ratios = [2048], [32000], [1.0, 0.5, 0.1]

    nbytes = 2 if a.dtype == "bfloat16" else 4
    methods = DIVERGENCE_METHODS if a.divergence else ["full"] + [m for m in a.methods if m != "full"]
    rows = []
    print(f"# load average at start: {os.getloadavg()}", flush=True)
    print(f"# H={a.H} dtype={a.dtype} chunk_size={a.chunk_size} steps={a.steps} threads={a.threads}", flush=True)
    hdr = f"{'T':>6} {'V':>7} {'ratio':>5} {'method':>7} {'N':>5} {'peak MiB':>9} {'mem/full':>8} {'s/step':>7} {'time/full':>9}"
    print(hdr)
    for T in a.T:
        for V in a.V:
            # naive full-token step: about four T x V buffers live at its peak (eight with a teacher)
            est_gib = (8 if a.divergence else 4) * T * V * nbytes / 2**30
            if est_gib > a.max_gib:
                print(f"skip T={T} V={V}: full-token estimate {est_gib:.1f} GiB > --max-gib {a.max_gib}")
                continue
            base = None
            for method in methods:
                for ratio in [1.0] if method in RATIO_FREE else a.ratios:
                    spec = dict(
                        method=method, T=T, V=V, H=a.H, ratio=ratio, dtype=a.dtype,
                        chunk_size=a.chunk_size, steps=a.steps,
                    )
                    r = run_worker(__file__, spec, a.threads)
                    if method == methods[0]:
                        base = r
                    r["mem_ratio"] = r["peak_mib"] / base["peak_mib"]
                    r["time_ratio"] = r["step_s"] / base["step_s"]
                    rows.append(r)
                    flag = "" if r["peak_reset"] else " (ru_maxrss delta)"
                    print(
                        f"{T:>6} {V:>7} {ratio if method not in RATIO_FREE else '-':>5} {method:>7} {r['n_sel']:>5} "
                        f"{r['peak_mib']:>9.1f} {r['mem_ratio']:>8.3f} {r['step_s']:>7.3f} {r['time_ratio']:>9.3f}{flag}",
                        flush=True,
                    )
    print(f"# load average at end: {os.getloadavg()}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
