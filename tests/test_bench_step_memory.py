"""benchmarks/bench_step_memory.py: the three ways of one actor step compute the same loss and gradients,
and its extrapolation in the number of layers."""

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    """The script as a module, with its folder importable as when it runs (it imports fresh_process)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    path = os.path.join(ROOT, "benchmarks", "bench_step_memory.py")
    spec = importlib.util.spec_from_file_location("bench_step_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _loss_and_grads(way, model, batch, chunk_size):
    model.zero_grad(set_to_none=True)
    loss = bench.step_loss(way, model, batch, chunk_size)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_three_ways_give_the_loss_and_gradients_of_the_naive_way_at_the_selected_tokens():
    torch.manual_seed(0)
    model = bench.build_model("tiny", 2, torch.float32, "cpu")
    batch = bench.make_batch(bench.SHAPES["tiny"]["vocab_size"], 24, 0.5, "cpu", seed=1)
    assert int(batch["selected"].sum()) == 12

    # independent route: the model's own logits, read at the selected tokens only
    logits = model(input_ids=batch["input_ids"]).logits[batch["selected"]].double()  # (N, V)
    targets = batch["labels"][batch["selected"]]
    logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    by_hand = -(batch["advantages"][batch["selected"]].double() * logp).mean()

    naive_loss, naive_grads = _loss_and_grads("naive", model, batch, 5)
    torch.testing.assert_close(naive_loss.double(), by_hand, rtol=1e-5, atol=1e-6)
    assert set(naive_grads) == {n for n, _ in model.named_parameters()}
    for way in ("selected", "selected_whole_vocab", "fused"):  # chunk_size 5: several chunks of the 12 selected
        loss, grads = _loss_and_grads(way, model, batch, 5)
        torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=1e-6, msg=way)
        assert set(grads) == set(naive_grads), way
        for name, grad in grads.items():
            torch.testing.assert_close(grad, naive_grads[name], rtol=1e-4, atol=1e-6, msg=f"{way}: {name}")


def test_selected_way_ignores_what_happens_at_unselected_tokens():
    torch.manual_seed(0)
    model = bench.build_model("tiny", 1, torch.float32, "cpu")
    batch = bench.make_batch(bench.SHAPES["tiny"]["vocab_size"], 16, 0.25, "cpu", seed=2)
    changed = dict(batch, advantages=batch["advantages"].masked_fill(~batch["selected"], 1e6))
    changed["labels"] = batch["labels"].masked_fill(~batch["selected"], 0)
    for way in ("naive", "selected"):
        torch.testing.assert_close(bench.step_loss(way, model, changed), bench.step_loss(way, model, batch))


def test_worker_reports_a_peak_and_a_time_for_both_phases():
    spec = dict(shape="tiny", layers=1, T=32, way="selected", ratio=0.5, device="cpu", dtype="bfloat16",
                chunk_size=8, steps=1, optimizer=True)
    r = bench.worker(spec)
    assert r["n_selected"] == 16
    assert r["peak_gib"] > 0 and r["opt_peak_gib"] > 0
    assert r["step_s"] > 0 and r["opt_step_s"] > 0


@pytest.mark.parametrize("implementation,foreach,fused", [("foreach", True, None), ("fused", False, True),
                                                         ("for_loop", False, None)])
def test_adamw_implementation_is_the_one_asked_for(implementation, foreach, fused):
    optimizer = bench.make_adamw(torch.nn.Linear(2, 2), implementation)
    assert (optimizer.defaults["foreach"], optimizer.defaults["fused"]) == (foreach, fused)
    with pytest.raises(ValueError, match="AdamW implementation must be one of"):
        bench.make_adamw(torch.nn.Linear(2, 2), "apex")


def test_optimizer_phase_is_measured_with_the_adamw_state_already_there(monkeypatch):
    optimizers, state_at_reset = [], []

    class RecordedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    reset = bench.PeakMeter.reset

    def recording_reset(meter):
        state_at_reset.append(sum(len(o.state) for o in optimizers))
        reset(meter)

    monkeypatch.setattr(torch.optim, "AdamW", RecordedAdamW)
    monkeypatch.setattr(bench.PeakMeter, "reset", recording_reset)
    spec = dict(shape="tiny", layers=1, T=16, way="naive", ratio=0.5, device="cpu", dtype="bfloat16",
                chunk_size=8, steps=1, optimizer=True)
    bench.worker(spec)
    n_params = len(list(optimizers[0].param_groups[0]["params"]))
    assert state_at_reset == [0, n_params]  # no state in the first phase, every parameter's in the second


def test_extrapolate_recovers_a_line_and_measures_a_bend():
    line = bench.extrapolate({2: 3.0, 4: 3.5, 6: 4.0}, 28)
    assert line["per_layer_gib"] == pytest.approx(0.25)
    assert line["at_depth_gib"] == pytest.approx(3.0 + 26 * 0.25)
    assert line["max_dev_gib"] == pytest.approx(0.0)
    bent = bench.extrapolate({2: 3.0, 4: 3.7, 6: 4.0}, 28)
    assert bent["max_dev_gib"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="--layers"):
        bench.extrapolate({2: 3.0}, 28)


def test_expected_per_layer_counts_parameters_and_a_checkpoint_or_at_the_end_parameters_and_gradients():
    rows = {L: dict(shape="tiny", T=100, dtype="bfloat16", n_params=1000 + 50 * L) for L in (1, 3)}
    at_head, at_end = bench.expected_per_layer_gib(rows)
    # 50 parameters + a 100 x 64 checkpointed hidden state, 2 bytes each; at the end 50 parameters + 50 gradients
    assert at_head == pytest.approx((50 + 100 * 64) * 2 / 2**30)
    assert at_end == pytest.approx(100 * 2 / 2**30)


def test_extrapolated_peak_is_the_body_line_where_that_is_higher(capsys):
    def row(way, layers, peak):
        return dict(shape="qwen3-0.6b", T=2048, way=way, ratio=1.0, layers=layers, dtype="bfloat16",
                    n_params=100 * layers, peak_gib=peak)

    # naive: 3 GiB + 0.1/layer, selected: 1 GiB + 0.03/layer, body: 0.7 GiB + 0.06/layer
    rows = [row(w, L, a + b * L) for L in (2, 4) for w, a, b in
            (("naive", 3.0, 0.1), ("selected", 1.0, 0.03), ("body", 0.7, 0.06))]
    bench.report_extrapolation(rows)
    out = {line.split()[2]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("qwen3")}
    assert float(out["naive"][8]) == pytest.approx(3.0 + 2.8) and out["naive"][9] == "own"
    assert float(out["selected"][8]) == pytest.approx(0.7 + 0.06 * 28) and out["selected"][9] == "body"
    assert float(out["selected"][10]) == pytest.approx((0.7 + 0.06 * 28) / 5.8, abs=1e-3)


def test_fused_way_is_skipped_with_a_message_where_verl_is_missing(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "verl" else find_spec(name, *a))
    assert bench.runnable_ways(["selected", "fused", "naive"]) == ["naive", "selected"]
    assert "verl is not installed" in capsys.readouterr().out
