"""Teacher gates on the answer that the package does not offer, for comparison with `algorithm.tip.answer_teacher`
(tip_verl/core/answer_gate.py: `confirm`, `confirm_on_evidence`) on `add3_scratch_flawed`.

Each takes TIP's selected tokens in the answer (the tokens after the first ';', the EOS included) off the
teacher, so they get the outcome (GRPO) advantage (mix=replace), on every prompt:

  first            only the answer's first token is gated (the decision the flawed teacher gets wrong)
  answer           the whole answer is gated
  verified_answer  the whole answer is gated, except the tokens where the teacher's argmax equals the token at
                   the same answer offset of an accepted rollout of the same group (the teacher may correct a
                   wrong rollout towards an answer the checker accepted)

Experiment code: it patches the demo loop's `advantages_and_tokens` in the run's own process
(`compare_methods.py` installs it for the methods that name an `answer_gate`).
"""

from __future__ import annotations

import torch

from tip_verl.core.advantages import mix_advantages
from tip_verl.core.answer_gate import answer_span
from tip_verl.local import loop

GATES = ("first", "answer", "verified_answer")


def first_tokens(answer: torch.Tensor) -> torch.Tensor:
    """(N, T) bool: the first position of each row's answer."""
    return answer & ~torch.cat([torch.zeros_like(answer[:, :1]), answer[:, :-1]], dim=1)


def teacher_writes_accepted_answer(batch, answer: torch.Tensor, correct: torch.Tensor,
                                   teacher_head: torch.Tensor) -> torch.Tensor:
    """(N, T) bool: answer positions where the teacher's argmax token equals the token at the same answer offset
    of an accepted rollout of the same group (none where the group has no accepted rollout)."""
    teacher_choice = (batch.teacher_hidden @ teacher_head.T).argmax(dim=-1)  # (N, T)
    offset = answer.long().cumsum(dim=1) - 1  # 0 at the answer's first token
    result = torch.zeros_like(answer)
    for group in set(batch.uids.tolist()):
        rows = torch.as_tensor(batch.uids == group).nonzero().flatten().tolist()
        accepted = [r for r in rows if correct[r]]
        if not accepted:
            continue
        reference = batch.rollout.responses[accepted[0]][answer[accepted[0]]]
        for r in rows:
            for p in answer[r].nonzero().flatten().tolist():
                k = int(offset[r, p])
                result[r, p] = k < len(reference) and int(teacher_choice[r, p]) == int(reference[k])
    return result


def install(gate: str, separator_id: int, teacher_head: torch.Tensor) -> None:
    """Patch the demo loop so TIP's selection goes through `gate`."""
    if gate not in GATES:
        raise ValueError(f"answer_gate={gate!r}; choose one of {GATES}.")
    original = loop.advantages_and_tokens

    def advantages_and_tokens(config, batch, step):
        advantages, tokens = original(config, batch, step)
        if tokens is None:
            return advantages, tokens
        answer = answer_span(batch.rollout.responses, batch.mask, [separator_id])
        selected = tokens.selected.bool() & ~(first_tokens(answer) if gate == "first" else answer)
        if gate == "verified_answer":
            correct = batch.scores > config.tip.correct_threshold
            selected = selected | teacher_writes_accepted_answer(batch, answer, correct, teacher_head)
        tokens.selected = selected.to(tokens.selected.dtype)
        if config.route == "advantage":  # the gated tokens take the outcome advantage instead
            outcome = loop.grpo_advantages(config, batch.rewards, batch.mask, batch.uids)
            advantages = mix_advantages(outcome, tokens.teacher_reward, selected, batch.mask, config.tip.mix,
                                        config.tip.coef)
        return advantages, tokens

    loop.advantages_and_tokens = advantages_and_tokens
