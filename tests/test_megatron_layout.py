"""What reaches `tip_opd` and the TIP losses under Megatron tensor and context parallelism (docs/multinode.md).

verl's Megatron engine cannot run a model on CPU, but its glue around the model can, on gloo with megatron-core's
parallel state: `gptmodel_forward_model_engine` (THD packing, the zigzag split of every sequence over the
context-parallel ranks, the all-gather of per-token outputs back into whole sequences) and
`MegatronEngineWithLMHead._lm_head_logits_processor` (vocabulary-parallel entropy and log-probs, verl's
vocabulary-parallel top-k forward KL). Here they run on 4 processes, tensor parallel 2 x context parallel 2,
around a stand-in for Megatron's GPTModel: a vocabulary-parallel table, token id -> its shard of the logits.
verl's `distillation_ppo_loss` then calls our TIP loss, as the engine's `postprocess_micro_batch_func` does. Each
process's results are compared with the FSDP route on the same logits in this process:
- the outputs reaching the loss (and, through the old-log-prob step, `tip_opd`): whole sequences, and
  full-vocabulary entropy, log-probs and top-k forward KL;
- the TIP selection: max(1, floor(ratio * m_i)) tokens of each rollout, the same on every peer and as on the
  FSDP route; with the random rule, the same draw on every peer;
- the loss, and each vocabulary shard's gradient summed over the context-parallel group.

Needs megatron-core (imports on CPU: `pip install megatron-core`); skipped without it. The tests after it need
nothing more: what a context-parallel shard would do to the budgets, and that verl refuses a shard-length
output before our selection could see it.
"""

import math
import os
import socket
from dataclasses import asdict
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from tensordict import TensorDict
from verl.trainer.distillation import distillation_ppo_loss
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig
from verl.workers.utils.padding import no_padding_2_padding

import tip_verl.verl_ext.plugin  # noqa: F401  (registers the tip_* losses)
from tip_verl.core.config import TipConfig
from tip_verl.core.distill_losses import TipLossConfig
from tip_verl.verl_ext.losses import SETTINGS_KEY, compute_tip_estimator_loss, compute_tip_topk_loss

TP, CP = 2, 2
VOCAB, TOPK, RATIO = 32, 4, 0.5
PROMPT_LENS, RESP_LENS = (3, 2, 4), (6, 3, 5)
CASES = {  # name: (loss_mode, rule)
    "topk_soft_or": ("tip_forward_kl_topk", "soft_or"),
    "gated_topk_soft_or": ("tip_entropy_aware_topk", "soft_or"),  # gate: the teacher's top-k entropy >= tau
    "k3_soft_or": ("tip_k3", "soft_or"),
    "k3_random": ("tip_k3", "random"),
}
GATED = "gated_topk_soft_or"
LOSSES = {
    "tip_forward_kl_topk": compute_tip_topk_loss,
    "tip_entropy_aware_topk": compute_tip_topk_loss,
    "tip_k3": compute_tip_estimator_loss,
}


def nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def world() -> dict:
    """The micro-batch's contents, the same in every process: token ids (distinct, so no two positions share
    logits), the full logits table, and a teacher concentrated on its top-k (so the top-k forward KL is > 0)."""
    generator = torch.Generator().manual_seed(0)
    lengths = [p + r for p, r in zip(PROMPT_LENS, RESP_LENS)]
    ids = torch.randperm(VOCAB, generator=generator)[: sum(lengths)].split(lengths)
    table = torch.randn(VOCAB, VOCAB, generator=generator)
    teacher = torch.log_softmax(4.0 * torch.randn(sum(lengths), VOCAB, generator=generator), dim=-1)
    teacher_topk = teacher.topk(TOPK, dim=-1)
    return {
        "ids": list(ids),
        "table": table,
        "topk_logprobs": list(teacher_topk.values.split(lengths)),
        "topk_ids": list(teacher_topk.indices.split(lengths)),
        "sampled_logprobs": list(teacher.gather(-1, torch.cat(ids).roll(-1).unsqueeze(-1)).split(lengths)),
    }


def micro_batch(case: str, contents: dict) -> TensorDict:
    """The actor-update micro-batch as verl's engine hands it to the loss (nested, whole sequences)."""
    loss_mode, rule = CASES[case]
    ids = contents["ids"]
    topk = loss_mode != "tip_k3"
    fields = {
        "input_ids": nested(ids),
        "prompts": nested([row[:p] for row, p in zip(ids, PROMPT_LENS)]),
        "responses": nested([row[p:] for row, p in zip(ids, PROMPT_LENS)]),
        "response_mask": nested([torch.ones(r, dtype=torch.int64) for r in RESP_LENS]),
        "teacher_logprobs": nested(contents["topk_logprobs"] if topk else contents["sampled_logprobs"]),
    }
    if topk:
        fields["teacher_ids"] = nested(contents["topk_ids"])
    data = TensorDict(fields, batch_size=[len(ids)])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=sum(RESP_LENS), global_batch_size=len(ids))
    settings = {"tip": asdict(TipConfig(rule=rule, ratio=RATIO)), "tip_loss": asdict(TipLossConfig()), "step": 0}
    tu.assign_non_tensor_data(data, SETTINGS_KEY, settings)  # what the tip_sync trainer sends with the update
    return data


def configs(case: str, strategy: str) -> tuple[ActorConfig, DistillationConfig]:
    actor = ActorConfig(strategy=strategy, rollout_n=1, ppo_micro_batch_size_per_gpu=3, loss_agg_mode="token-mean")
    loss = DistillationLossConfig(
        loss_mode=CASES[case][0], topk=TOPK, loss_max_clamp=None, log_prob_min_clamp=-10.0,
        use_policy_gradient=False, use_task_rewards=False,
    )
    return actor, DistillationConfig(distillation_loss=loss)


def observed(case: str, config: ActorConfig, distill: DistillationConfig, output: dict, data: TensorDict) -> dict:
    """What our loss sees and returns: the response part of the model output, the weighted per-token losses."""
    weighted, _ = LOSSES[CASES[case][0]](config, distill, output, data)
    seen = {key: no_padding_2_padding(value, data).detach() for key, value in output.items() if value is not None}
    return {"seen": seen, "weighted": weighted.detach()}


class VocabShardModel(torch.nn.Module):
    """Stand-in for Megatron's GPTModel on one tensor-parallel rank: logits (1, local tokens, VOCAB / TP) are the
    rank's columns of a table, looked up by token id. verl reads pre_process / post_process / config.fp8."""

    def __init__(self, table_shard: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table_shard)
        self.pre_process = self.post_process = True
        self.config = SimpleNamespace(fp8=None)

    def forward(self, input_ids, attention_mask=None, position_ids=None, packed_seq_params=None):
        return self.table[input_ids]


def megatron_route(case: str, contents: dict) -> dict:
    """One case in a process of the TP x CP group: verl's Megatron forward glue and loss, then our loss."""
    from megatron.core import parallel_state as mpu
    from verl.models.mcore.model_forward import gptmodel_forward_model_engine
    from verl.utils.torch_functional import expand_as_nested
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead

    columns = VOCAB // TP * mpu.get_tensor_model_parallel_rank() + torch.arange(VOCAB // TP)
    model = VocabShardModel(contents["table"][:, columns].clone())
    data = micro_batch(case, contents)
    actor, distill = configs(case, "megatron")
    loss_fn = partial(distillation_ppo_loss, config=actor, distillation_config=distill)
    use_topk = distill.distillation_loss.loss_settings.use_topk
    engine = SimpleNamespace(engine_config=SimpleNamespace(entropy_from_logits_with_chunking=False))
    processor = partial(  # as MegatronEngineWithLMHead.forward_step builds it for the actor update
        MegatronEngineWithLMHead._lm_head_logits_processor, engine, calculate_sum_pi_squared=False,
        calculate_entropy=True, distillation_use_topk=use_topk, distillation_only=use_topk,
        logits_processor_func=loss_fn, batch=data, data_format="thd",
    )
    input_ids = data["input_ids"]
    temperature = expand_as_nested(torch.ones(len(RESP_LENS)), input_ids)
    output = gptmodel_forward_model_engine(
        model, input_ids, {}, logits_processor=processor,
        logits_processor_args={"label": input_ids.clone(), "temperature": temperature}, data_format="thd",
    )
    result = observed(case, actor, distill, output, data)
    loss, _ = loss_fn(model_output=output, data=data)
    loss.backward()
    gradient = model.table.grad.clone()
    torch.distributed.all_reduce(gradient, group=mpu.get_context_parallel_group())  # as Megatron's DDP over DP x CP
    result.update(loss=loss.item(), gradient=gradient, columns=columns)
    return result


def fsdp_route(case: str, contents: dict) -> dict:
    """The same case on one process, as verl's FSDP engine does it: full logits of every packed token."""
    from verl.utils.torch_functional import entropy_from_logits

    table = contents["table"].clone().requires_grad_(True)
    data = micro_batch(case, contents)
    actor, distill = configs(case, "fsdp2")
    loss_fn = partial(distillation_ppo_loss, config=actor, distillation_config=distill)
    ids = data["input_ids"]
    logits = table[ids.values()]  # (total tokens, VOCAB)
    labels = torch.cat([row.roll(-1) for row in contents["ids"]])
    output = {"entropy": entropy_from_logits(logits)}
    if distill.distillation_loss.loss_settings.use_topk:
        output.update(loss_fn(student_logits=logits.unsqueeze(0), data=data, data_format="thd"))
        output = {key: value.squeeze(0) if value.dim() > 1 else value for key, value in output.items()}
    else:
        output["log_probs"] = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    output = {key: torch.nested.nested_tensor_from_jagged(value, ids.offsets()) for key, value in output.items()}
    result = observed(case, actor, distill, output, data)
    loss, _ = loss_fn(model_output=output, data=data)
    loss.backward()
    result.update(loss=loss.item(), gradient=table.grad)
    return result


def megatron_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from megatron.core import parallel_state as mpu

        mpu.initialize_model_parallel(tensor_model_parallel_size=TP, context_parallel_size=CP)
        peers = {"tp_rank": mpu.get_tensor_model_parallel_rank(), "cp_rank": mpu.get_context_parallel_rank()}
        contents = world()
        results = {case: megatron_route(case, contents) for case in CASES}
        torch.save({"peers": peers, "cases": results}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def megatron_results(tmp_path_factory) -> list[dict]:
    pytest.importorskip("megatron.core")
    out_dir = tmp_path_factory.mktemp("megatron")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # verl's vocab-parallel entropy wraps a torch.compile; compiling C++ on 2 cores takes a minute, eager is exact.
    previous = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        mp.spawn(megatron_worker, args=(TP * CP, port, str(out_dir)), nprocs=TP * CP)
    finally:
        os.environ.pop("TORCHDYNAMO_DISABLE") if previous is None else os.environ.update(TORCHDYNAMO_DISABLE=previous)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(TP * CP)]


def selected_per_rollout(weighted: torch.Tensor) -> list[int]:
    return (weighted != 0).sum(dim=-1).tolist()


BUDGETS = [max(1, math.floor(RATIO * m)) for m in RESP_LENS]


def test_peers_cover_the_tensor_and_context_parallel_grid(megatron_results):
    assert sorted((r["peers"]["tp_rank"], r["peers"]["cp_rank"]) for r in megatron_results) == [
        (0, 0), (0, 1), (1, 0), (1, 1)
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_loss_sees_whole_sequences_and_the_full_vocabulary(megatron_results, case):
    reference = fsdp_route(case, world())
    for result in megatron_results:
        seen = result["cases"][case]["seen"]
        assert sorted(seen) == sorted(reference["seen"]), "the same model-output fields as the FSDP route"
        for key, value in reference["seen"].items():
            torch.testing.assert_close(seen[key], value, atol=2e-5, rtol=1e-5, msg=f"{key} under TP x CP")


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_peer_selects_the_same_tokens_per_whole_rollout(megatron_results, case):
    selections = [result["cases"][case]["weighted"] != 0 for result in megatron_results]
    assert all(torch.equal(selection, selections[0]) for selection in selections), "peers disagree"
    if case != GATED:  # the gate leaves fewer eligible tokens; the FSDP comparison checks that case
        assert selected_per_rollout(megatron_results[0]["cases"][case]["weighted"]) == BUDGETS


@pytest.mark.parametrize("case", sorted(case for case in CASES if CASES[case][1] != "random"))
def test_selection_loss_and_gradient_match_the_fsdp_route(megatron_results, case):
    reference = fsdp_route(case, world())
    assert 0 < int((reference["weighted"] != 0).sum()) < sum(RESP_LENS), "the rule must choose"
    for result in megatron_results:
        mine = result["cases"][case]
        assert torch.equal(mine["weighted"] != 0, reference["weighted"] != 0)
        torch.testing.assert_close(mine["weighted"], reference["weighted"], atol=2e-5, rtol=1e-5)
        assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        torch.testing.assert_close(mine["gradient"], reference["gradient"][:, mine["columns"]], atol=1e-6, rtol=1e-4)


def zigzag_shards(length: int, cp: int) -> list[list[int]]:
    """Positions of a sequence on each context-parallel rank, Megatron's zigzag layout: the sequence (padded to a
    multiple of 2 * cp) is cut into 2 * cp chunks; rank r holds chunks r and 2 * cp - 1 - r."""
    padded = -(-length // (2 * cp)) * 2 * cp
    chunk = padded // (2 * cp)
    return [
        [p for p in [*range(r * chunk, (r + 1) * chunk), *range((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk)]
         if p < length]
        for r in range(cp)
    ]


def test_budgets_on_context_parallel_shards_would_differ():
    """Why the gather matters: a rollout of 3 response tokens keeps 1, but its two zigzag shards would keep
    max(1, floor(0.5 * 2)) + max(1, floor(0.5 * 1)) = 2."""
    prompt, response = 5, 3
    shards = zigzag_shards(prompt + response, cp=2)
    response_per_shard = [sum(p >= prompt for p in shard) for shard in shards]
    assert sorted(response_per_shard) == [1, 2]
    assert sum(max(1, math.floor(RATIO * m)) for m in response_per_shard) == 2 != max(1, math.floor(RATIO * response))


def test_a_shard_length_output_cannot_reach_the_selection():
    """If a context-parallel shard of the per-token outputs reached our loss, verl's no_padding_2_padding (which
    cuts the response out of the whole sequences) would refuse it before any selection."""
    case = "topk_soft_or"
    contents = world()
    data = micro_batch(case, contents)
    actor, distill = configs(case, "fsdp2")
    whole = data["input_ids"]
    shards = [zigzag_shards(length, CP)[0] for length in whole.offsets().diff().tolist()]
    shard_output = {
        key: nested([torch.rand(len(shard)) for shard in shards])
        for key in ("distillation_losses", "student_mass", "teacher_mass", "entropy")
    }
    with pytest.raises(AssertionError):
        compute_tip_topk_loss(actor, distill, shard_output, data)
