"""Each GPU launch script's algorithm settings, run for real on CPU through ``examples/run_tiny_cpu.sh``.

``test_examples_compose.py`` shows that ``examples/run_qwen3_8b_to_1p7b_*.sh`` compose against verl's config.
Here each script's algorithm settings (``algorithm_overrides``: TIP rule, ratio, divergence, mix and coef, the
loss route's loss_mode, top-k, clamps and coefficient schedule, calculate_entropy, loss_agg_mode, tip_sync) are
appended to the tiny CPU run for 2 steps, and verl's metrics show that what the script asks of our code ran:

- advantage route (``tip_opd``): ``tip/selected_fraction`` at the script's ratio, quadrant and teacher-reward
  metrics finite;
- loss route (``loss_mode=tip_*``): verl's distillation loss and our ``tip_loss/`` metrics present and finite,
  the selection at the script's ratio, the schedule's coefficient multiplier at each step.

Only algorithm settings are appended; the hardware ones (Megatron, GPU counts, nodes, the vLLM engines' GPU
settings) stay the CPU run's, whose rollout and teacher are verl's vLLM engines too, on vLLM's CPU build. One run
per route (``GPU_STYLE_RUNS``) also takes the GPU scripts' batch and precision settings (``GPU_STYLE``:
remove-padding, gradient checkpointing, dynamic batch sizes, 2 mini-batches, 2 epochs, bf16), with verl's
deterministic rollouts, and is followed by a one-step plain twin (padded, one mini-batch and epoch, the same bf16):
their step-1 rollouts and per-token inputs agree (``assert_same_step_one``).

Each run writes verl's rollout dump (``trainer.rollout_data_dir``), to which ``tip_sync`` adds TIP's columns: the
selected count of every response is checked against ``max(1, floor(ratio * m_i))``, the reported selected fraction
against the step's selected over response tokens (on the loss route where one mini-batch makes them the same), and
on the advantage route the trainer's selection against the rule's slow oracle on the dumped entropy and divergence.
The tiny run starts with ``ALGO=grpo`` (its own ``tip_opd`` section would collide with the script's
``+algorithm.tip.*`` keys) and the script's settings then replace its algorithm section; the test checks, in the
config hydra saved for the run, that they did. Responses are up to 10 tokens (4 in ``run_tiny_cpu.sh``), so a
ratio of 0.1 is one token of a full response, not the one-token minimum every response keeps.

Scripts whose algorithm settings are identical run once: the FSDP, Megatron and multi-node hybrid scripts differ
only in backend and resources and share one advantage-route section (``test_every_script_has_a_cpu_run`` checks
that every script runs with its default settings, ``test_scripts_of_a_run_share_its_algorithm_settings`` that
the scripts of a run agree). One more run takes the pure OPD script's top-k knobs (``LOSS_MODE=
tip_entropy_aware_topk``, the teacher's top-k log-probs from the vLLM teacher, whose probability mass reaches
the loss, and a linear schedule that halves the teacher coefficient at step 2). Seven runs, about 20-25 minutes
on 2 shared cores (mostly process start-up); marked e2e.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_examples_compose import (
    SCRIPTS,
    algorithm_overrides,
    algorithm_summary,
    compose_verl,
    script_arguments,
)
from tiny_runs import by_step, run_tiny

from tip_verl.core.config import TipConfig
from tip_verl.core.reference_selection import reference_select
from tip_verl.core.schedule import teacher_coef_multiplier
from tip_verl.verl_ext.losses import TOPK_LOSSES, check_loss_route

STEPS = 2
MAX_RESPONSE = 10
HYBRID_SCRIPTS = (
    "run_qwen3_8b_to_1p7b_hybrid_fsdp.sh",
    "run_qwen3_8b_to_1p7b_hybrid_megatron.sh",
    "run_qwen3_8b_to_1p7b_hybrid_multinode.sh",
)
TOPK_KNOBS = {"LOSS_MODE": "tip_entropy_aware_topk", "SCHEDULE": "linear", "ANNEAL_STEPS": "2"}
RUNS = {  # one CPU run per distinct algorithm section: (the scripts it stands for, their environment knobs)
    "hybrid": (HYBRID_SCRIPTS, {}),
    "opd_soft_or": (("run_qwen3_8b_to_1p7b_opd_soft_or.sh",), {}),
    "opd_soft_or_topk_linear": (("run_qwen3_8b_to_1p7b_opd_soft_or.sh",), TOPK_KNOBS),
    "opd_q3_10pct": (("run_qwen3_8b_to_1p7b_opd_q3_10pct.sh",), {}),
    "opd_selected_head": (("run_qwen3_8b_to_1p7b_opd_selected_head.sh",), {}),
}
# The batch and precision settings of the GPU scripts (examples/common_qwen3_8b_to_1p7b.sh, verl's bf16), on one
# run per route: packed sequences, gradient checkpointing, micro-batches of at most 64 tokens, 2 mini-batches of
# run_tiny_cpu.sh's 4 prompts, 2 epochs, bf16 in the actor, the reference and both vLLM engines.
GPU_STYLE_RUNS = ("hybrid", "opd_soft_or_topk_linear")
PRECISION = {
    "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype": "bf16",
    "actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype": "bf16",
    "actor_rollout_ref.rollout.dtype": "bfloat16",
    "distillation.teacher_models.teacher_model.inference.dtype": "bfloat16",
}
BATCHING = {
    "actor_rollout_ref.model.use_remove_padding": True,
    "actor_rollout_ref.model.enable_gradient_checkpointing": True,
    "actor_rollout_ref.actor.use_dynamic_bsz": True,
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": 64,
    "actor_rollout_ref.actor.ppo_mini_batch_size": 2,
    "actor_rollout_ref.actor.ppo_epochs": 2,
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz": True,
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu": 64,
    "actor_rollout_ref.ref.log_prob_use_dynamic_bsz": True,
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu": 64,
}
GPU_STYLE = {**BATCHING, **PRECISION}
# verl's full_determinism: each vLLM replica samples every request with one fixed seed, so a GPU-style run and its
# plain twin (PRECISION only: padded, one mini-batch and epoch, no checkpointing) roll out the same step-1 responses
# (and the n rollouts of a prompt are identical: only those runs take it).
DETERMINISTIC_KEY = "actor_rollout_ref.rollout.full_determinism"
# One bf16 ulp of a value below 8 in magnitude (the tiny world's log-probs and entropies are): packed and padded
# forwards reduce in another order, and the entropy's last bf16 bit differs between them.
BF16_ULP = 2**-5
# The per-token columns tip_sync adds to verl's rollout dump on each route (the loss route selects in the actor).
DUMPED_INPUTS = {
    "advantage": ("tip_old_log_prob", "tip_entropy", "tip_teacher_reward", "tip_divergence"),
    "loss": ("tip_old_log_prob", "tip_entropy"),
}
LOSS_ROUTE_METRICS = (
    "actor/distillation/loss",
    "actor/tip_loss/selected_fraction",
    "actor/tip_loss/selected_loss_mean",
    "actor/tip_loss/coef_multiplier",
)
ADVANTAGE_ROUTE_METRICS = (
    "tip/selected_fraction",
    "tip/teacher_reward/selected_mean",
    "tip/divergence/selected_mean",
)


def run_arguments(run: str, monkeypatch) -> dict[str, list[str]]:
    """main_ppo's arguments of each script a run stands for, under the run's environment knobs."""
    names, knobs = RUNS[run]
    scripts = {path.name: path for path in SCRIPTS}
    with monkeypatch.context() as patch:
        for knob, value in knobs.items():
            patch.setenv(knob, value)
        return {name: script_arguments(scripts[name]) for name in names}


def finite(metrics: dict, key: str) -> float:
    assert key in metrics, f"{key} missing from verl's metrics: {sorted(metrics)}"
    assert math.isfinite(metrics[key]), f"{key}={metrics[key]}"
    return metrics[key]


def selected_fraction_range(ratio: float, metrics: dict) -> tuple[float, float]:
    """Bounds of a selected-token fraction: each response keeps max(1, floor(ratio * m)) of its m tokens.

    A fraction over any set of responses is a token-weighted mean of their own fractions, so it lies between
    the smallest and largest of those over the batch's response lengths.
    """
    lengths = range(int(metrics["response_length/min"]), int(metrics["response_length/max"]) + 1)
    fractions = [max(1, math.floor(length * ratio)) / length for length in lengths]
    return min(fractions), max(fractions)


def test_every_script_has_a_cpu_run():
    with_defaults = [name for names, knobs in RUNS.values() if not knobs for name in names]
    assert sorted(with_defaults) == sorted(path.name for path in SCRIPTS)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_scripts_of_a_run_share_its_algorithm_settings(run, monkeypatch):
    settings = {name: algorithm_overrides(args) for name, args in run_arguments(run, monkeypatch).items()}
    assert len({tuple(value) for value in settings.values()}) == 1, f"{run}: the scripts differ: {settings}"


def selected_count(ratio: float, length: int) -> int:
    """The tokens TIP selects of a response of `length` tokens: max(1, floor(ratio * m))."""
    return max(1, math.floor(ratio * length))


def run_script_settings(args: list[str], tiny_dir: Path, out_dir: Path, steps: int, *settings: dict) -> list[dict]:
    """The tiny CPU run for `steps` steps with a script's algorithm settings and `settings` (key: value) on top,
    verl's rollout dump (with TIP's columns) in out_dir/rollouts; its per-step metrics."""
    return run_tiny(
        tiny_dir,
        out_dir,
        out_dir / "metrics.jsonl",
        f"trainer.total_training_steps={steps}",
        "trainer.resume_mode=disable",
        "trainer.save_freq=-1",
        "trainer.test_freq=-1",
        f"trainer.rollout_data_dir={out_dir / 'rollouts'}",
        f"data.max_response_length={MAX_RESPONSE}",
        *algorithm_overrides(args),
        *(f"{key}={str(value).lower()}" for setting in settings for key, value in setting.items()),
        script_env={"ALGO": "grpo"},
    )


def dumped_rollouts(out_dir: Path, step: int) -> list[dict]:
    """verl's rollout dump of `step`, one record per rollout, in the order of their prompts and responses."""
    lines = (out_dir / "rollouts" / f"{step}.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: (r["input"], r["output"]))


def padded(rollouts: list[dict], name: str) -> torch.Tensor:
    """The per-token column `name` of every rollout, padded with 0 to (rollouts, MAX_RESPONSE)."""
    rows = torch.zeros(len(rollouts), MAX_RESPONSE, dtype=torch.float64)
    for row, rollout in zip(rows, rollouts):
        row[: len(rollout[name])] = torch.tensor(rollout[name], dtype=torch.float64)
    return rows


def assert_selection_is_the_oracles(rollouts: list[dict], tip: TipConfig) -> None:
    """The trainer's selection, recomputed from the dumped entropy and divergence by the rule's slow oracle."""
    mask = padded(rollouts, "tip_selected").new_zeros(len(rollouts), MAX_RESPONSE, dtype=torch.bool)
    for row, rollout in zip(mask, rollouts):
        row[: rollout["tip_response_tokens"]] = True
    expected = reference_select(
        tip.rule,
        tip.ratio,
        mask,
        entropy=padded(rollouts, "tip_entropy").float(),
        divergence=padded(rollouts, "tip_divergence").float(),
        entropy_quantile=tip.entropy_quantile,
        divergence_quantile=tip.divergence_quantile,
    )
    assert torch.equal(padded(rollouts, "tip_selected").bool(), expected)


def assert_same_step_one(gpu_style: list[dict], plain: list[dict], per_token_inputs: tuple[str, ...]) -> None:
    """The GPU-style run's step-1 rollouts and per-token inputs are the plain run's, to one bf16 ulp (same weights,
    same responses: packing, dynamic batches, checkpointing and the mini-batch split change how, not what, is
    computed before the first update)."""
    assert [(r["input"], r["output"]) for r in gpu_style] == [(r["input"], r["output"]) for r in plain], (
        "deterministic rollouts must sample the same responses"
    )
    assert [r["tip_response_tokens"] for r in gpu_style] == [r["tip_response_tokens"] for r in plain]
    for name in per_token_inputs:
        difference = (padded(gpu_style, name) - padded(plain, name)).abs().max().item()
        assert difference <= BF16_ULP, f"{name} differs by {difference}"


@pytest.mark.e2e
@pytest.mark.parametrize("run", sorted(RUNS))
def test_script_algorithm_runs_on_cpu(run, tiny_dir, tmp_path, monkeypatch):
    args = next(iter(run_arguments(run, monkeypatch).values()))
    config = compose_verl(args)
    summary = algorithm_summary(config)
    gpu_style = GPU_STYLE if run in GPU_STYLE_RUNS else {}
    deterministic = {DETERMINISTIC_KEY: True} if gpu_style else {}
    records = run_script_settings(args, tiny_dir, tmp_path, STEPS, gpu_style, deterministic)
    ran = OmegaConf.load(tmp_path / "hydra" / ".hydra" / "config.yaml")
    assert algorithm_summary(ran) == summary, "the script's settings must replace the tiny run's"
    assert {key: OmegaConf.select(ran, key) for key in gpu_style} == gpu_style
    assert ran.distillation.distillation_loss == config.distillation.distillation_loss

    steps = by_step(records)
    assert sorted(steps) == list(range(1, STEPS + 1)), "every step must finish"
    _, tip_loss = check_loss_route(config)
    for step, metrics in steps.items():
        assert finite(metrics, "actor/grad_norm") > 0.0
        rollouts = dumped_rollouts(tmp_path, step)
        response_tokens = sum(r["tip_response_tokens"] for r in rollouts)
        expected_selected = sum(selected_count(summary["ratio"], r["tip_response_tokens"]) for r in rollouts)
        if summary["route"] == "advantage":
            for key in ADVANTAGE_ROUTE_METRICS:
                finite(metrics, key)
            assert [r["tip_selected_tokens"] for r in rollouts] == [
                selected_count(summary["ratio"], r["tip_response_tokens"]) for r in rollouts
            ]
            assert metrics["tip/selected_fraction"] == pytest.approx(expected_selected / response_tokens, abs=1e-6)
            assert_selection_is_the_oracles(rollouts, TipConfig.from_any(config.algorithm))
            quadrants = [finite(metrics, f"tip/quadrant/q{quadrant}_share") for quadrant in (1, 2, 3, 4)]
            assert sum(quadrants) == pytest.approx(1.0)
        else:
            assert summary["route"] == "loss", summary
            for key in LOSS_ROUTE_METRICS:
                finite(metrics, key)
            fraction = metrics["actor/tip_loss/selected_fraction"]
            if gpu_style or metrics.get("actor/tip_loss/gate_fraction", 1.0) < 1.0:
                # Selected per mini-batch (verl averages their fractions), among the tokens tip_entropy_aware_topk's
                # gate lets in (when it drops some, only the upper bound holds).
                low, high = selected_fraction_range(summary["ratio"], metrics)
                if metrics.get("actor/tip_loss/gate_fraction", 1.0) < 1.0:
                    low = 0.0
                assert low - 1e-6 <= fraction <= high + 1e-6
            else:  # one mini-batch, one epoch: the step's selected tokens over its response tokens
                assert fraction == pytest.approx(expected_selected / response_tokens, abs=1e-6)
            expected = teacher_coef_multiplier(
                step - 1, tip_loss.schedule, tip_loss.warmup_steps, tip_loss.anneal_steps, tip_loss.final_coef
            )
            assert metrics["actor/tip_loss/coef_multiplier"] == pytest.approx(expected)
            if summary["loss_mode"] in TOPK_LOSSES:  # the vLLM teacher's top-k log-probs: their mass, at most 1
                assert 0.0 < finite(metrics, "actor/distillation/teacher_mass") <= 1.0 + 1e-6
    if gpu_style:
        run_script_settings(args, tiny_dir, tmp_path / "plain", 1, PRECISION, deterministic)
        plain = dumped_rollouts(tmp_path / "plain", 1)
        if summary["route"] == "advantage":
            assert_selection_is_the_oracles(plain, TipConfig.from_any(config.algorithm))
        assert_same_step_one(dumped_rollouts(tmp_path, 1), plain, DUMPED_INPUTS[summary["route"]])
