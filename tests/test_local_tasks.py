"""The CPU demo's pieces: task checkers, every task's teacher and student, the tokenizer, and the
rollout's padding and EOS masks."""

import random
import re
import signal
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from tip_verl.cli import main
from tip_verl.local.assets import BelowTarget, load_role, max_positions
from tip_verl.local.evaluate import evaluation, greedy_accuracy, reference_batch
from tip_verl.local.models import ModelSize, build_model, save_model
from tip_verl.local.plans import SftPlan, TrainPlan
from tip_verl.local.rollout import Rollout, response_logits, response_mask_from, sample
from tip_verl.local import tasks
from tip_verl.local.tasks import TASKS, Task, get_task, is_heldout, register_task
from tip_verl.local.tokenizer import CharTokenizer


def test_scratchpad_solution_and_checker():
    task = get_task("add3_scratch")
    assert task.prompt((482, 596)) == "482+596="
    assert task.solution((482, 596)) == "2+6=8,8+9=17,4+5+1=10;1078"
    assert task.solution((7, 5)) == "7+5=12,0+0+1=1,0+0=0;12"
    assert task.check((482, 596), "2+6=8,8+9=17,4+5+1=10;1078") == 1.0
    assert task.check((482, 596), "wrong scratchpad;1078") == 1.0  # the reward reads the answer only
    assert task.check((482, 596), "2+6=8,8+9=17,4+5+1=10;1079") == 0.0
    assert task.check((482, 596), "2+6=8,8+9=17,4+5+1=10") == 0.0
    assert task.check((482, 596), "") == 0.0


def test_reversed_solution_and_checker():
    task = get_task("add3_reversed")
    assert task.solution((482, 596)) == ";8701"
    assert task.check((482, 596), ";8701") == 1.0
    assert task.check((482, 596), ";1078") == 0.0


def test_the_flawed_teacher_is_taught_to_drop_the_final_carry_of_four_digit_sums_only():
    task = get_task("add3_scratch_flawed")
    assert task.reference("teacher")((482, 596)) == "2+6=8,8+9=17,4+5+1=10;078"
    assert task.reference("student")((482, 596)) == task.solution((482, 596)) == "2+6=8,8+9=17,4+5+1=10;1078"
    assert task.check((482, 596), task.reference("teacher")((482, 596))) == 0.0
    assert task.reference("teacher")((123, 456)) == task.solution((123, 456))
    assert task.teacher_is_wrong((500, 500)) and not task.teacher_is_wrong((499, 500))
    assert not get_task("add3_scratch").teacher_is_wrong((482, 596))


def test_the_shipped_flawed_teacher_makes_its_mistake_and_no_other(tmp_path, monkeypatch):
    monkeypatch.setenv("TIP_VERL_CACHE", str(tmp_path))
    task = get_task("add3_scratch_flawed")
    teacher, _ = load_role(task, "teacher")
    problems = task.heldout(256)
    metrics = evaluation(teacher, task, problems)
    wrong = sum(map(task.teacher_is_wrong, problems))
    assert 0.4 < wrong / len(problems) < 0.6  # sums >= 1000: about half
    assert metrics["eval/accuracy_teacher_wrong"] <= 0.02 and metrics["eval/accuracy_teacher_right"] >= 0.95, metrics
    by_parts = (wrong * metrics["eval/accuracy_teacher_wrong"]
                + (len(problems) - wrong) * metrics["eval/accuracy_teacher_right"]) / len(problems)
    assert abs(metrics["eval/accuracy"] - by_parts) < 1e-9
    assert "eval/accuracy_teacher_wrong" not in evaluation(teacher, get_task("add3_scratch"), problems[:8])


def test_the_shipped_mistaken_student_drops_the_final_carry_confidently_where_the_teacher_does_not(tmp_path,
                                                                                                monkeypatch):
    """The mechanism that puts tokens in Q3: on four-digit sums the student is confident of a wrong first answer
    digit that the teacher contradicts; everywhere else it is often right."""
    monkeypatch.setenv("TIP_VERL_CACHE", str(tmp_path))
    task = get_task("add3_scratch_mistaken")
    assert task.reference("student")((482, 596)) == "2+6=8,8+9=17,4+5+1=10;078"
    assert task.reference("teacher")((482, 596)) == task.solution((482, 596))
    assert task.student_is_wrong((500, 500)) and not task.teacher_is_wrong((500, 500))
    teacher, _ = load_role(task, "teacher")
    student, _ = load_role(task, "student")
    problems = task.heldout(256)
    metrics = evaluation(student, task, problems)
    assert metrics["eval/accuracy_student_wrong"] == 0.0 and metrics["eval/accuracy_student_right"] >= 0.7, metrics
    four_digit = [p for p in problems  # whose dropped-carry answer does not start with a 1 anyway
                  if task.student_is_wrong(p) and task.reference("student")(p).split(";")[1][0] != "1"][:64]
    batch = reference_batch(task, four_digit, role="student")  # the student's own mistaken responses
    with torch.no_grad():
        log_ps = torch.log_softmax(response_logits(student, batch), dim=-1)
        log_pt = torch.log_softmax(response_logits(teacher, batch), dim=-1)
    first_answer_digit = torch.tensor([len(task.reference("student")(p).split(";")[0]) + 1 for p in four_digit])
    rows, one = torch.arange(len(four_digit)), task.tokenizer().encode("1")[0]
    at_mistake_s, at_mistake_t = log_ps[rows, first_answer_digit].exp(), log_pt[rows, first_answer_digit].exp()
    assert at_mistake_s[:, one].median() < 0.01 and at_mistake_s[:, one].max() < 0.1  # confident ...
    assert at_mistake_t[:, one].min() > 0.9  # ... and contradicted
    entropy_at_mistake = -(at_mistake_s * at_mistake_s.log()).sum(-1)
    assert entropy_at_mistake.median() < 0.2  # nats, of log(17) = 2.8 for a uniform guess


def test_every_task_solves_itself_within_its_budget():
    rng = random.Random(0)
    for task in TASKS.values():
        tokenizer = task.tokenizer()
        for _ in range(50):
            problem = task.sample(rng)
            assert not is_heldout(problem)
            solution = task.solution(problem)
            assert task.check(problem, solution) == 1.0
            assert len(tokenizer.encode(solution)) + 1 <= task.max_new_tokens


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_a_teacher_at_its_target_and_a_weaker_warm_started_student(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TIP_VERL_CACHE", str(tmp_path))  # the package's own models, never a user's retrain
    task = get_task(name)
    problems = task.heldout(128)
    accuracy, cards = {}, {}
    for role in ("teacher", "student"):
        model, cards[role] = load_role(task, role)
        accuracy[role] = greedy_accuracy(model, task, problems)
        size, _, _ = task.plan.role(role)
        assert ModelSize(**cards[role]["size"]) == size, f"{name}'s shipped {role} is not the one its plan makes"
    assert accuracy["teacher"] >= task.plan.teacher_target, (name, accuracy)
    assert cards["student"]["sft_accuracy"] >= task.plan.student.stop_at
    assert 0.0 < accuracy["student"] < accuracy["teacher"], (name, accuracy)


def test_the_default_plan_makes_a_teacher_and_a_student_of_3_x_96():
    assert TrainPlan().teacher_size == TrainPlan().student_size == ModelSize(layers=3, hidden=96, heads=3)
    assert multiplication_by_one_digit(3).plan.student_size == ModelSize(layers=3, hidden=96, heads=3)
    assert get_task("add3_reversed").plan.student_size == ModelSize(layers=2, hidden=48, heads=2)  # its shipped student


def test_easy_problems_of_the_reversed_task_copy_one_operand_and_are_never_held_out():
    task = get_task("add3_reversed")
    rng = random.Random(0)
    for _ in range(200):
        a, b = task.sample(rng, easy=True)
        assert 0 in (a, b) and not is_heldout((a, b))
        assert task.solution((a, b)) == ";" + str(max(a, b))[::-1]  # the other operand, reversed
    with pytest.raises(ValueError, match="easy_share"):
        replace(task, draw_easy=None).sample(rng, easy=True)


def weak_teacher(task):
    """`task` with a teacher plan that cannot reach its target: 2 steps of a 1 x 16 model."""
    plan = SftPlan(max_steps=2, lr=1e-3, batch_size=4, eval_every=2, eval_size=16, stop_at=None)
    return replace(task, plan=replace(task.plan, teacher_size=ModelSize(layers=1, hidden=16, heads=1), teacher=plan))


def test_prepare_refuses_a_teacher_below_its_target_and_says_what_to_change(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(TASKS, "add3_reversed", weak_teacher(get_task("add3_reversed")))
    assert main(["prepare", "--task", "add3_reversed", "--roles", "teacher", "--out", str(tmp_path)]) == 1
    message = capsys.readouterr().err
    assert re.search(r"reached \d+\.\d% held-out accuracy after 2 supervised steps, below its target 95\.0%", message)
    for key in ("TrainPlan.teacher_target", "TrainPlan.teacher.max_steps=2", "TrainPlan.teacher_size=", "TrainPlan.teacher.lr="):
        assert key in message
    assert not list(tmp_path.rglob("*.safetensors"))


def test_loading_refuses_a_cached_teacher_below_its_target(tmp_path, monkeypatch):
    monkeypatch.setenv("TIP_VERL_CACHE", str(tmp_path))
    task = get_task("add3_reversed")
    size = ModelSize(layers=1, hidden=16, heads=1)
    model = build_model(size, task.tokenizer(), max_positions(task), seed=0)
    save_model(model, size, tmp_path / task.name / "teacher", {"sft_accuracy": 0.004, "sft_steps": 1000})
    with pytest.raises(BelowTarget, match=r"saved in .*teacher\.safetensors reached 0\.4% held-out accuracy"):
        load_role(task, "teacher")


def test_heldout_problems_are_fixed_and_never_sampled():
    task = get_task("add3_scratch")
    heldout = task.heldout(100)
    assert heldout == task.heldout(100) and len(set(heldout)) == 100
    rng = random.Random(1)
    assert not set(heldout) & {task.sample(rng) for _ in range(5000)}


def multiplication_by_one_digit(digits):
    """A task as a user registers it from outside the package: a `digits`-digit number times one of 2..9."""
    return Task(
        name=f"mul{digits}x1",
        alphabet="0123456789*=;",
        max_new_tokens=digits + 3,
        draw=lambda rng: (rng.randrange(10 ** (digits - 1), 10**digits), rng.randrange(2, 10)),
        prompt=lambda p: f"{p[0]}*{p[1]}=",
        solution=lambda p: f";{p[0] * p[1]}",
        answer=lambda p: str(p[0] * p[1]),
        answer_separator=";",
    )


@contextmanager
def fails_after(seconds):
    """A hang inside the block fails the test instead of blocking the run."""

    def hung(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_task_with_too_few_heldout_problems_is_refused_with_the_count_and_the_fix(monkeypatch):
    monkeypatch.setattr(tasks, "TASKS", dict(TASKS))
    small = multiplication_by_one_digit(2)  # 720 problems, 34 of them held out; the default plan evaluates on 256
    with fails_after(60):
        with pytest.raises(ValueError, match=r"'mul2x1' has only 34 held-out problems .* but 256 are asked for") as error:
            register_task(small)
        for fix in ("about 20 x 256 = 5120 or more", "TrainPlan.teacher.eval_size", "LoopConfig.eval_size"):
            assert fix in str(error.value)
        assert "mul2x1" not in tasks.TASKS
        with pytest.raises(ValueError, match="has only 34 held-out problems .* but 64 are asked for"):
            max_positions(small)
        assert len(small.heldout(34)) == 34
        larger = multiplication_by_one_digit(3)  # 7200 problems, 361 held out
        assert register_task(larger) is tasks.TASKS["mul3x1"] and len(larger.heldout(361)) == 361


def test_tokenizer_round_trip_and_left_padding():
    tokenizer = CharTokenizer("0123456789+=;")
    text = "482+596=;8701"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode("12") + [tokenizer.eos_id] + tokenizer.encode("3")) == "12"
    ids, mask = tokenizer.encode_prompts(["1+2=", "10+20="])
    assert ids.shape == mask.shape == (2, 7)
    assert mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert ids[0, :3].tolist() == [tokenizer.pad_id, tokenizer.pad_id, tokenizer.bos_id]
    assert tokenizer.decode(ids[0]) == "1+2="


def test_response_mask_covers_up_to_and_including_the_first_eos():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 6, eos, pad, pad], [eos, 7, eos, 8, pad], [5, 6, 7, 8, 9]])
    assert response_mask_from(responses, eos).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],  # no EOS: truncated, every position counts
    ]


def test_sampled_rollout_masks_and_logits_match_generate_with_left_padding():
    torch.manual_seed(0)
    tokenizer = CharTokenizer("0123456789+=;")
    model = build_model(ModelSize(layers=1, hidden=32, heads=1), tokenizer, max_positions=32, seed=0)
    prompts = ["1+2=", "123+456=", "9="]
    rollout = sample(model, tokenizer, prompts, max_new_tokens=8, group_size=2)
    assert rollout.prompt_ids.shape[0] == rollout.responses.shape[0] == 6
    for row, mask in zip(rollout.responses, rollout.response_mask):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
        assert (row[length:] == tokenizer.pad_id).all()
        if length < row.numel():
            assert row[length - 1] == tokenizer.eos_id
    # teacher-forced logits over the left-padded batch equal the ones generate sampled from
    ids, attention = tokenizer.encode_prompts(prompts)
    out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=6, do_sample=False,
                         output_scores=True, return_dict_in_generate=True,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    responses = out.sequences[:, ids.shape[1]:]
    forced = response_logits(model, Rollout(ids, attention, responses, torch.ones_like(responses)))
    generated = torch.stack(out.scores, dim=1)
    assert torch.allclose(forced[:, : generated.shape[1]], generated, atol=1e-4)
