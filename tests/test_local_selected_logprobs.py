"""The local loop's loss stage: log-probs at the trained tokens only equal the full-vocabulary route."""

import torch

from tip_verl.local.assets import load_role
from tip_verl.local.rollout import (
    response_hidden,
    response_logits,
    sample,
    selected_logprobs,
    token_logprobs,
)
from tip_verl.local.tasks import DEFAULT_TASK, get_task


def test_selected_logprobs_match_full_logits_values_and_gradients():
    torch.manual_seed(0)
    task = get_task(DEFAULT_TASK)
    student, _ = load_role(task, "student")
    problems = task.heldout(4, seed=3)
    rollout = sample(student, task.tokenizer(), [task.prompt(p) for p in problems], task.max_new_tokens, group_size=2)
    mask = rollout.response_mask.bool()
    selected = mask & (torch.rand(mask.shape) < 0.4)
    weights = torch.randn(mask.shape)

    full = token_logprobs(response_logits(student, rollout), rollout.responses).masked_fill(~selected, 0.0)
    (full * weights).sum().backward()
    full_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    partial = selected_logprobs(student, response_hidden(student, rollout), rollout, selected, chunk_size=3)
    (partial * weights).sum().backward()
    torch.testing.assert_close(partial, full, atol=1e-5, rtol=1e-5)
    assert (partial[~selected] == 0).all()
    for expected, param in zip(full_grads, student.parameters()):
        torch.testing.assert_close(param.grad, expected, atol=1e-5, rtol=1e-4)
