"""The graded answer, where the checker has the last word: the teacher may confirm it, never refute it.

TIP hands the teacher the tokens where student and teacher disagree most. When the teacher is wrong at a
decision (a habit, not a slip: e.g. it drops a final carry), that decision is exactly where they disagree, and
the teacher's pressure there on the problems it gets right teaches the student the habit on the ones it gets
wrong: a gate per prompt does not stop it (experiments/results.md). The checker grades the answer, so on the
answer, the tokens after the first `answer_marker` of a response, its verdict is the better signal:

  confirm              on the answer the teacher keeps only the tokens of rollouts the checker accepts that it
                       would write itself (pT(y_t) >= endorse_prob): it may confirm an accepted answer. Every
                       other answer token gets the outcome (GRPO) advantage, however TIP ranked it.
  confirm_on_evidence  as confirm, in the steps whose batch holds evidence against the teacher on the answer:
                       an answer token of an accepted rollout that the teacher would not write (it refutes what
                       the checker accepts). Elsewhere TIP is unchanged, so a teacher that is right on the
                       answers keeps correcting them.
  confirm_on_record    as confirm, while the teacher's record over the run says it refutes more than
                       `answer_tolerance` of the accepted answers it was shown (AnswerRecord). The teacher is
                       frozen, so this share estimates a fixed habit of it, where the per-step evidence of
                       confirm_on_evidence vanishes once the student has taken the habit up; until the
                       checker has accepted an answer, the gate acts.
  always               TIP unchanged.

The reasoning before the marker is distilled as TIP selects, in every mode.

Shapes: B rollouts, T response positions. No verl import here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

ANSWER_TEACHER_MODES = ("always", "confirm", "confirm_on_evidence", "confirm_on_record")


def answer_span(responses: torch.Tensor, response_mask: torch.Tensor, marker_ids: Sequence[int]) -> torch.Tensor:
    """The answer of each response: its valid positions strictly after the first occurrence of the token
    sequence `marker_ids`; none in a response without it.

    Args:
        responses: (B, T) token ids.
        response_mask: (B, T) 1 on valid response tokens.
        marker_ids: the marker's token ids, at least one.
    Returns:
        (B, T) bool.
    """
    if len(marker_ids) == 0:
        raise ValueError("algorithm.tip.answer_marker tokenizes to no token: set a non-empty marker, e.g. '####'.")
    if responses.dim() != 2 or responses.shape != response_mask.shape:
        raise ValueError(
            f"responses {tuple(responses.shape)} and response_mask {tuple(response_mask.shape)} must both be "
            "(batch, response_length)."
        )
    width = len(marker_ids)
    valid = response_mask.bool()
    ends = torch.zeros_like(valid)  # the marker's last token is here
    if responses.shape[1] >= width:
        windows = responses.unfold(1, width, 1)  # (B, T - width + 1, width)
        marker = torch.as_tensor(list(marker_ids), dtype=responses.dtype, device=responses.device)
        found = (windows == marker).all(dim=-1) & valid[:, width - 1 :]
        ends[:, width - 1 :] = found
    seen = ends.long().cumsum(dim=1) - ends.long()  # markers ending strictly before this position
    return (seen > 0) & valid


@dataclass
class AnswerRecord:
    """The teacher's record on the answers the checker accepted so far in a run (confirm_on_record): how many
    accepted answers it was shown, and how many of them it refutes (it would not write some token of them).
    Counted whether or not the gate acted; saved with the run's checkpoint."""

    accepted: int = 0
    refuted: int = 0

    def add(self, confirmed: torch.Tensor, refuted: torch.Tensor) -> None:
        """Count one step's accepted answers: confirmed, refuted (B, T) bool as in AnswerGate."""
        self.accepted += int((confirmed | refuted).any(dim=-1).sum())
        self.refuted += int(refuted.any(dim=-1).sum())

    def refuted_share(self) -> float:
        """The share of accepted answers the teacher refutes; 1.0 before any answer was accepted (unproven)."""
        return self.refuted / self.accepted if self.accepted else 1.0

    def state_dict(self) -> dict[str, int]:
        return {"accepted": self.accepted, "refuted": self.refuted}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.accepted, self.refuted = int(state["accepted"]), int(state["refuted"])


@dataclass
class AnswerGate:
    """What the gate saw and did in one step; tensors (B, T) bool."""

    mode: str
    answer: torch.Tensor  # the answer tokens (answer_span)
    confirmed: torch.Tensor  # answer tokens of accepted rollouts that the teacher would write
    refuted: torch.Tensor  # answer tokens of accepted rollouts that the teacher would not write: the evidence
    active: bool  # whether the gate acts this step
    record: Optional[AnswerRecord] = None  # the run's record, with confirm_on_record

    def apply(self, selected: torch.Tensor) -> torch.Tensor:
        """TIP's selection (B, T) bool with the answer handed to the checker: only the confirmed answer tokens
        keep the teacher; the selection unchanged when the gate is not active."""
        return hand_answer_to_checker(selected, *self.handed())

    def handed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer tokens the checker decides this step and those of them the teacher keeps, (B, T) bool each;
        none when the gate is not active. verl's loss route sends them to the actor, where TIP selects."""
        if not self.active:
            none = torch.zeros_like(self.answer)
            return none, none
        return self.answer, self.confirmed

    def metrics(self) -> dict[str, float]:
        """`tip/answer/...`: whether the gate acted, the share of rollouts with an answer (the marker found), and
        the shares of answer tokens confirmed and refuted by the teacher on accepted rollouts."""
        n_answer = max(1, int(self.answer.sum()))
        record = {} if self.record is None else {"tip/answer/record_refuted_share": self.record.refuted_share()}
        return {
            **record,
            "tip/answer/gated": float(self.active),
            "tip/answer/found_fraction": float(self.answer.any(dim=-1).float().mean()) if self.answer.numel() else 0.0,
            "tip/answer/confirmed_fraction": int(self.confirmed.sum()) / n_answer,
            "tip/answer/refuted_fraction": int(self.refuted.sum()) / n_answer,
        }


def hand_answer_to_checker(selected: torch.Tensor, handed: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """TIP's selection (B, T) bool where the checker decides the `handed` tokens: of them the teacher keeps only
    `kept` (selected by TIP or not), the others go to the outcome advantage (AnswerGate.handed gives both)."""
    return (selected.bool() & ~handed.bool()) | kept.bool()


def answer_gate(
    mode: str,
    answer: torch.Tensor,
    scores: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    endorse_prob: float,
    correct_threshold: float = 0.0,
    record: Optional[AnswerRecord] = None,
    tolerance: float = 0.1,
) -> AnswerGate:
    """Judge the teacher on the answer with the checker's verdicts (see the module docstring).

    Args:
        mode: one of ANSWER_TEACHER_MODES.
        answer: (B, T) bool, the answer tokens (answer_span).
        scores: (B,) each rollout's outcome score; accepted means score > correct_threshold.
        teacher_logprobs: (B, T) log pT(y_t) of the sampled tokens.
        endorse_prob: in (0, 1]: the teacher would write y_t itself when pT(y_t) >= this.
        record: the run's AnswerRecord, which this step's accepted answers are added to (confirm_on_record).
        tolerance: in [0, 1): confirm_on_record acts while the record's refuted share is above it.
    Returns:
        AnswerGate; its `apply` gives the gated selection.
    """
    if mode not in ANSWER_TEACHER_MODES:
        raise ValueError(f"algorithm.tip.answer_teacher={mode!r} is not known; set one of {list(ANSWER_TEACHER_MODES)}.")
    if scores.dim() != 1 or scores.shape[0] != answer.shape[0] or teacher_logprobs.shape != answer.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} must be (batch,) and teacher_logprobs {tuple(teacher_logprobs.shape)} "
            f"(batch, response_length) like the answer mask {tuple(answer.shape)}."
        )
    answer = answer.bool()
    accepted = (scores.float() > correct_threshold).to(answer.device)[:, None] & answer
    writes = teacher_logprobs.float() >= math.log(endorse_prob)
    confirmed, refuted = accepted & writes, accepted & ~writes
    if mode == "confirm_on_record":
        if record is None:
            raise ValueError(
                "algorithm.tip.answer_teacher=confirm_on_record keeps the teacher's record over the run, which no "
                "one holds here: use trainer.v1.trainer_mode=tip_sync (its trainer holds it) or the demo loop."
            )
        record.add(confirmed, refuted)
        active = record.refuted_share() > tolerance
    else:
        record = None
        active = mode == "confirm" or (mode == "confirm_on_evidence" and bool(refuted.any()))
    return AnswerGate(mode=mode, answer=answer, confirmed=confirmed, refuted=refuted, active=active, record=record)
