"""End to end: verl's own trainer (``verl.trainer.main_ppo``, V1) on CPU through tip-verl's CPU mode.

Runs ``examples/run_tiny_cpu.sh`` (tiny student/teacher, FSDP2 on 2 gloo ranks, ``hf`` rollout and
teacher servers, ``tip_opd`` + ``tip_sync``) three times and reads verl's file-logger metrics:

1. 2 steps with a checkpoint at each: steps complete, ``tip/`` metrics are sane, and rollout and
   trainer log-probs agree after the first update (weights reached the rollout);
2. resume from that checkpoint for a 3rd step;
3. 2 GRPO steps with a top-k teacher loss and the rollout told to ignore weight updates: log-probs
   drift apart, and the teacher's top-k log-probs reach the loss.

About 5-7 minutes on 2 (shared) cores; those tests are marked ``e2e`` (select or skip with ``-m e2e`` /
``-m "not e2e"``). Fast checks alongside: CPU mode stays off unless asked for, the ``hf`` server's
prompt log-prob layout, and the upstream patch applying to the installed verl.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from verl_patching import apply_to_copy_of_installed_verl

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "run_tiny_cpu.sh"
RUN_TIMEOUT_S = 900
TIP_RATIO = 0.5

# Log-probs of the same tokens under the same weights agree to float32 rounding (~1e-8);
# one Adam step at lr 1e-3 moves them by far more than this.
SYNCED_MAX_DIFF = 1e-5
BACKEND_PATCH = "verl-0.9.1-cpu-process-group-backend.diff"


def run_tiny(
    tiny_dir: Path, out_dir: Path, metrics_path: Path, *overrides: str, script_env: dict | None = None
) -> list[dict]:
    """Run the example script with hydra ``overrides``; return the per-step metrics verl's file logger wrote."""
    env = {
        **os.environ,
        **(script_env or {}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the script's python3 is ours
        "TINY_DIR": str(tiny_dir),
        "OUT_DIR": str(out_dir),
        "VERL_FILE_LOGGER_PATH": str(metrics_path),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{metrics_path.stem}.log"
    with open(log_path, "w") as log:
        # Own session, so a timeout stops the trainer and its Ray cluster too, not only bash.
        process = subprocess.Popen(
            ["bash", str(SCRIPT), *overrides],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"run_tiny_cpu.sh took over {RUN_TIMEOUT_S} s; log: {log_path}")
    if returncode != 0:
        tail = log_path.read_text()[-6000:]
        pytest.fail(f"run_tiny_cpu.sh exited {returncode}; log tail:\n{tail}")
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def by_step(records: list[dict]) -> dict[int, dict]:
    return {record["step"]: record["data"] for record in records}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_world")


@pytest.fixture(scope="module")
def synced_run(tiny_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("synced")
    records = run_tiny(
        tiny_dir,
        out_dir,
        out_dir / "first.jsonl",
        "trainer.total_training_steps=2",
        "trainer.save_freq=1",
        "trainer.test_freq=2",
    )
    return out_dir, by_step(records)


@pytest.mark.e2e
def test_steps_complete_with_checkpoints(synced_run):
    out_dir, steps = synced_run
    assert sorted(steps) == [1, 2]
    assert (out_dir / "checkpoints" / "global_step_2" / "actor").is_dir()
    assert (out_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    for metrics in steps.values():
        assert metrics["actor/grad_norm"] > 0.0, "the policy must change every step (teacher signal)"


@pytest.mark.e2e
def test_teacher_and_tip_metrics_are_sane(synced_run):
    _, steps = synced_run
    for metrics in steps.values():
        assert "actor/distillation/loss" in metrics, "teacher log-probs must reach the actor"
        assert abs(metrics["tip/selected_fraction"] - TIP_RATIO) < 0.2
        assert metrics["tip/divergence/selected_mean"] >= 0.0, "k3 divergence is non-negative"
        quadrant_shares = [metrics[f"tip/quadrant/q{quadrant}_share"] for quadrant in (1, 2, 3, 4)]
        assert sum(quadrant_shares) == pytest.approx(1.0)


@pytest.mark.e2e
def test_trainer_weights_reach_the_rollout(synced_run):
    _, steps = synced_run
    # Step 2 samples with the weights trained in step 1; the trainer recomputes the same log-probs.
    assert steps[2]["training/rollout_probs_diff_max"] < SYNCED_MAX_DIFF


@pytest.mark.e2e
def test_resume_from_checkpoint(synced_run, tiny_dir):
    out_dir, _ = synced_run
    records = run_tiny(tiny_dir, out_dir, out_dir / "resumed.jsonl", "trainer.total_training_steps=3")
    assert [record["step"] for record in records] == [3], "must resume after step 2, not start over"
    assert (out_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


@pytest.fixture(scope="module")
def frozen_rollout_run(tiny_dir, tmp_path_factory) -> dict[int, dict]:
    """GRPO with a top-k forward-KL teacher loss, the rollout ignoring weight updates."""
    out_dir = tmp_path_factory.mktemp("frozen_rollout")
    records = run_tiny(
        tiny_dir,
        out_dir,
        out_dir / "frozen.jsonl",
        "trainer.total_training_steps=2",
        "trainer.save_freq=-1",
        "trainer.test_freq=-1",
        "+actor_rollout_ref.rollout.custom.ignore_weight_updates=true",
        "distillation.distillation_loss.loss_mode=forward_kl_topk",
        "distillation.distillation_loss.topk=8",
        script_env={"ALGO": "grpo"},
    )
    return by_step(records)


@pytest.mark.e2e
def test_rollout_drifts_without_weight_sync(synced_run, frozen_rollout_run):
    frozen = frozen_rollout_run
    _, synced = synced_run
    assert frozen[1]["training/rollout_probs_diff_max"] < SYNCED_MAX_DIFF, "same weights before any update"
    assert frozen[2]["training/rollout_probs_diff_max"] > 100 * max(
        synced[2]["training/rollout_probs_diff_max"], SYNCED_MAX_DIFF / 100
    )


@pytest.mark.e2e
def test_topk_teacher_logprobs_reach_the_loss(frozen_rollout_run):
    for metrics in frozen_rollout_run.values():
        assert metrics["actor/grad_norm"] > 0.0
        assert 0.0 < metrics["actor/distillation/teacher_mass"] <= 1.0, "teacher's top-8 probability mass"


SELECTED_PATCH = "verl-0.9.1-tip-selected-logprobs.patch"
FUSED_REMOVE_PADDING = (
    "actor_rollout_ref.model.use_remove_padding=true",
    "actor_rollout_ref.model.use_fused_kernels=true",
    "actor_rollout_ref.model.fused_kernel_options.impl_backend=torch",
)
HEAD_PROBE = "TIP_TEST_LM_HEAD_TOKENS"
UPDATE_EPOCHS = 2
SELECTED_ONLY_RUNS = {  # the two ways the actor update reads only the selected tokens: (overrides, script_env)
    "teacher_only": (["+algorithm.tip.mix=teacher_only"], {}),
    "preselect": (
        [
            "trainer.v1.trainer_mode=tip_sync",
            "distillation.distillation_loss.use_task_rewards=false",
            "+algorithm.tip.preselect=true",
        ],
        {"ALGO": "grpo"},
    ),
}


@pytest.fixture(scope="module", params=sorted(SELECTED_ONLY_RUNS))
def selected_lm_head_run(request, tiny_dir, tmp_path_factory) -> tuple[dict[int, dict], str]:
    """Pure OPD on the selected tokens with verl patched by the selected-logprobs patch: tip_opd with
    mix=teacher_only, or verl's grpo with its own k3 distillation loss and no task reward under preselect.

    verl is a patched copy of the installed package, first on PYTHONPATH for every process of the run. The test
    adds one print to its copy, in the patched forward: how many tokens the LM head ran on, of how many packed.
    """
    verl_copy = apply_to_copy_of_installed_verl(SELECTED_PATCH, None, tmp_path_factory.mktemp("patched_verl"))
    forward = verl_copy / "verl" / "models" / "transformers" / "dense_common.py"
    anchor = "        selected = tip_selected.to(device=hidden_states.device, dtype=torch.bool)\n"
    counts = "int(selected.sum()), selected.numel(), torch.is_grad_enabled()"
    probe = f'        print("{HEAD_PROBE}", {counts}, flush=True)\n'
    assert forward.read_text().count(anchor) == 1
    forward.write_text(forward.read_text().replace(anchor, anchor + probe))

    overrides, script_env = SELECTED_ONLY_RUNS[request.param]
    out_dir = tmp_path_factory.mktemp(f"selected_lm_head_{request.param}")
    records = run_tiny(
        tiny_dir,
        out_dir,
        out_dir / "selected.jsonl",
        "trainer.total_training_steps=2",
        "trainer.save_freq=-1",
        "trainer.test_freq=-1",
        "trainer.resume_mode=disable",
        f"actor_rollout_ref.actor.ppo_epochs={UPDATE_EPOCHS}",
        *FUSED_REMOVE_PADDING,
        *overrides,
        script_env={"PYTHONPATH": str(verl_copy), **script_env},
    )
    return by_step(records), (out_dir / "selected.log").read_text()


@pytest.mark.e2e
def test_patched_actor_computes_logits_only_at_the_selected_tokens(selected_lm_head_run):
    steps, log = selected_lm_head_run
    probes = [line.split(HEAD_PROBE)[1].split() for line in log.splitlines() if HEAD_PROBE in line]
    assert probes, "the patched selected-token forward never ran"
    assert all(grad == "True" for _, _, grad in probes), "only the update (with grad) carries tip_selected"
    head_tokens = sum(int(selected) for selected, _, _ in probes)
    assert all(int(selected) < int(packed) for selected, packed, _ in probes)
    # The LM head ran on exactly the tokens TIP selected (the selected fraction of all response tokens), once
    # per update epoch.
    rollouts = 4 * 4  # data.train_batch_size x rollout.n of run_tiny_cpu.sh
    selected = sum(m["tip/selected_fraction"] * m["response_length/mean"] * rollouts for m in steps.values())
    expected = UPDATE_EPOCHS * selected
    assert head_tokens == pytest.approx(expected, abs=1e-3)
    assert "no memory saved" not in log, "patched and configured: the trainer must not advise anything"
    for metrics in steps.values():
        assert metrics["actor/grad_norm"] > 0.0 and math.isfinite(metrics["actor/distillation/loss"])
        assert metrics["training/rollout_probs_diff_max"] < SYNCED_MAX_DIFF, "remove-padding forward on CPU is exact"


def test_cpu_mode_is_off_unless_requested():
    check = (
        "import verl\n"
        "from verl.utils.device import get_device_name\n"
        "from verl.workers.rollout.replica import RolloutReplicaRegistry\n"
        "print(get_device_name(), 'hf' in RolloutReplicaRegistry._registry)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TIP_VERL_CPU"}
    env["VERL_USE_EXTERNAL_MODULES"] = "tip_verl.cpu.plugin"
    off = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    on = subprocess.run(
        [sys.executable, "-c", check], env={**env, "TIP_VERL_CPU": "1"}, capture_output=True, text=True, timeout=300
    )
    assert off.stdout.split() == ["cuda", "False"], off.stderr[-2000:]
    assert on.stdout.split() == ["cpu", "True"], on.stderr[-2000:]


@pytest.mark.parametrize("temperature, top_k", [(0.7, -1), (1.0, 3), (0.0, -1)])
def test_sampled_logprobs_match_a_full_forward(temperature, top_k):
    from tip_verl.cpu.hf_generation import SamplingSettings, generate_with_logprobs
    from tip_verl.cpu.prepare import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, num_layers=1, seed=0).eval()
    prompt = tokenizer("<|user|> 3 + 4 = <|assistant|>")["input_ids"]
    torch.manual_seed(0)
    settings = SamplingSettings(max_tokens=6, temperature=temperature, top_k=top_k)
    ids, log_probs = generate_with_logprobs(model, prompt, settings, {tokenizer.eos_token_id})
    assert 1 <= len(ids) == len(log_probs) <= 6
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    scaled = logits / (temperature if temperature > 0 else 1.0)
    expected = torch.log_softmax(scaled, dim=-1).gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(torch.tensor(log_probs), expected, atol=1e-4, rtol=1e-4)
    if temperature == 0.0:
        assert ids == logits.argmax(dim=-1).tolist()
    if top_k > 0:
        assert all(torch.topk(row, top_k).values[-1] <= row[token] for row, token in zip(logits, ids))


def test_prompt_logprobs_follow_verl_teacher_layout():
    from tip_verl.cpu.hf_generation import prompt_logprobs
    from tip_verl.cpu.prepare import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, num_layers=1, seed=0).eval()
    ids = tokenizer("<|user|> 3 + 4 = <|assistant|> 7")["input_ids"]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    sampled_ids, sampled = prompt_logprobs(model, ids, num_top=0)
    assert len(sampled) == len(ids) and sampled_ids[-1] == [0] and sampled[-1] == [0.0]
    for position in range(len(ids) - 1):  # position j scores token j + 1
        assert sampled_ids[position] == [ids[position + 1]]
        assert sampled[position][0] == pytest.approx(float(expected[position, ids[position + 1]]), abs=1e-5)

    top_ids, top = prompt_logprobs(model, ids, num_top=3)
    assert len(top) == len(ids) and all(len(row) == 3 for row in top)
    assert top_ids[0][0] == int(expected[0].argmax()) and top[0] == sorted(top[0], reverse=True)


def test_backend_patch_applies_to_installed_verl(tmp_path):
    relative = "verl/utils/distributed.py"
    apply_to_copy_of_installed_verl(BACKEND_PATCH, [relative], tmp_path)
    target = tmp_path / relative
    patched = target.read_text()
    assert 'backend = backend or default_process_group_backend()' in patched
    assert 'return "cpu:gloo"' in patched
