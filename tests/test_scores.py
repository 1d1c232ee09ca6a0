"""Token scores against hand-computed values."""

import math

import pytest
import torch

from tip_verl.core.scores import (
    ORDER_SAMPLE_SIZE,
    divergence_estimate,
    k3_estimate,
    masked_quantile,
    minmax_normalize,
    normalized_entropy,
    quadrant_labels,
    soft_or_score,
    token_entropy,
    topk_reverse_kl,
)

MASK = torch.tensor([[1, 1, 0]])


def test_divergence_estimates_by_hand():
    teacher = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]])
    student = torch.tensor([[math.log(0.25), math.log(0.4), 0.0]])
    # q = pT / pS = 2 and 0.5
    k1 = divergence_estimate(teacher, student, MASK, "k1")
    k3 = divergence_estimate(teacher, student, MASK, "k3")
    abs_k1 = divergence_estimate(teacher, student, MASK, "abs_k1")
    torch.testing.assert_close(k1, torch.tensor([[-math.log(2), math.log(2), 0.0]]))
    torch.testing.assert_close(abs_k1, torch.tensor([[math.log(2), math.log(2), 0.0]]))
    torch.testing.assert_close(k3, torch.tensor([[1 - math.log(2), -0.5 + math.log(2), 0.0]]))


def test_k3_is_unbiased_for_reverse_kl():
    student = torch.tensor([0.7, 0.2, 0.1])
    teacher = torch.tensor([0.3, 0.3, 0.4])
    exact = float((student * (student / teacher).log()).sum())
    ones = torch.ones(1, 3)
    k3 = divergence_estimate(teacher.log()[None], student.log()[None], ones, "k3")
    assert float((k3 * student).sum()) == pytest.approx(exact, rel=1e-5)


def test_one_k3_whose_callers_differ_only_in_the_tail():
    """The selection's k3 (scores) is exact everywhere; the loss route's (distill_losses) turns linear above 40."""
    from tip_verl.core.distill_losses import K3_LINEAR_ABOVE, k3_divergence

    log_ratio = torch.tensor([-30.0, -1.0, 0.0, 2.0, 39.0, 41.0, 60.0])
    student = torch.zeros(1, 7)
    selection = divergence_estimate(log_ratio[None], student, torch.ones(1, 7), "k3")[0]
    loss_route = k3_divergence(student, log_ratio[None])[0]
    below = log_ratio <= K3_LINEAR_ABOVE
    assert torch.equal(selection[below], loss_route[below])
    assert torch.equal(selection, k3_estimate(log_ratio))
    tangent = math.expm1(40.0) - 40.0 + (log_ratio[~below] - 40.0) * math.expm1(40.0)
    torch.testing.assert_close(loss_route[~below], tangent)
    assert (selection[~below] > loss_route[~below]).all()  # exact e^x grows faster than its tangent


def test_entropy_uniform_and_onehot():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(token_entropy(logits), torch.tensor([math.log(4), 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(normalized_entropy(logits), torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)


def test_topk_reverse_kl_by_hand():
    student = torch.tensor([0.6, 0.2]).log().view(1, 1, 2)
    teacher = torch.tensor([0.2, 0.2]).log().view(1, 1, 2)  # renormalised: 0.5, 0.5
    ps = torch.tensor([0.75, 0.25])
    expected = float((ps * (ps / 0.5).log()).sum())
    assert topk_reverse_kl(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_masked_quantile_matches_torch_quantile():
    values = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    ties = torch.randint(0, 3, (4, 9), generator=torch.Generator().manual_seed(2)).float()
    for data in (values, ties):
        for q in (0.0, 0.1, 0.3, 0.5, 0.77, 0.98, 1.0):
            expected = torch.quantile(data[mask], q)
            torch.testing.assert_close(masked_quantile(data, mask, q), expected)


@pytest.mark.parametrize("data", ["normal", "ties", "periodic"])
def test_masked_quantile_of_a_large_batch_matches_torch_quantile(data, monkeypatch):
    # above 4 * ORDER_SAMPLE_SIZE values a strided sample brackets the order statistic; a batch whose every
    # stride-th value is 0 fools the sample, and selection must fall back to all values
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(64, 1000, dtype=torch.bool)
    if data == "periodic":
        values = (torch.arange(64 * 1000) % (64 * 1000 // ORDER_SAMPLE_SIZE) != 0).float().reshape(64, 1000)
    else:
        mask[:, 900:] = False
        values = torch.randn(64, 1000, generator=g)
        if data == "ties":
            values = values.mul(2).round()
    sizes = []
    kthvalue = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda x, k: sizes.append(x.numel()) or kthvalue(x, k))
    for q in (0.02, 0.5, 0.9, 0.98, 0.999):
        torch.testing.assert_close(masked_quantile(values, mask, q), torch.quantile(values[mask].float(), q))
    assert (max(sizes) == int(mask.sum())) == (data == "periodic")  # only there was the full selection needed


def test_minmax_with_clip_and_soft_or_by_hand():
    entropy = torch.tensor([[0.0, 1.0, 9.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    h_hat = minmax_normalize(entropy, mask, "entropy", quantile=2 / 3)  # valid 0, 1, 2, 9: position 2, the 2
    torch.testing.assert_close(h_hat, torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.0]]))
    d_hat = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(soft_or_score(h_hat, d_hat)[0], torch.tensor([0.5, 0.75, 1.0]))


def test_minmax_clipped_at_a_quantile_by_hand():
    # valid values 0, 1, 2, 3, 100 (the padded 50 is ignored); linear quantile at position q * (5 - 1)
    divergence = torch.tensor([[0.0, 1.0, 2.0, 50.0], [3.0, 100.0, 50.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # q = 0.75: position 3, the value 3; d^ = min(d, 3) / 3
    expected = torch.tensor([[0.0, 1 / 3, 2 / 3, 0.0], [1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(minmax_normalize(divergence, mask, "d", 0.75), expected)
    # q = 0.8: position 3.2, 3 + 0.2 * (100 - 3) = 22.4
    expected = torch.tensor([[0.0, 1 / 22.4, 2 / 22.4, 0.0], [3 / 22.4, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(minmax_normalize(divergence, mask, "d", 0.8), expected)
    # q = 1: plain min-max, the outlier presses the rest below 0.03
    expected = torch.tensor([[0.0, 0.01, 0.02, 0.0], [0.03, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(minmax_normalize(divergence, mask, "d", 1.0), expected)


def test_quadrants_median_split_and_absolute_thresholds():
    entropy = torch.tensor([[3.0, 3.0, 0.1, 0.1]])
    divergence = torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    mask = torch.ones(1, 4)
    assert quadrant_labels(entropy, divergence, mask).tolist() == [[1, 2, 3, 4]]
    labels = quadrant_labels(entropy, divergence, mask, entropy_threshold=5.0, divergence_threshold=1.0)
    assert labels.tolist() == [[3, 4, 3, 4]]
    padded = quadrant_labels(entropy, divergence, torch.tensor([[1, 1, 1, 0]]))
    assert padded[0, 3] == 0
