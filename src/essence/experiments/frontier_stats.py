"""The frontier search's statistics: pure functions of accuracies, problem counts and costs.

An accuracy measured on N problems over S seeds is uncertain twice over: the problems are a
sample (binomial), and so are the seeds. ``estimate`` combines both into one 95% half-width;
``retention`` carries it, with the baseline's, through the ratio by the delta method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, stdev

Z95 = 1.96
"""The normal quantile of a two-sided 95% interval."""
FAMILIES = ("lsp", "cot_lead", "replay")
"""The recipe families whose fraction x the search bisects (essence.experiments.frontier)."""


@dataclass(frozen=True)
class Estimate:
    """One recipe's accuracy over its seeds: mean, spread and 95% half-width."""

    mean: float
    sd: float
    """Sample standard deviation over the seeds (0 with one seed)."""
    half_width: float
    problems: int
    """N: problems evaluated per seed (summed over benchmarks)."""
    seeds: int


def estimate(accuracies: list[float], problems: int) -> Estimate:
    """m, sd and h = 1.96·sqrt(m(1−m)/(N·S) + sd²/S) for S seed accuracies on N problems each."""
    assert accuracies, "an estimate needs at least one accuracy"
    assert problems >= 1, f"an accuracy needs at least one problem, got {problems}"
    s = len(accuracies)
    m = float(mean(accuracies))
    sd = float(stdev(accuracies)) if s > 1 else 0.0
    binomial = max(m * (1.0 - m), 0.0) / (problems * s)
    return Estimate(m, sd, Z95 * math.sqrt(binomial + sd * sd / s), problems, s)


def retention(point: Estimate, base: Estimate) -> tuple[float, float]:
    """(r, h_r): r = m/m_b and h_r = sqrt(h² + (r·h_b)²)/m_b (delta method; m_b > 0)."""
    assert base.mean > 0, "retention needs a baseline accuracy above 0"
    r = point.mean / base.mean
    return r, math.sqrt(point.half_width ** 2 + (r * base.half_width) ** 2) / base.mean


def meets(r: float, target: float) -> bool:
    """The target is met on the means: r ≥ target."""
    return r >= target


def compatible(r: float, h_r: float, target: float) -> bool:
    """The target lies within reach of the interval: r + h_r ≥ target."""
    return r + h_r >= target


def pareto_flags(points: list[tuple[float, float]]) -> list[bool]:
    """For (accuracy, cost) pairs: True where no other pair has accuracy ≥ and cost ≤ with one
    of the two strict (the point is on the accuracy/cost frontier)."""
    flags = []
    for i, (acc, cost) in enumerate(points):
        dominated = any(a >= acc and c <= cost and (a > acc or c < cost)
                        for j, (a, c) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def midpoint(lo: float, hi: float) -> float:
    """The next probe of a bisection whose answer lies in (lo, hi]."""
    return (lo + hi) / 2.0


def narrow(lo: float, hi: float, x: float, met: bool) -> tuple[float, float]:
    """The bracket (lo, hi] after probing x: the cheapest x that meets lies at or below a meeting
    probe and above a failing one."""
    return (lo, x) if met else (x, hi)


def cheapest(rows: list[dict], key: str) -> dict | None:
    """The row of lowest flops_ratio among those whose `key` is true (None if there is none)."""
    chosen = [r for r in rows if r.get(key)]
    return min(chosen, key=lambda r: (r["flops_ratio"], -r["retention"])) if chosen else None


def compact(x: float) -> str:
    """A fraction as a short exact text: 0.5, 0.25, 0.375 (bisection points are dyadic)."""
    text = repr(float(x))
    return text.removesuffix(".0")
