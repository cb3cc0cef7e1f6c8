"""Paired comparisons of two systems on the same images, and calibration error."""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    confidence: float


@dataclass(frozen=True)
class McNemar:
    b: int  # images system a gets right and system b gets wrong
    c: int  # images system a gets wrong and system b gets right
    p_value: float  # two-sided
    method: str  # "exact" (binomial) or "chi-square" (with continuity correction)


def paired_bootstrap(correct_a, correct_b, n_resamples=10000, seed=0, confidence=0.95):
    """Accuracy of a minus accuracy of b, with a percentile bootstrap interval.

    ``correct_a`` and ``correct_b`` say, for the same images in the same order, whether each
    system is right (``correct_b`` may also be a share, such as random routing's mean over its
    draws). Each resample draws the images with replacement, keeping the pairs, so the interval
    accounts for the two systems erring on related images.

    A resample's mean depends only on how many images of each distinct difference it draws, and
    those counts are multinomial: they are drawn as a chain of binomials, one per distinct value
    (three for two systems that are right or wrong), not as ``n`` indices per resample.
    """
    difference = correct_a.double() - correct_b.double()
    values, counts = difference.unique(return_counts=True)
    generator = torch.Generator().manual_seed(seed)
    undrawn = torch.full((n_resamples,), float(len(difference)), dtype=torch.float64)
    total = torch.zeros(n_resamples, dtype=torch.float64)
    remaining = len(difference)
    for value, count in zip(values[:-1].tolist(), counts[:-1].tolist()):
        drawn = torch.binomial(undrawn, torch.full_like(undrawn, count / remaining), generator=generator)
        total += value * drawn
        undrawn -= drawn
        remaining -= count
    means = (total + values[-1].item() * undrawn) / len(difference)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype)).tolist()
    return Interval(difference.mean().item(), low, high, confidence)


def mcnemar(correct_a, correct_b, exact_below=50):
    """McNemar's test of "a and b are equally accurate" on paired per-image correctness.

    Only the discordant images count: ``b`` (a right, b wrong) and ``c`` (a wrong, b right).
    Under the null each discordant image is a fair coin, so with fewer than ``exact_below`` of
    them the p-value is the exact two-sided binomial one; otherwise the chi-square statistic
    ``(|b - c| - 1)^2 / (b + c)`` with one degree of freedom, whose survival function is
    ``erfc(sqrt(x / 2))``.
    """
    b = int((correct_a & ~correct_b).sum())
    c = int((~correct_a & correct_b).sum())
    n = b + c
    if n < exact_below:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
        return McNemar(b, c, min(1.0, 2 * tail / 2 ** n), "exact")
    statistic = (abs(b - c) - 1) ** 2 / n
    return McNemar(b, c, math.erfc(math.sqrt(statistic / 2)), "chi-square")


def expected_calibration_error(probs, labels, bins=15):
    """Sum over equal-width confidence bins of (share of images) * |accuracy - mean confidence|.

    ``probs``: (N, C) class probabilities; the confidence of an image is its top probability,
    and bin ``i`` holds confidences in ``(i / bins, (i + 1) / bins]``.
    """
    confidence, prediction = probs.double().max(1)
    correct = (prediction == labels).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    gap = torch.bincount(index, correct, minlength=bins) - torch.bincount(index, confidence, minlength=bins)
    return (gap.abs().sum() / len(labels)).item()
