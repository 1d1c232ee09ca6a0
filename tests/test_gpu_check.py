"""The prepared GPU check runs end to end at its tiny CPU shapes, so it cannot rot before a GPU comes."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_tiny_gpu_check_writes_every_section_and_its_correctness_holds(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"] == {}
    sections = report["sections"]
    assert set(sections) == {"selection_devices", "head", "selection_speed", "loss_stage", "whole_step"}
    assert all(row["ok"] for row in sections["selection_devices"] + sections["head"])
    assert {row["function"] for row in sections["head"]} == {"logprobs", "reverse_kl", "forward_kl", "jsd"}
    ways = {(row["way"], row["ratio"]) for row in sections["loss_stage"]}
    assert {("naive", None), ("selected", 0.5), ("selected_whole_vocab", 0.5), ("selected_jsd", 1.0)} <= ways
    steps = {row["label"]: row for row in sections["whole_step"]["rows"]}
    assert not any("error" in row for row in steps.values())
    # the selected way trains on round(0.5 * T) tokens, the naive way's loss reads all T of them
    assert steps["selected 0.5"]["n_selected"] == 128 and steps["naive"]["n_selected"] == 256
    assert "| selected 0.5 |" in (tmp_path / "gpu_check.md").read_text()
