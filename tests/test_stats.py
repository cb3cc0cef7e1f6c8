"""Paired bootstrap, McNemar's test and expected calibration error on cases worked out by hand."""

import math

import pytest
import torch

from utils.stats import expected_calibration_error, mcnemar, paired_bootstrap


def pairs(b, c, both=0, neither=0):
    """Correctness of systems a and b: ``b`` images only a gets right, ``c`` only b, then the concordant ones."""
    a = [True] * b + [False] * c + [True] * both + [False] * neither
    other = [False] * b + [True] * c + [True] * both + [False] * neither
    return torch.tensor(a), torch.tensor(other)


def test_mcnemar_exact_on_a_hand_computed_case():
    result = mcnemar(*pairs(3, 9, both=50, neither=10))
    # 2 * P(X <= 3) for X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66 + 220) / 4096
    assert (result.b, result.c, result.method) == (3, 9, "exact")
    assert result.p_value == pytest.approx(2 * 299 / 4096)
    assert mcnemar(*pairs(5, 5)).p_value == 1.0
    assert mcnemar(*pairs(0, 0, both=7)).p_value == 1.0


def test_mcnemar_chi_square_with_continuity_correction():
    result = mcnemar(*pairs(40, 60, both=900))
    # (|40 - 60| - 1)^2 / 100 = 3.61; chi-square(1) survival function at 3.61 = 0.05743
    assert result.method == "chi-square" and result.p_value == pytest.approx(0.0574331, abs=1e-6)
    assert mcnemar(*pairs(20, 29)).method == "exact" and mcnemar(*pairs(20, 30)).method == "chi-square"


def test_paired_bootstrap_interval_covers_the_true_difference_and_narrows_with_more_images():
    def systems(n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, generator=g) < 0.8, torch.rand(n, generator=g) < 0.7

    small = paired_bootstrap(*systems(2000, 0), n_resamples=4000)
    large = paired_bootstrap(*systems(8000, 1), n_resamples=4000)
    for result in (small, large):
        assert result.low < 0.1 < result.high and result.low < result.estimate < result.high
    assert large.high - large.low < 0.6 * (small.high - small.low)


def test_paired_bootstrap_resamples_pairs():
    """Two systems that differ on 10% of images: the interval follows the paired standard error,
    much narrower than treating the two accuracies as independent would give."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5000, generator=g) < 0.8
    b = torch.where(torch.rand(5000, generator=g) < 0.1, ~a, a)
    result = paired_bootstrap(a, b, n_resamples=5000, seed=1)
    difference = a.double() - b.double()
    standard_error = difference.std().item() / math.sqrt(len(a))
    assert result.estimate == pytest.approx(difference.mean().item())
    assert result.high - result.low == pytest.approx(2 * 1.96 * standard_error, rel=0.1)
    assert paired_bootstrap(a, b, n_resamples=5000, seed=1) == paired_bootstrap(a, b, n_resamples=5000, seed=1)
    same = paired_bootstrap(a, a, n_resamples=100)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_of_a_share_matches_resampling_the_images():
    """Against random routing's mean over 200 draws (many distinct differences): the interval of resampled
    images, drawn here index by index."""
    g = torch.Generator().manual_seed(2)
    a = torch.rand(4000, generator=g) < 0.85
    share = (torch.rand(200, 4000, generator=g) < 0.8).double().mean(0)
    result = paired_bootstrap(a, share, n_resamples=20000, seed=3)
    difference = a.double() - share
    means = difference[torch.randint(len(a), (20000, len(a)), generator=g)].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    assert result.estimate == pytest.approx(difference.mean().item())
    assert (result.low, result.high) == pytest.approx((low, high), abs=5e-4)


def two_class_probs(confidence, n):
    return torch.tensor([[confidence, 1 - confidence]]).repeat(n, 1)


def test_ece_is_zero_when_every_bin_is_calibrated():
    probs = torch.cat([two_class_probs(0.8, 100), two_class_probs(0.6, 50)])
    labels = torch.tensor([0] * 80 + [1] * 20 + [0] * 30 + [1] * 20)  # 80% and 60% right
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-6)


def test_ece_of_a_simple_case():
    probs = torch.cat([two_class_probs(0.9, 50), two_class_probs(0.6, 50), two_class_probs(1.0, 100)])
    labels = torch.tensor([0] * 50 + [0] * 25 + [1] * 25 + [0] * 100)
    # bins: 0.9 (all right: gap 0.1), 0.6 (half right: gap 0.1), 1.0 (all right: gap 0)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.25 * 0.1 + 0.25 * 0.1)
    assert expected_calibration_error(two_class_probs(0.9, 10), torch.ones(10, dtype=torch.long)) == \
        pytest.approx(0.9)
