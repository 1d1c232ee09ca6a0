"""The on-policy loop on CPU: the student samples, the teacher scores, verl's estimator and policy loss update.

One step, top to bottom (N = prompts_per_step x group_size rollouts, T response positions):
  1. draw prompts; sample `group_size` responses each with HF generate (KV cache, batched)
  2. outcome reward from the task's checker, on each response's last token          (N, T)
  3. teacher and student hidden states; student log-probs and entropy, teacher log-probs of the
     student's tokens, and the exact per-position KL(pS || pT) over the vocabulary    (N, T)
  4. route `advantage` (verl's `tip_opd`): TIP selection and the hybrid advantage through verl's registry,
     then verl's `vanilla` policy loss (clipped PPO, aggregated by `agg_loss`).
     route `loss` (the paper's): TIP selection ranked on the exact KL, and the full-vocabulary divergence
     (`loss`: reverse_kl, forward_kl, jsd, or any divergence registered with teacher="logits" in
     tip_verl.core.distill_losses) backpropagated at the selected tokens only; with mix replace / add,
     verl's policy loss with the GRPO advantage on the other (replace) or all (add) tokens too.
     `adv_estimator=grpo`: the outcome advantage and the policy loss only.
  5. one AdamW step (linear warm-up over `warmup_steps`, then constant)
  6. every `eval_every` steps a greedy evaluation on held-out problems; one JSON line per step;
     a checkpoint every `checkpoint_every` steps and on Ctrl-C

Every distribution (student, teacher, sampling) is at `temperature`. The loop is a driver: token selection
comes from tip_verl.core, advantages from verl's estimator registry, the policy loss from verl.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
from verl.workers.config.actor import ActorConfig

import tip_verl.verl_ext.estimator  # noqa: F401  (registers tip_opd even when verl's plugin loading is off)
from tip_verl.core.advantages import TipTokens, gate_answer, select_and_reward
from tip_verl.core.answer_gate import AnswerRecord, answer_span
from tip_verl.core.config import TipConfig
from tip_verl.core.distill_losses import (
    NO_TEACHER_TERM,
    TipLossConfig,
    divergence_names,
    full_vocabulary_divergence,
    rollout_correct,
    split_by_outcome,
)
from tip_verl.core.metrics import tip_metrics
from tip_verl.core.schedule import teacher_coef_multiplier
from tip_verl.core.scores import divergence_estimate
from tip_verl.core.selected_divergence import exact_token_kl
from tip_verl.core.trust import teacher_trust
from tip_verl.local.checkpoint import CHECKPOINT, METRICS, load_checkpoint, save_checkpoint
from tip_verl.local.evaluate import evaluation, greedy_scores
from tip_verl.local.interrupt import stop_on_interrupt
from tip_verl.local.memory import max_rss_mb, saved_activations
from tip_verl.local.rollout import Rollout, head_logprobs_and_entropy, response_hidden, sample, selected_logprobs
from tip_verl.local.tasks import DEFAULT_TASK, Task, get_task
from tip_verl.local.timing import PhaseTimer
from tip_verl.verl_ext.rng import selection_generator
from tip_verl.verl_ext.step_context import TipStep, tip_step

ADV_ESTIMATORS = ("grpo", "tip_opd")
ROUTES = ("advantage", "loss")
RANK_BY = ("exact_kl", "sampled")


@dataclass
class LoopConfig:
    """Settings of one run. `tip` has the keys of verl's `algorithm.tip`.

    route: `advantage` (teacher reward r_t as a per-token advantage, verl's tip_opd) or `loss` (the paper's:
        the full-vocabulary divergence `loss` backpropagated at the selected tokens).
    rank_by: on the loss route, the divergence axis of the rules: `exact_kl` (KL(pS || pT) over the vocabulary,
        the paper's d_t) or `sampled` (the sampled-token estimate `tip.divergence`, what verl's teacher allows).
        The advantage route always ranks on the sampled-token estimate, as tip_opd does in verl.
    warmup_steps: the learning rate rises linearly to `lr` over these steps, then stays.
    tip_loss: the keys of verl's `algorithm.tip_loss` the loss route honours: TRACE's outcome split
        (`correct_loss` / `wrong_loss`: null = `loss`, 'none', or a `loss` name, per rollout by its outcome; with
        mix=replace, the selected tokens of a rollout given 'none' get the GRPO advantage instead) and the
        teacher-coefficient schedule (`schedule`, `warmup_steps`, `anneal_steps`, `final_coef`).
    """

    task: str = DEFAULT_TASK
    adv_estimator: str = "tip_opd"
    route: str = "loss"
    loss: str = "reverse_kl"
    rank_by: str = "exact_kl"
    tip: TipConfig = field(default_factory=lambda: TipConfig(rule="soft_or", ratio=0.5, mix="teacher_only"))
    tip_loss: TipLossConfig = field(default_factory=TipLossConfig)
    norm_adv_by_std_in_grpo: bool = True
    steps: int = 600
    prompts_per_step: int = 8
    group_size: int = 8
    temperature: float = 1.0
    lr: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 1.0
    clip_ratio: float = 0.2
    loss_agg_mode: str = "token-mean"
    eval_every: int = 50
    eval_size: int = 256
    checkpoint_every: int = 50
    dump_batch_at: int = 1  # step whose per-token TIP scores are saved for the quadrant plot
    seed: int = 0
    threads: int = 1
    logits_chunk_size: int = 1024  # tokens per chunk of the selected-token LM head in the loss

    def __post_init__(self):
        if isinstance(self.tip, dict):
            self.tip = TipConfig.from_any(self.tip)
        if isinstance(self.tip_loss, dict):
            self.tip_loss = TipLossConfig.from_any(self.tip_loss)
        for name, value, choices in (
            ("adv_estimator", self.adv_estimator, ADV_ESTIMATORS),
            ("route", self.route, ROUTES),
            ("loss", self.loss, divergence_names("logits")),
            ("rank_by", self.rank_by, RANK_BY),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r}; choose one of {list(choices)}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0.")
        self.tip_loss.check_divergences(divergence_names("logits"), "local loss")
        if self.tip_loss.correct_loss == NO_TEACHER_TERM and self.tip_loss.wrong_loss == NO_TEACHER_TERM:
            raise ValueError("tip_loss.correct_loss and wrong_loss are both 'none': no rollout gets the teacher; "
                             "give one outcome a divergence, or use adv_estimator='grpo'.")
        if self.route == "advantage" and self.tip_loss != TipLossConfig():
            raise ValueError("tip_loss (outcome split, teacher schedule) applies to the loss route; set route='loss' "
                             "(--route loss) or leave tip_loss at its defaults.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def actor_config(config: LoopConfig) -> ActorConfig:
    """verl's own actor config, carrying what the vanilla policy loss reads (clip ratios, aggregation)."""
    batch = config.prompts_per_step * config.group_size
    return ActorConfig(
        strategy="local",
        rollout_n=config.group_size,
        ppo_mini_batch_size=batch,
        ppo_micro_batch_size_per_gpu=batch,
        clip_ratio=config.clip_ratio,
        clip_ratio_low=config.clip_ratio,
        clip_ratio_high=config.clip_ratio,
        loss_agg_mode=config.loss_agg_mode,
    )


def outcome_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Each rollout's score (N,) on its last valid response token, as verl's reward managers do. (N, T)."""
    last = response_mask.sum(dim=1).clamp_min(1) - 1
    rewards = torch.zeros(response_mask.shape, dtype=torch.float32)
    rewards[torch.arange(len(scores)), last] = scores
    return rewards


def grpo_advantages(config: LoopConfig, rewards: torch.Tensor, response_mask: torch.Tensor, uids: np.ndarray):
    """verl's GRPO outcome advantage (N, T) from the registry."""
    advantages, _ = get_adv_estimator_fn("grpo")(
        token_level_rewards=rewards,
        response_mask=response_mask,
        index=uids,
        norm_adv_by_std_in_grpo=config.norm_adv_by_std_in_grpo,
    )
    return advantages


def tip_opd_advantages(
    config: LoopConfig,
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    uids: np.ndarray,
    old_log_probs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    entropy: torch.Tensor,
    step: int,
    teacher_correct: Optional[torch.Tensor] = None,
    answer: Optional[torch.Tensor] = None,
    answer_record: Optional[AnswerRecord] = None,
) -> tuple[torch.Tensor, TipTokens]:
    """verl's `tip_opd` advantages (N, T) and what TIP selected. Inputs (N, T).

    step (1-based) seeds the random rules as verl's trainer does, so a resumed run draws the same tokens.
    teacher_correct: (N,) bool, the checker's verdict on the teacher's own answer (teacher_trust=verified).
    answer: (N, T) bool, each response's answer tokens (answer_teacher other than always).
    answer_record: the run's record of the teacher on accepted answers (answer_teacher=confirm_on_record).
    """
    bind = TipStep(step_index=step - 1, teacher_correct=teacher_correct, answer=answer, answer_record=answer_record)
    with tip_step(bind) as bound:
        advantages, _ = get_adv_estimator_fn("tip_opd")(
            token_level_rewards=rewards,
            response_mask=response_mask,
            index=uids,
            config={"tip": dataclasses.asdict(config.tip), "norm_adv_by_std_in_grpo": config.norm_adv_by_std_in_grpo},
            old_log_probs=old_log_probs,
            teacher_logprobs=teacher_logprobs,
            entropy=entropy,
        )
    return advantages, bound.tokens


def loss_route_tokens(
    config: LoopConfig,
    response_mask: torch.Tensor,
    old_log_probs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    entropy: torch.Tensor,
    exact_kl: torch.Tensor,
    step: int,
) -> TipTokens:
    """TIP's selection on the loss route, ranked on the exact KL (N, T) or on the sampled-token estimate."""
    return select_and_reward(
        config.tip,
        response_mask,
        old_log_probs=old_log_probs,
        teacher_logprobs=teacher_logprobs,
        entropy=entropy,
        generator=selection_generator(config.tip.seed, step - 1),
        divergence=exact_kl if config.rank_by == "exact_kl" else None,
    )


def divergences_by_outcome(config: LoopConfig, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Which rollouts get which divergence on the loss route, TRACE's outcome split: {loss name: bool (N,)}, from
    each rollout's outcome rewards (N, T) and `tip_loss.correct_loss` / `wrong_loss` (null: `loss`; 'none': none)."""
    correct = rollout_correct(rewards, config.tip.correct_threshold)
    return split_by_outcome(config.tip_loss, correct, config.loss)


def distilled_mask(config: LoopConfig, response_mask: torch.Tensor, tokens: Optional[TipTokens],
                   rows_by_divergence: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tokens that get the full-vocabulary divergence on the loss route: selected, of a rollout that gets a
    divergence and the teacher is trusted on. (N, T)."""
    if tokens is None or config.route != "loss" or not rows_by_divergence:
        return torch.zeros_like(response_mask)
    distilled_rows = torch.stack(list(rows_by_divergence.values())).any(dim=0)
    if tokens.trust is not None:
        distilled_rows = distilled_rows & ~tokens.trust.distrusted
    return response_mask * tokens.selected * distilled_rows.unsqueeze(-1)


def policy_loss_mask(config: LoopConfig, response_mask: torch.Tensor, tokens: Optional[TipTokens],
                     distilled: torch.Tensor) -> torch.Tensor:
    """The tokens verl's policy loss averages over. (N, T).

    grpo, and mix=add: every response token. Advantage route: with mix=teacher_only the unselected tokens carry
    no signal (advantage 0) and are left out, as TIP drops them, so the token mean is over the selected tokens
    and the step size does not shrink with the ratio; with replace every token carries a signal.
    Loss route: the `distilled` tokens get the divergence instead, so the policy loss covers the others
    (replace) or none (teacher_only). Rollouts the teacher is distrusted on (checked trust) keep the policy
    loss on every token, on both routes.
    """
    if tokens is None or config.tip.mix == "add":
        return response_mask
    if config.tip.mix == "replace":
        return response_mask - distilled
    kept = tokens.selected.float() if config.route == "advantage" else torch.zeros_like(response_mask)
    if tokens.trust is not None:
        kept = torch.maximum(kept, tokens.trust.distrusted[:, None].float())
    return response_mask * kept


@dataclass
class StepBatch:
    """One step's rollouts as the update reads them: N rollouts, T response positions, H hidden size."""

    rollout: Rollout
    scores: torch.Tensor  # (N,) the checker's outcome of each rollout
    rewards: torch.Tensor  # (N, T) that outcome on each rollout's last response token
    uids: np.ndarray  # (N,) the prompt of each rollout: its GRPO group
    teacher_hidden: torch.Tensor  # (N, T, H_teacher)
    teacher_logp: torch.Tensor  # (N, T) the teacher's log-probs of the sampled tokens
    teacher_correct: Optional[torch.Tensor]  # (N,) bool, the checker on the teacher's own answer (verified trust)
    answer: Optional[torch.Tensor]  # (N, T) bool, each response's tokens after tip.answer_marker (answer_teacher)
    hidden: torch.Tensor  # (N, T, H) the student's, with grad
    old_log_prob: torch.Tensor  # (N, T) the student's log-probs of the sampled tokens, detached
    entropy: torch.Tensor  # (N, T) the student's entropy
    exact_kl: torch.Tensor  # (N, T) KL(pS || pT) over the vocabulary

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask


def checker_scores(task: Task, problems: list, rollout: Rollout, group_size: int) -> torch.Tensor:
    """The checker's score (N,) of each response; the `group_size` rollouts of a prompt are adjacent."""
    tokenizer = task.tokenizer()
    return torch.tensor(
        [task.check(problems[i // group_size], tokenizer.decode(r)) for i, r in enumerate(rollout.responses)]
    )


def teacher_verdicts(config: LoopConfig, teacher: torch.nn.Module, task: Task, problems: list) -> Optional[torch.Tensor]:
    """With teacher_trust=verified, whether the checker accepts the teacher's own greedy answer, bool (N,)."""
    if config.tip.teacher_trust != "verified":
        return None
    answers = torch.tensor(greedy_scores(teacher, task, problems)) > config.tip.correct_threshold
    return answers.repeat_interleave(config.group_size)


def answer_tokens(config: LoopConfig, task: Task, rollout: Rollout) -> Optional[torch.Tensor]:
    """With tip.answer_teacher other than always, each response's tokens after tip.answer_marker, bool (N, T)."""
    if config.tip.answer_teacher == "always":
        return None
    marker_ids = task.tokenizer().encode(config.tip.answer_marker)
    return answer_span(rollout.responses, rollout.response_mask, marker_ids)


def advantages_and_tokens(
    config: LoopConfig, batch: StepBatch, step: int, answer_record: AnswerRecord
) -> tuple[torch.Tensor, Optional[TipTokens]]:
    """The advantages (N, T) verl's policy loss reads, and what TIP selected (None with grpo). `answer_record`, the
    run's record of the teacher on accepted answers, is updated with answer_teacher=confirm_on_record."""
    mask = batch.mask
    if config.adv_estimator == "grpo":
        return grpo_advantages(config, batch.rewards, mask, batch.uids), None
    if config.route == "advantage":
        return tip_opd_advantages(
            config, batch.rewards, mask, batch.uids, batch.old_log_prob, batch.teacher_logp, batch.entropy, step,
            batch.teacher_correct, batch.answer, answer_record,
        )
    tokens = loss_route_tokens(config, mask, batch.old_log_prob, batch.teacher_logp, batch.entropy, batch.exact_kl, step)
    gate_answer(tokens, config.tip, batch.answer, batch.scores, batch.teacher_logp, record=answer_record)
    if config.tip.teacher_trust != "always":
        tokens.trust = teacher_trust(
            batch.scores, batch.uids, batch.teacher_logp, mask, config.tip.endorse_prob, config.tip.correct_threshold,
            teacher_correct=batch.teacher_correct,
        )
    return grpo_advantages(config, batch.rewards, mask, batch.uids), tokens


def policy_loss(
    config: LoopConfig, actor: ActorConfig, student: torch.nn.Module, batch: StepBatch, trained: torch.Tensor,
    advantages: torch.Tensor,
) -> tuple[torch.Tensor, dict]:
    """verl's vanilla policy loss over the `trained` tokens (N, T), and its metrics; 0 when there is none."""
    if not trained.any():
        return torch.zeros(()), {}
    log_prob = selected_logprobs(
        student, batch.hidden, batch.rollout, trained, config.logits_chunk_size, config.temperature
    )
    return get_policy_loss_fn("vanilla")(
        old_log_prob=batch.old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=trained,
        loss_agg_mode=config.loss_agg_mode,
        config=actor,
    )


def distillation_loss(
    config: LoopConfig, student: torch.nn.Module, teacher: torch.nn.Module, batch: StepBatch,
    distilled: torch.Tensor, rows_by_divergence: dict[str, torch.Tensor], step: int,
) -> torch.Tensor:
    """The teacher term: each rollout's full-vocabulary divergence, averaged over the `distilled` tokens (N, T),
    times the scheduled teacher coefficient."""
    teacher_coef = config.tip.coef * teacher_coef_multiplier(
        step - 1, config.tip_loss.schedule, config.tip_loss.warmup_steps, config.tip_loss.anneal_steps,
        config.tip_loss.final_coef,
    )
    divergence_sum = sum(
        full_vocabulary_divergence(
            name, batch.hidden, student.lm_head.weight, batch.teacher_hidden, teacher.lm_head.weight,
            (distilled * rows.unsqueeze(-1)).bool(), chunk_size=config.logits_chunk_size,
            temperature=config.temperature,
        ).sum()
        for name, rows in rows_by_divergence.items()
    )
    return teacher_coef * divergence_sum / distilled.sum()


def optimizer_step(
    config: LoopConfig, optimizer: torch.optim.Optimizer, student: torch.nn.Module, loss: torch.Tensor, step: int
) -> torch.Tensor:
    """One AdamW step at the warmed-up learning rate, gradients clipped at `grad_clip`; returns the gradient norm."""
    for group in optimizer.param_groups:
        group["lr"] = config.lr * min(1.0, step / max(1, config.warmup_steps))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
    optimizer.step()
    return grad_norm


def batch_metrics(batch: StepBatch) -> dict:
    """Outcome, length, teacher-student divergence and entropy of the step's rollouts, per valid token."""
    mask = batch.mask
    n_valid = mask.sum().clamp_min(1)
    k1 = divergence_estimate(batch.teacher_logp, batch.old_log_prob, mask, "k1")
    return {
        "reward/mean": batch.scores.mean().item(),
        "response_length/mean": mask.sum(dim=1).float().mean().item(),
        "kl/teacher": (k1.sum() / n_valid).item(),
        "kl/teacher_exact": ((batch.exact_kl * mask).sum() / n_valid).item(),
        "entropy/mean": ((batch.entropy * mask).sum() / n_valid).item(),
    }


def train_step(
    config: LoopConfig,
    task: Task,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    problem_rng: random.Random,
    actor: ActorConfig,
    step: int,
    answer_record: Optional[AnswerRecord] = None,
) -> tuple[dict, dict]:
    """One on-policy step (`step`, 1-based). Returns its metrics and the per-token tensors of the batch.
    `answer_record` carries the teacher's record on accepted answers across steps (a fresh one if None)."""
    answer_record = AnswerRecord() if answer_record is None else answer_record
    timer, temperature = PhaseTimer(), config.temperature
    problems = [task.sample(problem_rng) for _ in range(config.prompts_per_step)]
    with timer("rollout"):
        rollout = sample(
            student, task.tokenizer(), [task.prompt(p) for p in problems], task.max_new_tokens,
            group_size=config.group_size, temperature=temperature,
        )
    mask = rollout.response_mask
    with timer("reward"):
        scores = checker_scores(task, problems, rollout, config.group_size)
        rewards = outcome_rewards(scores, mask)
        uids = np.repeat(np.arange(len(problems)), config.group_size)
    with timer("teacher"), torch.no_grad():
        teacher_hidden = response_hidden(teacher, rollout)
        teacher_logp, _ = head_logprobs_and_entropy(teacher, teacher_hidden, rollout, temperature)
        teacher_correct = teacher_verdicts(config, teacher, task, problems)
    answer = answer_tokens(config, task, rollout)

    with saved_activations(student) as memory:
        with timer("student_forward"):
            # one forward serves both: one update per batch, so the old policy is the current one
            hidden = response_hidden(student, rollout)
            old_log_prob, entropy = head_logprobs_and_entropy(student, hidden.detach(), rollout, temperature)
            exact_kl, _ = exact_token_kl(
                hidden.detach(), student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, mask.bool(),
                chunk_size=config.logits_chunk_size, temperature=temperature,
            )
        batch = StepBatch(rollout, scores, rewards, uids, teacher_hidden, teacher_logp, teacher_correct, answer, hidden,
                          old_log_prob, entropy, exact_kl)
        with timer("advantage"):
            advantages, tokens = advantages_and_tokens(config, batch, step, answer_record)
        rows_by_divergence = divergences_by_outcome(config, rewards)
        distilled = distilled_mask(config, mask, tokens, rows_by_divergence)
        trained = policy_loss_mask(config, mask, tokens, distilled)
        with timer("loss"):
            # the graph holds full-vocabulary buffers only for the trained tokens
            loss, pg_metrics = policy_loss(config, actor, student, batch, trained, advantages)
            if distilled.any():
                loss = loss + distillation_loss(config, student, teacher, batch, distilled, rows_by_divergence, step)
    with timer("update"):
        grad_norm = optimizer_step(config, optimizer, student, loss, step)

    n_valid = mask.sum().clamp_min(1)
    metrics = {
        **batch_metrics(batch),
        "tokens/trained_fraction": (((trained + distilled) > 0).sum() / n_valid).item(),
        "tokens/nonzero_advantage_fraction": (((advantages != 0) & (trained > 0)).sum() / n_valid).item(),
        "actor/loss": loss.item(),
        "actor/grad_norm": grad_norm.item(),
        "actor/lr": optimizer.param_groups[0]["lr"],
        **pg_metrics,
        "mem/saved_activations_mb": memory["bytes"] / 2**20,
        **timer.metrics(),
        "time/step": round(sum(timer.seconds.values()), 4),
    }
    per_token = {"response_mask": mask, "entropy": entropy, "teacher_logprobs": teacher_logp,
                 "log_probs": old_log_prob, "exact_kl": exact_kl}
    if tokens is not None:
        metrics.update(tip_metrics(tokens, mask))
        per_token.update(selected=tokens.selected, divergence=tokens.divergence, quadrant=tokens.quadrant)
        if tokens.answer is not None:
            per_token.update(answer=tokens.answer.answer)
    return metrics, per_token


def train(
    config: LoopConfig,
    out: Path,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    resume: bool = False,
    on_step: Callable[[dict], None] = lambda record: None,
) -> str:
    """Run (or resume) the loop, writing out/metrics.jsonl, out/checkpoint.pt and out/batch_step<k>.pt.

    Returns "completed", or "interrupted" after a Ctrl-C (the checkpoint is then at the last finished step).
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    task = get_task(config.task)
    problem_rng = random.Random(config.seed)
    eval_problems = task.heldout(config.eval_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    actor = actor_config(config)
    teacher.eval()
    student.train()

    start, answer_record = 0, AnswerRecord()
    if resume and (out / CHECKPOINT).exists():
        start = load_checkpoint(out, student, optimizer, problem_rng, answer_record)
    else:  # a fresh run in a used folder starts over
        for stale in (out / METRICS, out / CHECKPOINT):
            stale.unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    def write(record: dict) -> None:
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        on_step(record)

    if start == 0:
        write({
            "step": 0,
            **evaluation(student, task, eval_problems),
            **evaluation(teacher, task, eval_problems, prefix="eval/teacher_"),
        })

    step = start
    with stop_on_interrupt() as stop:
        for step in range(start + 1, config.steps + 1):
            metrics, batch = train_step(
                config, task, teacher, student, optimizer, problem_rng, actor, step, answer_record
            )
            if step == config.dump_batch_at:
                torch.save(batch, out / f"batch_step{step}.pt")
            if step % config.eval_every == 0 or step == config.steps:
                timer = PhaseTimer()
                with timer("eval"):
                    metrics.update(evaluation(student, task, eval_problems))
                metrics.update(timer.metrics())
            metrics["mem/max_rss_mb"] = max_rss_mb()
            write({"step": step, **metrics})
            if step % config.checkpoint_every == 0 or step == config.steps or stop.requested:
                save_checkpoint(out, step, student, optimizer, problem_rng, config.to_dict(), answer_record)
            if stop.requested:
                return "interrupted"
    return "completed"
