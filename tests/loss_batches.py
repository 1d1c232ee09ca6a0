"""Micro-batches for the tip_* losses, laid out as verl's engine hands them to the loss, and a call through verl's
distillation-loss registry."""

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

PROMPT_LEN = 2


def nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def micro_batch(resp_lens, tip, step=0, dp_size=1, batch_num_tokens=None):
    """Nested whole-sequence tensors for responses of `resp_lens` tokens (prompts of PROMPT_LEN), with what verl's
    engine assigns (dp_size, batch_num_tokens: the mini-batch's response tokens over the data-parallel ranks) and
    the settings the tip_sync trainer sends. Content depends only on `resp_lens`."""
    g = torch.Generator().manual_seed(0)
    data = TensorDict(
        {
            "prompts": nested([torch.randint(0, 9, (PROMPT_LEN,), generator=g) for _ in resp_lens]),
            "responses": nested([torch.randint(0, 9, (r,), generator=g) for r in resp_lens]),
            "response_mask": nested([torch.ones(r, dtype=torch.int64) for r in resp_lens]),
            "teacher_logprobs": nested([-torch.rand(PROMPT_LEN + r, 1, generator=g) for r in resp_lens]),
        },
        batch_size=[len(resp_lens)],
    )
    batch_num_tokens = sum(resp_lens) if batch_num_tokens is None else batch_num_tokens
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=len(resp_lens))
    tu.assign_non_tensor_data(data, "tip_loss_route", {"tip": tip, "tip_loss": {}, "step": step})
    return data


def tip_k3(data):
    """(per-token weighted losses (bsz, response_length), metrics) of loss_mode=tip_k3 from verl's registry, for a
    student whose log-probs differ from the teacher's at every token (so the loss is > 0 exactly where selected)."""
    from verl.trainer.distillation.losses import get_distillation_loss_fn
    from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig

    import tip_verl.verl_ext.plugin  # noqa: F401  (registers the tip_* losses, as verl's entry point does)

    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=4, loss_agg_mode="token-mean")
    loss = DistillationLossConfig(loss_mode="tip_k3", loss_max_clamp=None, use_task_rewards=False)
    g = torch.Generator().manual_seed(1)
    lengths = data["responses"].offsets().diff().tolist()
    student = nested([-1.0 - torch.rand(PROMPT_LEN + r, generator=g) for r in lengths])
    return get_distillation_loss_fn("tip_k3")(
        config=actor,
        distillation_config=DistillationConfig(distillation_loss=loss),
        model_output={"log_probs": student},
        data=data,
    )
