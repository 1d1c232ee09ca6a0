"""One draw per data-parallel rank: the random rules on 4 gloo processes, two data-parallel ranks of 2 peers.

Ulysses SP 2: each process builds the device mesh with verl's own `FSDPEngine._init_device_mesh` (on CPU mode's
platform, as a CPU-mode actor worker does) and installs the sequence-parallel group as verl's train mode does.
Megatron TP 2 (when megatron-core is installed): megatron-core's `initialize_model_parallel`, whose data-parallel
rank is what verl's `MegatronEngine.get_data_parallel_rank` returns. Every process then runs the `tip_k3` loss with
`rule=random` through verl's distillation-loss registry on one micro-batch that is the same everywhere. Ranks 0, 1
are the peers of data-parallel rank 0 and ranks 2, 3 those of data-parallel rank 1: peers hold one micro-batch and
must select the same tokens, data-parallel ranks draw their own.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp
from loss_batches import micro_batch, tip_k3

WORLD, SP = 4, 2
RESP_LENS = [16, 20, 12, 18]  # C(16,8) C(20,10) C(12,6) C(18,9) ~ 1e15 selections
SEED, STEPS = 5, (3, 4)


def selected_tokens(step):
    """The (bsz, response_length) bool mask the tip_k3 loss trains on, one micro-batch the same on every rank."""
    tip = {"rule": "random", "ratio": 0.5, "seed": SEED}
    losses, _ = tip_k3(micro_batch(RESP_LENS, tip, step, dp_size=WORLD // SP, batch_num_tokens=2 * sum(RESP_LENS)))
    return losses > 0


def ulysses_layout() -> int:
    """verl's FSDP mesh with Ulysses SP; returns verl's data-parallel rank of this process."""
    from verl.utils.ulysses import set_ulysses_sequence_parallel_group
    from verl.workers.config import FSDPEngineConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    engine = FSDPEngine.__new__(FSDPEngine)  # only the mesh: no model
    engine.engine_config = FSDPEngineConfig(strategy="fsdp2", ulysses_sequence_parallel_size=SP)
    engine._init_device_mesh()
    set_ulysses_sequence_parallel_group(engine.ulysses_parallel_group)  # what verl's EngineTrainModeCtx does
    return engine.get_data_parallel_rank()


def megatron_layout() -> int:
    """megatron-core's parallel state with TP 2; returns the data-parallel rank verl's Megatron engine reads."""
    from megatron.core import parallel_state as mpu

    mpu.initialize_model_parallel(tensor_model_parallel_size=SP)
    return mpu.get_data_parallel_rank()


def draws(rank: int, layout: str, init_file: str, out_dir: str) -> None:
    from tip_verl.cpu.registration import register_platform

    register_platform()  # CPU mode's platform, before verl's FSDP engine caches its device name at import
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from tip_verl.verl_ext import rng

    verl_dp_rank = ulysses_layout() if layout == "ulysses" else megatron_layout()
    result = {"verl_dp_rank": verl_dp_rank, "dp_rank": rng.data_parallel_rank()}
    for step in STEPS:  # two micro-batches per step: the stream continues within a step
        result[step] = [selected_tokens(step), selected_tokens(step)]
    rng._generators.clear()  # a process resumed at the last step: nothing drawn before it
    result["resumed"] = [selected_tokens(STEPS[-1]), selected_tokens(STEPS[-1])]
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module", params=["ulysses", "megatron"])
def by_rank(request, tmp_path_factory):
    if request.param == "megatron":
        pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    out = tmp_path_factory.mktemp(request.param)
    mp.spawn(draws, args=(request.param, str(out / "init"), str(out)), nprocs=WORLD)
    return [torch.load(out / f"{rank}.pt") for rank in range(WORLD)]


def test_data_parallel_rank_is_verl_engine_rank(by_rank):
    assert [r["dp_rank"] for r in by_rank] == [r["verl_dp_rank"] for r in by_rank] == [0, 0, 1, 1]


def test_without_model_parallelism_every_rank_is_a_data_parallel_rank(tmp_path):
    mp.spawn(global_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)] == [0, 1]


def global_ranks(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from tip_verl.verl_ext import rng

    torch.save(rng.data_parallel_rank(), os.path.join(out_dir, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_peers_select_the_same_tokens(by_rank):
    for first, second in ((0, 1), (2, 3)):
        for step in STEPS:
            for a, b in zip(by_rank[first][step], by_rank[second][step]):
                assert torch.equal(a, b)


def test_data_parallel_ranks_micro_batches_and_steps_draw_differently(by_rank):
    rank0, rank2 = by_rank[0], by_rank[2]
    masks = [m for r in (rank0, rank2) for step in STEPS for m in r[step]]
    assert len({tuple(m.flatten().tolist()) for m in masks}) == len(masks)  # 8 distinct selections
    per_response = [max(1, int(0.5 * m)) for m in RESP_LENS]
    for m in masks:
        assert m.sum(-1).tolist() == per_response


def test_resumed_process_repeats_the_step_draws(by_rank):
    for result in by_rank:
        for a, b in zip(result["resumed"], result[STEPS[-1]]):
            assert torch.equal(a, b)
