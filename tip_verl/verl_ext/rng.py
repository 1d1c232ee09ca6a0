"""Seeded generators for the random selection rules (random, entropy_sample).

The draws follow (seed, step, data-parallel rank). Processes of one data-parallel rank compute the loss on the
same micro-batch and each back-propagates its own part of it: Ulysses sequence-parallel peers (each gathers the
whole sequence for the loss, then keeps the gradient of its shard) and Megatron tensor- and context-parallel
peers. They must select the same tokens, so they share a stream; data-parallel ranks hold other rollouts and
keep streams of their own.
"""

import sys
from typing import Optional

import numpy as np
import torch
from verl.utils.ulysses import get_ulysses_sequence_parallel_group

_generators: dict[tuple[int, int], tuple[Optional[int], torch.Generator]] = {}


def data_parallel_rank() -> int:
    """This process's data-parallel rank in the engine that trains the model; 0 outside torch.distributed.

    verl hands the loss no engine and no process group (`distillation_loss` calls a registered loss with the
    configs, the model output and the micro-batch only), so the rank is read from the process-wide state that
    verl's engines set up, giving what each engine's `get_data_parallel_rank()` returns:
    - Megatron: megatron-core's `parallel_state` (TP, CP and PP peers share a data-parallel rank; of PP, only the
      last stage computes the loss). It is looked up, not imported: a process whose engine is Megatron has
      imported and initialised it.
    - FSDP with Ulysses: verl's engine installs its sequence-parallel group (`verl.utils.ulysses`) for the length
      of its train and eval modes, where the loss runs. Its mesh is `init_device_mesh((dp, sp), ("dp", "sp"))`,
      so global rank r is data-parallel rank r // sp (`ulysses_device_mesh["dp"].get_local_rank()`).
    - FSDP without Ulysses: the global rank.
    """
    if not torch.distributed.is_initialized():
        return 0
    megatron = sys.modules.get("megatron.core.parallel_state")
    if megatron is not None and megatron.model_parallel_is_initialized():
        return megatron.get_data_parallel_rank()
    rank = torch.distributed.get_rank()
    sequence_parallel_group = get_ulysses_sequence_parallel_group()
    if sequence_parallel_group is None:
        return rank
    return rank // torch.distributed.get_world_size(sequence_parallel_group)


def selection_generator(seed: int, step: Optional[int] = None) -> torch.Generator:
    """The generator of the random rules for training step `step`, offset by the data-parallel rank.

    With a step, the stream starts from (seed, step, data-parallel rank) the first time the step asks for it and
    continues through the step's later calls (micro-batches, epochs), so the draws depend only on the seed, the
    step, the data-parallel rank and the order of calls within the step: a run resumed from a checkpoint draws
    what the uninterrupted run drew, and the peers of one data-parallel rank draw alike (see
    `data_parallel_rank`). Without a step, one stream per seed for the whole process. The generator is a CPU one
    on every device: the rules draw on it and move the draw to the tensors' device, so a seed draws the same on
    CPU and GPU.
    """
    rank = data_parallel_rank()
    cached_step, generator = _generators.get((seed, rank), (None, None))
    if generator is None or cached_step != step:
        entropy = [seed, rank] if step is None else [seed, rank, step]
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        _generators[(seed, rank)] = (step, generator)
    return generator
