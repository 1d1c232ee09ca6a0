"""Selection rules: hand-computed cases, exact equality with the per-rollout loop, sampling law, determinism, and the
registry every rule list is derived from."""

import math

import pytest
import torch

from tip_verl.core.advantages import select_and_reward
from tip_verl.core.config import TipConfig
from tip_verl.core.reference_selection import REFERENCE_KEYS, reference_select
from tip_verl.core.scores import divergence_estimate
from tip_verl.core.selection import (
    SELECTION_RULE_READS,
    SELECTION_RULES,
    SelectionInputs,
    register_selection_rule,
    rules_reading,
    select_tokens,
    selection_budget,
    selection_rule_names,
    top_k_per_rollout,
)

RANDOM_RULES = rules_reading("random")

PAD = 0.0
# three rollouts of 4, 2 and 1 valid tokens; ratio 0.5 gives budgets 2, 1 and 1
MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
ENTROPY = torch.tensor([[0.1, 0.9, 0.5, 0.85, PAD], [0.2, 0.8, PAD, PAD, PAD], [0.4, PAD, PAD, PAD, PAD]])
DIVERGENCE = torch.tensor([[0.5, 0.0, 0.2, 0.9, PAD], [0.9, 0.1, PAD, PAD, PAD], [0.0, PAD, PAD, PAD, PAD]])


def positions(selected):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in selected]


def select(rule, ratio=0.5, quantile=1.0, seed=0):
    inputs = SelectionInputs(MASK, ENTROPY, DIVERGENCE, quantile, torch.Generator().manual_seed(seed))
    return select_tokens(rule, ratio, inputs)


def test_budget_is_floor_with_at_least_one_token():
    mask = torch.zeros(5, 10)
    for row, length in enumerate([0, 1, 2, 3, 10]):
        mask[row, :length] = 1
    assert selection_budget(mask, 0.5).tolist() == [0, 1, 1, 1, 5]
    assert selection_budget(mask, 0.1).tolist() == [0, 1, 1, 1, 1]
    assert selection_budget(mask, 1.0).tolist() == [0, 1, 2, 3, 10]


def test_all_selects_every_valid_token():
    assert positions(select("all")) == [[0, 1, 2, 3], [0, 1], [0]]


def test_entropy_top_k_by_hand():
    assert positions(select("entropy")) == [[1, 3], [1], [0]]


def test_divergence_top_k_by_hand():
    assert positions(select("divergence")) == [[0, 3], [0], [0]]


def test_soft_or_by_hand():
    # h^ = (h - 0.1) / 0.8 -> [0, 1, .5, .9375], [.125, .875], [.375]; d^ = d / 0.9
    # s = 1 - (1 - h^)(1 - d^) -> [.556, 1, .611, 1], [1, .889], [.375]
    assert positions(select("soft_or")) == [[1, 3], [0], [0]]


def test_q3_by_hand():
    # w = d (1 - h^) -> [.5, 0, .1, .05625], [.7875, .0125], [0]
    assert positions(select("q3")) == [[0, 2], [0], [0]]


def test_random_and_sample_respect_budget():
    for rule in RANDOM_RULES:
        assert select(rule).sum(dim=1).tolist() == [2, 1, 1]
        assert not (select(rule) & ~MASK.bool()).any()


def random_ragged_batch(seed, batch=12, width=40):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, width + 1, (batch,), generator=g)
    lengths[0] = 1
    mask = torch.arange(width)[None, :] < lengths[:, None]
    entropy = torch.rand(batch, width, generator=g) * 3
    entropy[1, :5] = 0.0  # zero-entropy tokens for entropy_sample
    divergence = torch.rand(batch, width, generator=g).pow(3)
    divergence[2, :3] = divergence[2, 3]  # ties: the earlier position wins
    return mask, entropy, divergence


@pytest.mark.parametrize("rule", selection_rule_names())
@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_loop_reference(rule, ratio, seed):
    mask, entropy, divergence = random_ragged_batch(seed)
    inputs = SelectionInputs(mask, entropy, divergence, 0.98, torch.Generator().manual_seed(seed))
    fast = select_tokens(rule, ratio, inputs)
    slow = reference_select(rule, ratio, mask, entropy, divergence, 0.98, torch.Generator().manual_seed(seed))
    assert torch.equal(fast, slow)


def test_entropy_sample_follows_sampling_without_replacement():
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    p = weights / weights.sum()
    # P(i in a 2-draw sample without replacement) = p_i + sum_{j != i} p_j p_i / (1 - p_j)
    exact = [float(p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i)) for i in range(4)]
    draws = 20000
    mask = torch.ones(draws, 4)
    inputs = SelectionInputs(mask, weights.expand(draws, 4), None, 0.98, torch.Generator().manual_seed(0))
    frequency = select_tokens("entropy_sample", 0.5, inputs).float().mean(dim=0)
    assert frequency.tolist() == pytest.approx(exact, abs=0.015)


def test_random_is_uniform():
    draws = 20000
    inputs = SelectionInputs(torch.ones(draws, 5), None, None, 0.98, torch.Generator().manual_seed(0))
    frequency = select_tokens("random", 0.4, inputs).float().mean(dim=0)
    assert frequency.tolist() == pytest.approx([0.4] * 5, abs=0.015)


def test_deterministic_given_seed():
    mask, entropy, divergence = random_ragged_batch(5)
    for rule in RANDOM_RULES:
        runs = [
            select_tokens(rule, 0.5, SelectionInputs(mask, entropy, divergence, 0.98, torch.Generator().manual_seed(s)))
            for s in (7, 7, 8)
        ]
        assert torch.equal(runs[0], runs[1])
        assert not torch.equal(runs[0], runs[2])


def test_selected_fraction_tracks_ratio_on_long_rollouts():
    mask = torch.ones(8, 1000)
    inputs = SelectionInputs(mask, torch.rand(8, 1000), torch.rand(8, 1000), 0.98, torch.Generator().manual_seed(0))
    for ratio in (0.1, 0.2, 0.5):
        assert select_tokens("soft_or", ratio, inputs).float().mean().item() == pytest.approx(math.floor(1000 * ratio) / 1000)


def outlier_batch():
    """16 x 64 tokens of random entropy and log-probs; at (5, 17) the teacher likes the sampled token e^12
    times more than the student (k3 = e^12 - 13 ~ 1.6e5, against at most ~30 elsewhere)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(16, 64, dtype=torch.bool)
    entropy = torch.rand(16, 64, generator=g) * 3
    student = -torch.rand(16, 64, generator=g) * 4
    teacher = (student + torch.randn(16, 64, generator=g)).clamp(max=0.0)
    student[5, 17], teacher[5, 17] = -12.5, -0.5
    return mask, entropy, student, teacher


def test_one_divergence_outlier_leaves_soft_or_distinct_from_entropy():
    mask, entropy, student, teacher = outlier_batch()

    def picks(student_logprobs=student, **tip):
        return select_and_reward(TipConfig(ratio=0.25, **tip), mask, student_logprobs, teacher, entropy).selected

    entropy_picks = picks(rule="entropy")
    # plain min-max: every other token's d^ is below 2e-4, and Soft-OR picks exactly the entropy rule's tokens
    assert torch.equal(picks(rule="soft_or", divergence_quantile=1.0), entropy_picks)
    clipped = picks(rule="soft_or")
    assert (clipped & entropy_picks).sum() / entropy_picks.sum() < 0.9
    without_outlier = student.clone()
    without_outlier[5, 17] = teacher[5, 17]
    unperturbed = picks(without_outlier, rule="soft_or")
    assert clipped[5, 17] and (clipped & unperturbed).sum() / unperturbed.sum() > 0.98


@pytest.mark.parametrize("rule", rules_reading("divergence"))
@pytest.mark.parametrize("divergence_quantile", [0.9, 0.98, 1.0])
def test_clipped_divergence_equals_loop_reference(rule, divergence_quantile):
    mask, entropy, student, teacher = outlier_batch()
    divergence = divergence_estimate(teacher, student, mask)
    inputs = SelectionInputs(mask, entropy, divergence, 0.98, None, divergence_quantile)
    expected = reference_select(rule, 0.25, mask, entropy, divergence, 0.98, None, divergence_quantile)
    assert torch.equal(select_tokens(rule, 0.25, inputs), expected)


def test_divergence_quantile_must_be_a_fraction():
    with pytest.raises(ValueError, match=r"algorithm.tip.divergence_quantile=0 must be in \(0, 1\]"):
        TipConfig(divergence_quantile=0)


@pytest.mark.parametrize("ratio", [0.02, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("rule", ["entropy", "divergence"])
def test_many_ties_equal_loop_reference(ratio, rule):
    # integer keys in 0..3 on 200 positions: every threshold sits among ties, both ranking paths are taken
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 201, (24,), generator=g)
    lengths[:3] = torch.tensor([0, 1, 200])
    mask = torch.arange(200)[None, :] < lengths[:, None]
    entropy = torch.randint(0, 4, (24, 200), generator=g).float()
    divergence = torch.randint(0, 2, (24, 200), generator=g).float()
    fast = select_tokens(rule, ratio, SelectionInputs(mask, entropy, divergence))
    assert torch.equal(fast, reference_select(rule, ratio, mask, entropy, divergence))


def test_top_k_keeps_the_earliest_ties_and_nothing_at_budget_zero():
    keys = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0], [5.0] * 6, [3.0, 1.0, 3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    for budget, expected in (
        ([2, 1, 0], [[1, 2], [0], []]),  # a largest budget of 2 of 6: torch.topk
        ([3, 0, 2], [[1, 2, 4], [], [0, 2]]),  # padded 2.0 at position 5 is never picked
        ([5, 6, 3], [[0, 1, 2, 3, 4], list(range(6)), [0, 1, 2]]),  # the full sort
    ):
        assert positions(top_k_per_rollout(keys, mask, torch.tensor(budget))) == expected


def test_every_registered_rule_has_an_oracle():
    missing = sorted(set(SELECTION_RULES) - set(REFERENCE_KEYS))
    assert not missing, f"add each rule's oracle to tip_verl/core/reference_selection.py with @reference_keys_of: {missing}"
    assert set(REFERENCE_KEYS) <= set(SELECTION_RULES), "an oracle names no registered rule"
    with pytest.raises(ValueError, match=r"'new_rule' has no oracle: add one with @reference_keys_of\('new_rule'\)"):
        reference_select("new_rule", 0.5, MASK, ENTROPY, DIVERGENCE)


@pytest.mark.parametrize("rule", list(SELECTION_RULES))
def test_each_rule_reads_what_it_declares(rule):
    mask, entropy, divergence = random_ragged_batch(0)
    reads = SELECTION_RULE_READS[rule]
    for field in ("entropy", "divergence"):
        without = SelectionInputs(mask, entropy, divergence, generator=torch.Generator().manual_seed(0))
        setattr(without, field, None)
        if field in reads:
            with pytest.raises(ValueError, match=f"{rule!r} needs per-token {field}"):
                SELECTION_RULES[rule](without)
        else:
            SELECTION_RULES[rule](without)
    generator = torch.Generator().manual_seed(0)
    SELECTION_RULES[rule](SelectionInputs(mask, entropy, divergence, generator=generator))
    drew = not torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())
    assert drew == ("random" in reads)


@pytest.fixture
def late_rule():
    """A rule registered after the package was imported, as a user's plugin module would; removed afterwards."""
    name = "late_entropy_draw"
    register_selection_rule(name, reads=("entropy", "random"))(lambda inputs: inputs.entropy)
    yield name
    del SELECTION_RULES[name], SELECTION_RULE_READS[name]


def test_a_rule_registered_late_is_known_everywhere(late_rule):
    """The config, the start-up checks and the CLI read the registry when they check, not at import."""
    from tip_verl.cli import build_parser
    from tip_verl.verl_ext.checks import check_loss_route_engine

    assert late_rule in selection_rule_names() and selection_rule_names()[0] == "all"
    assert TipConfig(rule=late_rule).rule == late_rule
    assert late_rule in rules_reading("entropy") and late_rule in rules_reading("random")
    dynamic_cp = {"actor_rollout_ref": {"actor": {"megatron": {"dynamic_context_parallel": True}}}}
    with pytest.raises(ValueError, match=f"rule={late_rule} draws its selection"):
        check_loss_route_engine(dynamic_cp, late_rule, "tip_k3", uses_topk=False)
    assert build_parser().parse_args(["demo", "--rule", late_rule]).rule == late_rule


def test_registration_refuses_an_unknown_input_and_a_taken_name():
    with pytest.raises(ValueError, match=r"'new_rule' reads \['logits'\]; declare reads from"):
        register_selection_rule("new_rule", reads=("logits",))
    for taken in ("all", "soft_or"):
        with pytest.raises(ValueError, match=f"{taken!r} is already defined"):
            register_selection_rule(taken, reads=())
    with pytest.raises(ValueError, match="'logits' is not a selection input"):
        rules_reading("logits")
