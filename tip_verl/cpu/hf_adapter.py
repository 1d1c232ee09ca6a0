"""Trainer-side adapter of the ``hf`` rollout (verl's ``BaseRollout`` for ``rollout.name=hf``).

verl builds one per trainer process (hybrid engine) and one per teacher worker.
Its job is weight sync: verl's ``naive`` checkpoint engine hands it the
trainer's full weights as a generator of ``(name, tensor)``; it gathers them on
host memory and sends them to its replica's :class:`HFRolloutServer` through
Ray. Every trainer rank must drain the generator (FSDP gathers shards
collectively); only the replica's first rank sends.
"""

import os
from typing import Generator

import ray
import torch
from verl.workers.rollout.base import BaseRollout

from tip_verl.cpu.hf_replica import server_actor_name


class HFServerAdapter(BaseRollout):
    """Sends trainer weights to the co-scheduled ``hf`` rollout server."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        replica_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // replica_world_size if replica_rank == -1 else replica_rank
        self.is_leader_rank = rank % replica_world_size == 0
        self._server_handle = None

    @property
    def server_handle(self):
        if self._server_handle is None:
            self._server_handle = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server_handle

    async def resume(self, tags: list[str]):
        """Weights and cache stay in host memory."""

    async def release(self):
        """Nothing to release on the CPU."""

    @torch.no_grad()
    async def update_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None],
        wire_format: str = "named_tensors",
        global_steps: int = None,
        **kwargs,
    ):
        if wire_format != "named_tensors":
            raise NotImplementedError(
                f"The hf rollout loads full named tensors, not {wire_format!r}: "
                "set actor_rollout_ref.rollout.checkpoint_engine.backend=naive."
            )
        named_tensors = {name: tensor.detach().to("cpu", copy=True) for name, tensor in weights}
        if self.is_leader_rank:
            await self.server_handle.update_weights.remote(named_tensors, global_steps=global_steps)
