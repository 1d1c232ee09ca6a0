"""End to end: verl's own trainer (``verl.trainer.main_ppo``, V1) on CPU through tip-verl's CPU mode.

Runs ``examples/run_tiny_cpu.sh`` (tiny student/teacher, FSDP2 on 2 gloo ranks, verl's vLLM rollout (2
replicas) and vLLM teacher on vLLM's CPU build, ``tip_opd`` + ``tip_sync``) and reads verl's file-logger metrics:

1. 2 steps with a checkpoint at each: steps complete, ``tip/`` metrics are sane, rollout and trainer log-probs
   agree at both steps (the rollout engine starts from random weights, ``load_format=dummy``: the weights it
   samples with at step 1 came from verl's first sync, those of step 2 from the sync after the first update),
   and the run removed the ``/dev/shm`` segments its vLLM processes left;
2. resume from that checkpoint for a 3rd step, with the answer gate on the teacher's record
   (``algorithm.tip.answer_teacher=confirm_on_record``, a record planted in the checkpoint) and the rollout dump
   on: the trainer restores the record, finds the answers after the marker in the responses, adds the step's
   accepted answers to the record it saves, and the teacher keeps no answer token it would not write itself;
3. twice with verl patched to compute logits only at the selected tokens (``SELECTED_ONLY_RUNS``);
4. one step of the loss route (verl's ``grpo`` with a ``tip_k3`` distillation loss and the task reward) with the
   answer gate: the trainer judges the answers and the actor's loss receives exactly the answer tokens it handed
   to the checker.

About 15-18 minutes on 2 (shared) cores; those tests are marked ``e2e`` (select or skip with ``-m e2e`` /
``-m "not e2e"``). Fast checks alongside: CPU mode stays off unless asked for and stops at start-up, naming the
fix, when vLLM's CPU build is missing or a CUDA torchvision would break it; the ``/dev/shm`` cleanup removes the
segments of its command's processes and no others; the upstream patch applies to the installed verl.
"""

import importlib.metadata
import json
import math
import os
import subprocess
import sys

import pytest
from tiny_runs import SYNCED_MAX_DIFF, by_step, run_tiny
from verl_patching import apply_to_copy_of_installed_verl

from tip_verl.cpu import shm, vllm_cpu
from tip_verl.verl_ext.trainer import ANSWER_RECORD_FILE

TIP_RATIO = 0.5
BACKEND_PATCH = "verl-0.9.1-cpu-process-group-backend.diff"
REMOVED_LINE = "tip_verl.cpu.shm: removed "


def removed_segments(log: str) -> list[str]:
    """The /dev/shm segments ``tip_verl.cpu.shm`` reported removing at the end of a run's log."""
    lines = [line for line in log.splitlines() if line.startswith(REMOVED_LINE)]
    return lines[-1].split(": ", 2)[2].split() if lines else []


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
    record = json.loads((out_dir / "checkpoints" / "global_step_2" / ANSWER_RECORD_FILE).read_text())
    assert record == {"accepted": 0, "refuted": 0}, "answer_teacher=always keeps no record"
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
    # vLLM starts from random weights (load_format=dummy): step 1 samples with the weights of verl's first sync,
    # step 2 with those trained in step 1; each time the trainer recomputes the same log-probs.
    for step in (1, 2):
        assert steps[step]["training/rollout_probs_diff_max"] < SYNCED_MAX_DIFF, step


@pytest.mark.e2e
def test_run_removes_its_shared_memory_segments(synced_run):
    out_dir, _ = synced_run
    removed = removed_segments((out_dir / "first.log").read_text())
    assert any(name.startswith("psm_") for name in removed), "vLLM's message queues are left behind by Ray's kill"
    assert not [name for name in removed if (shm.SHM_DIR / name).exists()]


@pytest.mark.e2e
def test_resume_from_checkpoint_with_the_answer_gate(synced_run, tiny_dir):
    out_dir, _ = synced_run
    planted = {"accepted": 1000, "refuted": 900}  # a teacher caught refuting 90% of the accepted answers
    (out_dir / "checkpoints" / "global_step_2" / ANSWER_RECORD_FILE).write_text(json.dumps(planted))
    records = run_tiny(
        tiny_dir,
        out_dir,
        out_dir / "resumed.jsonl",
        "trainer.total_training_steps=3",
        f"trainer.rollout_data_dir={out_dir / 'rollouts'}",
        "+algorithm.tip.answer_teacher=confirm_on_record",
        "+algorithm.tip.answer_marker='='",  # a word of the tiny vocabulary, sampled now and then
    )
    assert [record["step"] for record in records] == [3], "must resume after step 2, not start over"
    assert (out_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    metrics = records[0]["data"]
    assert metrics["tip/answer/gated"] == 1.0 and 0.0 <= metrics["tip/answer/found_fraction"] <= 1.0
    rollouts = [json.loads(line) for line in (out_dir / "rollouts" / "3.jsonl").read_text().splitlines() if line]
    assert metrics["tip/answer/found_fraction"] == pytest.approx(
        sum(any(r["tip_answer"]) for r in rollouts) / len(rollouts))
    accepted = refuted = 0
    for rollout in rollouts:
        assert "=" in rollout["output"] or not rollout["tip_answer_tokens"], "an answer only after the marker"
        teacher_logp = [reward + old for reward, old in zip(rollout["tip_teacher_reward"], rollout["tip_old_log_prob"])]
        for answer, selected, logp in zip(rollout["tip_answer"], rollout["tip_selected"], teacher_logp):
            if answer and selected:  # kept for the teacher: an accepted rollout's token the teacher would write
                assert rollout["score"] > 0 and logp >= math.log(0.5) - 1e-6
        if rollout["score"] > 0 and any(rollout["tip_answer"]):
            accepted += 1
            refuted += any(a and logp < math.log(0.5) for a, logp in zip(rollout["tip_answer"], teacher_logp))
    saved = json.loads((out_dir / "checkpoints" / "global_step_3" / ANSWER_RECORD_FILE).read_text())
    assert saved == {"accepted": 1000 + accepted, "refuted": 900 + refuted}, "restored, then this step's answers added"
    assert metrics["tip/answer/record_refuted_share"] == pytest.approx((900 + refuted) / (1000 + accepted))


@pytest.mark.e2e
def test_loss_route_with_the_answer_gate(tiny_dir, tmp_path):
    records = run_tiny(
        tiny_dir,
        tmp_path,
        tmp_path / "loss_route.jsonl",
        "trainer.total_training_steps=1",
        "trainer.save_freq=1",
        "trainer.test_freq=-1",
        "trainer.resume_mode=disable",
        f"trainer.rollout_data_dir={tmp_path / 'rollouts'}",
        "data.max_response_length=10",  # more responses that hold the marker
        "trainer.v1.trainer_mode=tip_sync",
        "distillation.distillation_loss.loss_mode=tip_k3",
        "distillation.distillation_loss.loss_max_clamp=null",
        "actor_rollout_ref.actor.calculate_entropy=true",
        "+algorithm.tip.rule=soft_or",
        f"+algorithm.tip.ratio={TIP_RATIO}",
        "+algorithm.tip.answer_teacher=confirm_on_record",
        "+algorithm.tip.answer_marker='='",
        script_env={"ALGO": "grpo"},  # run_tiny_cpu.sh's loss-route hybrid: use_task_rewards=true
    )
    metrics = by_step(records)[1]
    assert metrics["tip/answer/gated"] == 1.0, "no accepted answer on record yet: the gate acts"
    rollouts = [json.loads(line) for line in (tmp_path / "rollouts" / "1.jsonl").read_text().splitlines() if line]
    answer_tokens = sum(rollout["tip_answer_tokens"] for rollout in rollouts)
    response_tokens = sum(rollout["tip_response_tokens"] for rollout in rollouts)
    # One mini-batch and epoch: the loss's share is the step's. Every answer token went to the checker.
    assert metrics["actor/tip_loss/answer_handed_fraction"] == pytest.approx(answer_tokens / response_tokens)
    assert 0.0 <= metrics["actor/tip_loss/answer_kept_fraction"] <= metrics["actor/tip_loss/answer_handed_fraction"]
    assert math.isfinite(metrics["actor/distillation/loss"]) and math.isfinite(metrics["actor/pg_loss"])
    accepted = sum(rollout["score"] > 0 and rollout["tip_answer_tokens"] > 0 for rollout in rollouts)
    saved = json.loads((tmp_path / "checkpoints" / "global_step_1" / ANSWER_RECORD_FILE).read_text())
    assert saved["accepted"] == accepted and 0 <= saved["refuted"] <= accepted


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


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, CPU mode loaded as the example scripts load it, ``env`` on top."""
    base = {key: value for key, value in os.environ.items() if key != "TIP_VERL_CPU"}
    base["VERL_USE_EXTERNAL_MODULES"] = "tip_verl.cpu.plugin"
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=300)


def test_cpu_mode_is_off_unless_requested():
    """Platform and vLLM shims exist in CPU mode only: outside it verl sees no distribution `vllm` (vLLM's CPU
    build installs as vllm-cpu), vLLM keeps its oneDNN prepacking and the batch invariance that verl's
    full_determinism asks for (VLLM_BATCH_INVARIANT=1, GPU kernels only)."""
    check = (
        "import importlib.metadata, verl\n"
        "from verl.utils.device import get_device_name\n"
        "from vllm import _custom_ops, envs\n"
        "try:\n"
        "    version = importlib.metadata.version('vllm')\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    version = None\n"
        "print(get_device_name(), version, _custom_ops._supports_onednn, envs.VLLM_BATCH_INVARIANT)\n"
    )
    off = run_python(check, VLLM_BATCH_INVARIANT="1")
    on = run_python(check, TIP_VERL_CPU="1", VLLM_BATCH_INVARIANT="1")
    cpu_build = importlib.metadata.version(vllm_cpu.VLLM_CPU_DISTRIBUTION)
    assert off.stdout.split()[-4:] == ["cuda", "None", "True", "True"], off.stderr[-2000:]
    assert on.stdout.split()[-4:] == ["cpu", f"{cpu_build}+cpu", "False", "False"], on.stderr[-2000:]


def test_cpu_mode_stops_without_vllm_cpu():
    result = run_python("import sys\nsys.modules['vllm'] = None  # as if not installed\nimport verl", TIP_VERL_CPU="1")
    assert result.returncode == 1
    assert "vLLM's CPU build is not installed: pip install -e \".[cpu]\"" in result.stderr, result.stderr[-2000:]


def test_cpu_mode_stops_on_a_cuda_torchvision(tmp_path):
    """PyPI's torchvision beside the CPU torch fails at import as below; vLLM's engine processes would die on it."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    result = run_python("import verl", TIP_VERL_CPU="1", PYTHONPATH=pythonpath)
    assert result.returncode == 1
    assert "operator torchvision::nms does not exist" in result.stderr, result.stderr[-2000:]
    assert vllm_cpu.ADDON_FIX in result.stderr
    assert run_python("import verl", PYTHONPATH=pythonpath).returncode == 0, "outside CPU mode nothing is checked"


LEAK = """
import multiprocessing, os, sys, time
from multiprocessing import resource_tracker, shared_memory
segment = shared_memory.SharedMemory(create=True, size=4096)
lock = multiprocessing.get_context("spawn").Lock()  # a named semaphore, sem.mp-*
for name, kind in ((segment._name, "shared_memory"), (lock._semlock.name, "semaphore")):
    resource_tracker.unregister(name, kind)  # as when Ray kills the resource tracker too
print(segment.name, "sem." + lock._semlock.name.lstrip("/"), flush=True)
time.sleep(float(sys.argv[1]))
os._exit(0)  # as a killed process: no unlink
"""


def test_shm_cleanup_removes_only_its_commands_segments(capfd):
    """The grandchild lives 0.5 s, far less than the poll interval: its segments are found when created."""
    from multiprocessing import shared_memory

    other = shared_memory.SharedMemory(create=True, size=4096)  # another process's segment, alive meanwhile
    try:
        command = ["bash", "-c", f'{sys.executable} -c "$0" 0.5; exit $?', LEAK]  # python: a grandchild
        status = shm.run_and_clean(command, poll_s=600)
        out, err = capfd.readouterr()
        leaked = out.split()[-2:]
        assert status == 0
        assert not [name for name in leaked if (shm.SHM_DIR / name).exists()], "the leaked segments must go"
        assert (shm.SHM_DIR / other.name).exists(), "a segment of no process of the command stays"
        assert removed_segments(err) == sorted(leaked)
    finally:
        other.close()
        other.unlink()


def test_backend_patch_applies_to_installed_verl(tmp_path):
    relative = "verl/utils/distributed.py"
    apply_to_copy_of_installed_verl(BACKEND_PATCH, [relative], tmp_path)
    target = tmp_path / relative
    patched = target.read_text()
    assert 'backend = backend or default_process_group_backend()' in patched
    assert 'return "cpu:gloo"' in patched
