"""The ``hf`` rollout replica: launches one :class:`HFRolloutServer` per replica.

Registered in verl's ``RolloutReplicaRegistry`` as ``hf``; used for the student
rollout (hybrid mode: the replica's workers are the trainer processes) and for
distillation teachers (``distillation.teacher_models.*.inference.name=hf``,
colocated mode: the workers are verl's checkpoint-engine workers on the
teacher's pool). A replica has exactly one process: no tensor parallelism.
"""

import ray
from verl.workers.rollout.replica import RolloutReplica

from tip_verl.cpu.hf_server import HFRolloutServer

SERVER_NAME_PREFIX = "hf_server"


def server_actor_name(replica_rank: int, role: str = "", name_suffix: str = "") -> str:
    """Ray actor name of a replica's server; ``role`` is "", "teacher" or "reward"."""
    role_part = f"{role}_" if role else ""
    return f"{SERVER_NAME_PREFIX}_{role_part}{replica_rank}{name_suffix}"


class HFReplica(RolloutReplica):
    """One CPU process serving a Hugging Face model for verl's rollout or teacher."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.world_size != 1:
            raise ValueError(
                "the hf rollout runs one process per replica: set tensor_model_parallel_size, "
                f"data_parallel_size and pipeline_model_parallel_size to 1 (world size is {self.world_size})"
            )

    def _role(self) -> str:
        if self.is_reward_model:
            return "reward"
        return "teacher" if self.is_teacher_model else ""

    async def launch_servers(self):
        name = server_actor_name(self.replica_rank, self._role(), self.name_suffix)
        server = (
            ray.remote(HFRolloutServer)
            .options(name=name, num_cpus=0, max_concurrency=self.max_concurrency)
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        await server.__ray_ready__.remote()  # model loaded before verl sends requests
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"{name}"
