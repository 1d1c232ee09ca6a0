"""Token-level teacher gates on the answer, for the hybrid on `add3_scratch_flawed` (a teacher wrong at one
decision: on four-digit sums it writes the hundreds digit where the final carry belongs, ";078" for 1078).

A prompt-level gate does not stop that habit (results.md, "A checker-verified teacher"): the teacher's pressure
on the answers of the problems it gets right generalises to the ones it gets wrong. Each gate takes TIP's
selected tokens in the answer (every token after the first ';', the EOS included) off the teacher, so they get
the outcome (GRPO) advantage (mix=replace), on every prompt; the scratchpad is distilled as TIP selects. Some
gates then give part of the answer back to the teacher:

  first            only the answer's first token is gated (the decision the teacher gets wrong)
  answer           the whole answer is gated
  confirmed        the whole answer is gated, except the tokens of rollouts the checker accepts that the teacher
                   would write too (pT(y_t) >= 0.5): on the answer the teacher may confirm, never refute
  evidence         as confirmed in the steps whose batch holds evidence against the teacher on the answer (an
                   accepted rollout with an answer token the teacher refutes, pT(y_t) < 0.5); TIP unchanged in
                   the other steps
  verified_answer  the whole answer is gated, except the tokens where the teacher's argmax equals the token at
                   the same answer offset of an accepted rollout of the same group

Experiment code, not the package's: it finds the answer from the task's format and patches the demo loop's
`advantages_and_tokens` in the run's own process (`compare_methods.py` installs it for the methods that name
an `answer_gate`).
"""

from __future__ import annotations

import math

import torch

from tip_verl.core.advantages import mix_advantages
from tip_verl.local import loop

GATES = ("first", "answer", "confirmed", "evidence", "verified_answer")
CONFIRM_PROB = 0.5  # the teacher writes y_t itself (confirms it) when pT(y_t) >= this, refutes it below


def answer_positions(responses: torch.Tensor, separator_id: int, first_only: bool = False) -> torch.Tensor:
    """(N, T) bool: the positions strictly after each response's first separator, or only the first of them."""
    is_separator = (responses == separator_id).long()
    after = (is_separator.cumsum(dim=1) - is_separator) > 0
    if not first_only:
        return after
    return after & ~torch.cat([torch.zeros_like(after[:, :1]), after[:, :-1]], dim=1)


def teacher_writes_accepted_answer(batch, answer: torch.Tensor, correct: torch.Tensor,
                                   teacher_head: torch.Tensor) -> torch.Tensor:
    """(N, T) bool: answer positions where the teacher's argmax token equals the token at the same answer offset
    of an accepted rollout of the same group (none where the group has no accepted rollout)."""
    teacher_choice = (batch.teacher_hidden @ teacher_head.T).argmax(dim=-1)  # (N, T)
    offset = answer.long().cumsum(dim=1) - 1  # 0 at the answer's first token
    answer = answer & batch.mask.bool()
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


def install(gate: str, separator_id: int, teacher_head: torch.Tensor) -> list[bool]:
    """Patch the demo loop so TIP's selection goes through `gate`; returns the list it appends, per step, whether
    the batch held evidence against the teacher on the answer."""
    if gate not in GATES:
        raise ValueError(f"answer_gate={gate!r}; choose one of {GATES}.")
    original, evidence = loop.advantages_and_tokens, []

    def advantages_and_tokens(config, batch, step):
        advantages, tokens = original(config, batch, step)
        if tokens is None:
            return advantages, tokens
        answer = answer_positions(batch.rollout.responses, separator_id) & batch.mask.bool()
        correct = batch.scores > config.tip.correct_threshold
        confirms = batch.teacher_logp >= math.log(CONFIRM_PROB)
        refuted = answer & correct[:, None] & ~confirms
        evidence.append(bool(refuted.any()))
        if gate == "evidence" and not refuted.any():
            return advantages, tokens
        gated = answer_positions(batch.rollout.responses, separator_id, first_only=True) if gate == "first" else answer
        selected = tokens.selected.bool() & ~gated
        if gate in ("confirmed", "evidence"):
            selected = selected | (answer & correct[:, None] & confirms)
        if gate == "verified_answer":
            selected = selected | teacher_writes_accepted_answer(batch, answer, correct, teacher_head)
        tokens.selected = selected.to(tokens.selected.dtype)
        if config.route == "advantage":  # the gated tokens take the outcome advantage instead
            outcome = loop.grpo_advantages(config, batch.rewards, batch.mask, batch.uids)
            advantages = mix_advantages(outcome, tokens.teacher_reward, selected, batch.mask, config.tip.mix,
                                        config.tip.coef)
        return advantages, tokens

    loop.advantages_and_tokens = advantages_and_tokens
    return evidence
