"""The `tip_sync` trainer's advantage step, driven on CPU with real verl objects and a real TransferQueue."""

import os

import numpy as np
import pytest
import torch
import verl
from hydra import compose, initialize_config_dir
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, get_trainer_cls
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from tip_verl.verl_ext.trainer import TipSyncTrainer, tip_input_fields

TIP = {"rule": "divergence", "ratio": 0.5, "divergence": "abs_k1", "mix": "replace", "coef": 1.0}


PRESELECT = [  # verl's own k3 distillation loss, no task reward, TIP choosing the tokens in the trainer
    "algorithm.adv_estimator=grpo",
    "distillation.enabled=true",
    "distillation.distillation_loss.loss_mode=k3",
    "distillation.distillation_loss.use_task_rewards=false",
    "+algorithm.tip.preselect=true",
    "distillation.teacher_models.teacher_model.model_path=unused-teacher",
]


def verl_config(trainer_mode="tip_sync", extra=()):
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    overrides = [
        "trainer.use_v1=true",
        f"trainer.v1.trainer_mode={trainer_mode}",
        "algorithm.adv_estimator=tip_opd",
        "actor_rollout_ref.rollout.n=2",
        *[f"+algorithm.tip.{key}={value}" for key, value in TIP.items()],
        *extra,
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


BYPASS = ["algorithm.rollout_correction.bypass_mode=true", "actor_rollout_ref.rollout.calculate_log_probs=true"]


def with_override(overrides, key, value):
    return [o for o in overrides if not o.startswith(f"{key}=")] + [f"{key}={value}"]


@pytest.mark.parametrize(
    "rule, extra, message",
    [
        ("soft_or", BYPASS, "rule=soft_or reads the student's entropy.*Set algorithm.rollout_correction.bypass_mode=false"),
        ("q3", BYPASS, "or a rule that does not read entropy: algorithm.tip.rule=all or random or divergence"),
        (
            "divergence",
            ["distillation.enabled=true", "distillation.distillation_loss.loss_mode=forward_kl_topk"],
            "adv_estimator=tip_opd selects tokens .* top-k only: .* drop the sampled token when its rank exceeds",
        ),
        (
            "divergence",
            with_override(PRESELECT, "distillation.distillation_loss.loss_mode", "forward_kl_topk"),
            "preselect=true selects tokens .*Set a sampled-token loss_mode .*algorithm.tip.preselect=false",
        ),
        (
            "divergence",
            ["actor_rollout_ref.rollout.temperature=0.7"],
            "teacher scores at temperature 1 .*rollout.temperature=0.7.*Set actor_rollout_ref.rollout.temperature=1.0",
        ),
    ],
)
def test_start_up_refuses_what_step_1_would_fail_on(rule, extra, message, monkeypatch):
    monkeypatch.setitem(TIP, "rule", rule)
    with pytest.raises(ValueError, match=message):
        TipSyncTrainer(verl_config(extra=extra))


@pytest.mark.parametrize(
    "rule, extra, reads_entropy",
    [
        ("soft_or", [], True),
        ("divergence", BYPASS, False),  # bypass mode computes no entropy: rules without it still run
        ("soft_or", [*PRESELECT, "actor_rollout_ref.rollout.temperature=0.7"], True),  # verl's own loss: its choice
    ],
)
def test_valid_configs_start_and_ask_for_entropy_only_where_verl_computes_it(rule, extra, reads_entropy, monkeypatch):
    monkeypatch.setitem(TIP, "rule", rule)
    config = verl_config(extra=extra)
    TipSyncTrainer(config)
    assert ("entropy" in tip_input_fields(config)) == reads_entropy


def test_registered_name_resolves_to_our_class():
    assert get_trainer_cls("tip_sync") is TipSyncTrainer


def test_sync_behaviour_is_kept_under_the_new_mode_name():
    trainer = TipSyncTrainer(verl_config())
    assert trainer.trainer_mode == "sync"
    assert type(trainer.replay_buffer) is ReplayBuffer  # the sync buffer, not ReplayBufferAsync

    class UnpinnedSubclass(PPOTrainerSync):  # what a plain subclass under a new name would do
        pass

    TRAINER_REGISTRY["tip_test_unpinned"] = UnpinnedSubclass
    try:
        unpinned = UnpinnedSubclass(verl_config("tip_test_unpinned"))
        assert unpinned.trainer_mode != "sync"
        assert type(unpinned.replay_buffer) is not ReplayBuffer
    finally:
        del TRAINER_REGISTRY["tip_test_unpinned"]


@pytest.mark.parametrize("mix", ["teacher_only", "replace"])
def test_teacher_only_run_is_told_how_to_skip_the_dropped_tokens_logits(mix, monkeypatch, caplog):
    monkeypatch.setitem(TIP, "mix", mix)
    with caplog.at_level("WARNING", logger="tip_verl.verl_ext.trainer"):
        TipSyncTrainer(verl_config())
    told = "patches/verl-0.9.1-tip-selected-logprobs.patch" in caplog.text
    assert told == (mix == "teacher_only")  # replace trains every token: nothing to skip


# (prompt length, response length, outcome score) of four rollouts of two prompts
ROLLOUTS = [(3, 4, 1.0), (2, 2, 0.0), (4, 3, 1.0), (3, 1, 0.0)]


def make_samples(generator):
    """verl's TransferQueue layout: response-aligned fields, teacher log-probs over the whole sequence."""
    samples, response_teacher = [], []
    for i, (prompt_len, response_len, score) in enumerate(ROLLOUTS):
        old = -torch.rand(response_len, generator=generator) - 0.1
        teacher_response = old + torch.randn(response_len, generator=generator)
        # position j holds the log-prob of token j + 1, so response token t sits at prompt_len - 1 + t
        teacher = torch.full((prompt_len + response_len, 1), -50.0)
        teacher[prompt_len - 1 : prompt_len - 1 + response_len, 0] = teacher_response
        rm_scores = torch.zeros(response_len)
        rm_scores[-1] = score
        samples.append(
            {
                "uid": f"prompt{i // 2}",
                "prompts": torch.arange(prompt_len),
                "responses": torch.arange(response_len),
                "response_mask": torch.ones(response_len, dtype=torch.long),
                "rm_scores": rm_scores,
                "old_log_probs": old,
                "entropy": torch.rand(response_len, generator=generator),
                "teacher_logprobs": teacher,
            }
        )
        response_teacher.append(teacher_response)
    return samples, response_teacher


def pad(rows, width):
    return torch.stack([torch.nn.functional.pad(row, (0, width - row.numel())) for row in rows])


@pytest.fixture(scope="module")
def transfer_queue():
    import ray
    import transfer_queue as tq
    from omegaconf import OmegaConf

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()


def test_advantage_step_reads_entropy_old_and_teacher_response_part(transfer_queue):
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    tq = transfer_queue
    samples, response_teacher = make_samples(torch.Generator().manual_seed(0))
    keys = [f"prompt{i // 2}_{i}_0" for i in range(len(samples))]
    batch = tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(samples))

    trainer = TipSyncTrainer(verl_config())
    trainer.global_steps = 1
    metrics = {}
    trainer._compute_advantage(batch, metrics)
    stored = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages"])
    advantages = stored["advantages"].to_padded_tensor(0.0)

    width = max(r for _, r, _ in ROLLOUTS)
    mask = pad([s["response_mask"] for s in samples], width)
    direct, _ = get_adv_estimator_fn("tip_opd")(
        token_level_rewards=pad([s["rm_scores"] for s in samples], width),
        response_mask=mask,
        index=np.array([s["uid"] for s in samples], dtype=object),
        config={"tip": TIP},
        old_log_probs=pad([s["old_log_probs"] for s in samples], width),
        teacher_logprobs=pad(response_teacher, width),
        entropy=pad([s["entropy"] for s in samples], width),
    )
    torch.testing.assert_close(advantages, direct)
    # replace: each rollout's selected token (budget 1 or 2) carries r_t, which is never the -50 padding
    assert advantages.min() > -10
    assert metrics["tip/selected_fraction"] == pytest.approx((2 + 1 + 1 + 1) / 10)
    assert {"tip/quadrant/q3_share", "tip/teacher_reward/selected_mean"} <= set(metrics)


def test_rollout_dump_gets_each_rollouts_tip_columns(transfer_queue, tmp_path, monkeypatch):
    """With trainer.rollout_data_dir, verl's dump of the step's rollouts (named by their keys, in verl's sorted
    order) gets TIP's columns; a validation dump, whose keys are others, passes unchanged."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    tq = transfer_queue
    samples, response_teacher = make_samples(torch.Generator().manual_seed(1))
    keys = [f"dump{i // 2}_{i}_0" for i in range(len(samples))]
    batch = tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(samples))
    trainer = TipSyncTrainer(verl_config(extra=[f"trainer.rollout_data_dir={tmp_path}"]))
    trainer.global_steps = 1
    trainer._compute_advantage(batch, {})
    dumped = []
    monkeypatch.setattr(PPOTrainerSync, "_dump_generations", lambda self, *args: dumped.append(args[4]))

    order = [3, 0, 2, 1]
    trainer._dump_generations([""] * 4, [""] * 4, [None] * 4, [0.0] * 4, {"uid": [keys[i] for i in order]}, "d")
    trainer._dump_generations([""], [""], [None], [0.0], {"uid": ["val_0_0"]}, "d")
    columns, validation = dumped
    assert validation == {"uid": ["val_0_0"]}
    lengths = [ROLLOUTS[i][1] for i in order]
    assert columns["tip_response_tokens"] == lengths
    assert columns["tip_selected_tokens"] == [max(1, length // 2) for length in lengths]  # ratio 0.5
    assert [sum(row) for row in columns["tip_selected"]] == columns["tip_selected_tokens"]
    for row, i in enumerate(order):
        old = samples[i]["old_log_probs"]
        assert columns["tip_old_log_prob"][row] == pytest.approx(old.tolist())
        assert columns["tip_entropy"][row] == pytest.approx(samples[i]["entropy"].tolist())
        assert columns["tip_teacher_reward"][row] == pytest.approx((response_teacher[i] - old).tolist())
        assert columns["tip_divergence"][row] == pytest.approx((response_teacher[i] - old).abs().tolist())  # abs_k1


def test_bypass_mode_step_runs_without_entropy(transfer_queue):
    """Under rollout-correction bypass mode verl writes no entropy; rule=divergence runs without it."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    tq = transfer_queue
    samples, response_teacher = make_samples(torch.Generator().manual_seed(2))
    for sample in samples:
        del sample["entropy"]
    keys = [f"bypass_prompt{i // 2}_{i}_0" for i in range(len(samples))]
    batch = tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(samples))

    trainer = TipSyncTrainer(verl_config(extra=BYPASS))
    trainer.global_steps = 3
    metrics = {}
    trainer._compute_advantage(batch, metrics)
    stored = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages"])
    width = max(r for _, r, _ in ROLLOUTS)
    direct, _ = get_adv_estimator_fn("tip_opd")(
        token_level_rewards=pad([s["rm_scores"] for s in samples], width),
        response_mask=pad([s["response_mask"] for s in samples], width),
        index=np.array([s["uid"] for s in samples], dtype=object),
        config={"tip": TIP},
        old_log_probs=pad([s["old_log_probs"] for s in samples], width),
        teacher_logprobs=pad(response_teacher, width),
        entropy=None,
    )
    torch.testing.assert_close(stored["advantages"].to_padded_tensor(0.0), direct)
    assert metrics["tip/selected_fraction"] == pytest.approx(5 / 10)
    assert not any(key.startswith("tip/quadrant/") for key in metrics)  # quadrants need entropy


def test_ray_worker_sees_our_names_after_a_plain_import_verl(transfer_queue):
    import ray

    @ray.remote(num_cpus=0)
    def registered_names():
        import verl  # noqa: F401  (loads the verl.plugins entry points, nothing else of ours)
        from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
        from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

        return "tip_opd" in ADV_ESTIMATOR_REGISTRY, "tip_sync" in TRAINER_REGISTRY

    assert ray.get(registered_names.remote()) == (True, True)


class RecordingActor:
    """Stands in for verl's actor worker group: reads the fields the batch's metadata names from TransferQueue,
    as verl's worker does."""

    def __init__(self, tq, fail=False):
        self.tq, self.fail, self.seen, self.extra_info = tq, fail, None, None

    def update_actor(self, batch):
        self.seen = self.tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=batch.fields)
        self.extra_info = dict(batch.extra_info)
        if self.fail:
            raise RuntimeError("out of memory")
        return {"metrics": {"mfu": [0.0], "pg_loss": [0.0]}}


def selected_by_the_estimator(samples) -> torch.Tensor:
    """An independent route to TIP's selection: tip_opd with mix=teacher_only, non-zero where selected."""
    width = max(r for _, r, _ in ROLLOUTS)
    response_teacher = [
        s["teacher_logprobs"][len(s["prompts"]) - 1 : len(s["prompts"]) - 1 + len(s["responses"]), 0] for s in samples
    ]
    advantages, _ = get_adv_estimator_fn("tip_opd")(
        token_level_rewards=pad([s["rm_scores"] for s in samples], width),
        response_mask=pad([s["response_mask"] for s in samples], width),
        index=np.array([s["uid"] for s in samples], dtype=object),
        config={"tip": {**TIP, "mix": "teacher_only"}},
        old_log_probs=pad([s["old_log_probs"] for s in samples], width),
        teacher_logprobs=pad(response_teacher, width),
        entropy=pad([s["entropy"] for s in samples], width),
    )
    return (advantages != 0).long()


@pytest.mark.parametrize("mode", ["teacher_only", "replace", "preselect"])
@pytest.mark.parametrize("update_fails", [False, True])
def test_actor_update_reads_only_selected_tokens(transfer_queue, mode, update_fails, monkeypatch):
    """teacher_only (tip_opd) and preselect (verl's grpo + k3 loss) train only the selected tokens; replace all."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    tq = transfer_queue
    monkeypatch.setitem(TIP, "mix", "teacher_only" if mode == "teacher_only" else "replace")
    samples, _ = make_samples(torch.Generator().manual_seed(1))
    for sample in samples:
        sample["loss_mask"] = sample["response_mask"].clone()
    keys = [f"{mode}_{update_fails}_prompt{i // 2}_{i}_0" for i in range(len(samples))]
    batch = tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(samples))

    metrics = {}
    trainer = TipSyncTrainer(verl_config(extra=PRESELECT if mode == "preselect" else ()))
    if mode == "preselect":  # set by verl's worker setup, which this test does not run
        from verl.utils.config import omega_conf_to_dataclass

        trainer.distillation_config = omega_conf_to_dataclass(trainer.config.distillation)
    trainer.actor_rollout_wg, trainer.global_steps = RecordingActor(tq, fail=update_fails), 1
    batch = trainer._compute_advantage(batch, metrics)
    batch.extra_info["set_before_the_update"] = 1
    if update_fails:
        with pytest.raises(RuntimeError, match="out of memory"):
            trainer._update_actor(batch, {})
    else:
        assert "tip_selected" not in trainer._update_actor(batch, {}).fields  # later stages never see it
    assert {"set_before_the_update", "tip_loss_route", "temperature"} <= set(trainer.actor_rollout_wg.extra_info)

    seen = trainer.actor_rollout_wg.seen
    full = pad([s["response_mask"] for s in samples], 4)
    after = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["response_mask"])
    torch.testing.assert_close(after["response_mask"].to_padded_tensor(0), full)  # put back for verl's metrics
    seen_mask = seen["response_mask"].to_padded_tensor(0)
    torch.testing.assert_close(seen["loss_mask"].to_padded_tensor(0), seen_mask)
    if mode in ("teacher_only", "preselect"):
        assert seen["response_mask"].dtype == seen["loss_mask"].dtype == torch.int64  # TransferQueue pins dtypes
        expected = selected_by_the_estimator(samples)
        assert expected.sum() == 5  # budgets 2, 1, 1, 1
        torch.testing.assert_close(seen_mask, expected)
        torch.testing.assert_close(seen["tip_selected"].to_padded_tensor(0).long(), expected)
        assert metrics["tip/selected_fraction"] == pytest.approx(5 / 10)
    else:
        torch.testing.assert_close(seen_mask, full)
        assert "tip_selected" not in seen.keys()  # the patched engine would require response_mask within it
