"""The demo after a hard kill: the metrics log with a torn last line, the progress shown from the checkpoint's
step, plain progress lines when the output is not a terminal, the final (not best) accuracy as the result, and
the quadrant map's threshold lines at the thresholds the labels were computed with."""

import io
import json
import random
import re

import pytest
import torch
from matplotlib.axes import Axes

from tip_verl.cli import main
from tip_verl.core.answer_gate import AnswerRecord
from tip_verl.core.config import TipConfig
from tip_verl.core.scores import masked_quantile, quadrant_labels
from tip_verl.local.assets import load_role
from tip_verl.local.checkpoint import (
    checkpoint_step, load_checkpoint, read_metrics, save_checkpoint, truncate_metrics,
)
from tip_verl.local.loop import LoopConfig, train
from tip_verl.local.plots import quadrant_map, quadrant_thresholds
from tip_verl.local.progress import BarProgress, LineProgress
from tip_verl.local.report import summarize
from tip_verl.local.tasks import DEFAULT_TASK, get_task

TORN = '{"step": 4, "reward/mean": 0.1'  # what a kill in the middle of writing step 4's line leaves


def write_metrics(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "kl/teacher": 0.5}) + "\n" for s in steps) + tail)


def test_cut_back_drops_a_torn_last_line_with_one_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, range(4), tail=TORN)
    with pytest.warns(UserWarning, match="last line is incomplete") as caught:
        truncate_metrics(path, last_step=2)
    assert len(caught) == 1
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert path.read_text().endswith("}\n")  # the next appended line starts on its own line
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_reading_skips_a_torn_last_line_but_refuses_a_damaged_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, range(3), tail=TORN)
    with pytest.warns(UserWarning, match="last line is incomplete"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    path.write_text(path.read_text() + "\n" + json.dumps({"step": 5}) + "\n")
    with pytest.raises(ValueError, match="line 4 of 5 is not JSON"):
        read_metrics(tmp_path)


def test_cut_back_replaces_the_file_in_one_rename(tmp_path, monkeypatch):
    """A kill during the rewrite hits the temporary file; metrics.jsonl is whole until os.replace."""
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, range(5))
    before = path.read_text()
    seen_at_replace = []

    def replace(src, dst):
        seen_at_replace.append((path.read_text(), open(src).read()))
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr("tip_verl.local.checkpoint.os.replace", replace)
    with pytest.raises(KeyboardInterrupt):
        truncate_metrics(path, last_step=2)
    assert path.read_text() == before
    assert seen_at_replace[0][1].count("\n") == 3


def test_progress_starts_at_the_checkpoint_step_not_at_the_metric_lines(tmp_path):
    """The issue's case: checkpoint at 100, killed after step 111; resume to 200 with evaluations at 150 and 200."""
    student = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 100, student, torch.optim.AdamW(student.parameters()), random.Random(0), {})
    write_metrics(tmp_path / "metrics.jsonl", range(112))
    start = checkpoint_step(tmp_path)
    assert start == 100 and checkpoint_step(tmp_path / "empty") == 0

    shown = BarProgress(total=200, initial=start, desc="tip_opd", stream=io.StringIO())
    positions_at_eval = []
    for step in range(start + 1, 201):
        record = {"step": step, "kl/teacher": 0.5, **({"eval/accuracy": 0.2} if step % 50 == 0 else {})}
        shown.update(record)
        if "eval/accuracy" in record:
            positions_at_eval.append(shown.bar.n)
    assert positions_at_eval == [150, 200]
    assert shown.bar.n == shown.bar.total == 200
    shown.close()


def test_demo_resumes_after_a_kill_mid_line_and_logs_plain_lines(tmp_path, capsys):
    """The demo's own code path: checkpoint at step 2, killed while writing step 4's line (step 3 already logged);
    `tip-verl demo --resume` under a non-terminal stdout continues from step 3, one line per step, no repeats."""
    torch.set_num_threads(1)
    task = get_task(DEFAULT_TASK)
    teacher, _ = load_role(task, "teacher")
    student, _ = load_role(task, "student")
    config = LoopConfig(steps=2, eval_every=1000, eval_size=16, checkpoint_every=1000)
    assert train(config, tmp_path, teacher, student) == "completed"
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "kl/teacher": 0.5}) + "\n" + TORN)
    capsys.readouterr()

    with pytest.warns(UserWarning, match="last line is incomplete") as caught:
        assert main(["demo", "--out", str(tmp_path), "--resume", "--steps", "4"]) == 0
    assert len([w for w in caught if "incomplete" in str(w.message)]) == 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    progress_steps = [int(m) for m in re.findall(r"^\S+ \S+  step (\d+)/4", capsys.readouterr().out, re.M)]
    assert progress_steps == [3, 4]


def fake_run(total, start=0, eval_every=50):
    for step in range(start + 1 if start else 0, total + 1):
        record = {"step": step}
        if step > 0:
            record["kl/teacher"] = 1.0 / step
        if step % eval_every == 0 or step == total:
            record["eval/accuracy"] = step / (2 * total)
        yield record


def test_plain_lines_off_a_terminal_are_a_handful_not_one_per_step():
    stream = io.StringIO()
    shown = LineProgress(total=400, initial=0, desc="tip_opd add3_scratch", stream=stream)
    for record in fake_run(400):
        shown.update(record)
    lines = stream.getvalue().splitlines()
    # every 5% (20 steps) and at the evaluations: step 0, 20 lines, 4 evaluations between them
    assert len(lines) == 25, lines
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("tip_opd add3_scratch  step 0/400  acc 0.000")
    assert re.fullmatch(r"tip_opd add3_scratch  step 400/400  acc 0\.500  kl 0\.003  \d+ s", lines[-1])
    assert "step 50/400  acc 0.062" in lines[3]
    assert "acc" not in lines[1]  # step 20: not evaluated
    kl_20 = sum(1.0 / s for s in range(1, 21)) / 20  # mean over the steps since the previous line
    assert f"kl {kl_20:.3f}" in lines[1]


def test_plain_lines_of_a_resumed_run_start_after_its_checkpoint():
    stream = io.StringIO()
    shown = LineProgress(total=200, initial=100, desc="grpo", stream=stream)
    for record in fake_run(200, start=100):
        shown.update(record)
    steps = [int(re.search(r"step (\d+)/200", line).group(1)) for line in stream.getvalue().splitlines()]
    assert steps == [110, 120, 130, 140, 150, 160, 170, 180, 190, 200]


def test_summary_reports_the_last_evaluation_not_the_best():
    records = [
        {"step": 0, "eval/accuracy": 0.10, "eval/teacher_accuracy": 0.99},
        {"step": 1, "eval/accuracy": 0.30, "time/step": 1.0, "tokens/trained_fraction": 0.5,
         "tokens/nonzero_advantage_fraction": 0.5},
        {"step": 2, "eval/accuracy": 0.20, "time/step": 1.0, "tokens/trained_fraction": 0.5,
         "tokens/nonzero_advantage_fraction": 0.5},
        {"step": 3, "time/step": 1.0, "tokens/trained_fraction": 0.5, "tokens/nonzero_advantage_fraction": 0.5},
    ]
    summary = summarize(records, LoopConfig(), {"params": 1}, seconds=3.0)
    assert (summary["student_accuracy_final"], summary["student_accuracy_final_step"]) == (0.20, 2)
    assert not any("best" in key for key in summary)
    assert re.search(r"^student accuracy final +0\.200 \(step 2, last evaluation\)$", summary["table"], re.M)
    assert "0.300" not in summary["table"]


def scored_batch(tip: TipConfig) -> dict:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(6, 10)
    mask[:, 7:] = 0
    entropy = torch.rand(6, 10, generator=generator) * 2
    divergence = torch.randn(6, 10, generator=generator)  # k1 is signed
    quadrant = quadrant_labels(entropy, divergence, mask, tip.quadrant_quantile, tip.entropy_threshold,
                               tip.divergence_threshold)
    return {"response_mask": mask, "entropy": entropy, "divergence": divergence, "quadrant": quadrant,
            "selected": torch.rand(6, 10, generator=generator) > 0.5}


@pytest.mark.parametrize(
    "tip",
    [
        TipConfig(divergence="k1", quadrant_quantile=0.3),
        TipConfig(divergence="abs_k1", entropy_threshold=0.25, divergence_threshold=0.1),
        TipConfig(divergence="k3", quadrant_quantile=0.8, entropy_threshold=1.5),
    ],
    ids=["quantile", "absolute", "mixed"],
)
def test_quadrant_map_draws_the_thresholds_the_labels_used(tip, tmp_path, monkeypatch):
    batch = scored_batch(tip)
    mask = batch["response_mask"]
    expected_h = tip.entropy_threshold if tip.entropy_threshold is not None else masked_quantile(
        batch["entropy"], mask, tip.quadrant_quantile).item()
    expected_d = tip.divergence_threshold if tip.divergence_threshold is not None else masked_quantile(
        batch["divergence"], mask, tip.quadrant_quantile).item()
    assert quadrant_thresholds(batch, tip) == pytest.approx((expected_h, expected_d))
    valid = mask.bool()
    high_h = torch.isin(batch["quadrant"][valid], torch.tensor([1, 2]))
    assert torch.equal(high_h, batch["entropy"][valid] > expected_h)  # the labels were split there

    drawn = {"x": [], "y": [], "ylabel": []}
    for method, key in (("axvline", "x"), ("axhline", "y"), ("set_ylabel", "ylabel")):
        original = getattr(Axes, method)

        def spy(ax, value=0, *args, _original=original, _key=key, **kwargs):
            drawn[_key].append(value)
            return _original(ax, value, *args, **kwargs)

        monkeypatch.setattr(Axes, method, spy)
    quadrant_map(batch, tmp_path / "map.png", "test", tip)
    assert drawn["x"] == pytest.approx([expected_h]) and drawn["y"] == pytest.approx([expected_d])
    assert drawn["ylabel"][0].startswith(f"divergence D ({tip.divergence} estimate")
    assert (tmp_path / "map.png").stat().st_size > 0


def test_the_checkpoint_keeps_the_teachers_record_on_answers(tmp_path):
    student = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(student.parameters())
    write_metrics(tmp_path / "metrics.jsonl", range(4))
    save_checkpoint(tmp_path, 3, student, optimizer, random.Random(0), {}, AnswerRecord(accepted=40, refuted=7))
    restored = AnswerRecord()
    assert load_checkpoint(tmp_path, student, optimizer, random.Random(1), restored) == 3
    assert restored == AnswerRecord(accepted=40, refuted=7)
