"""The testing procedure: what `tune` may claim about the schedule it chooses, and how sure it is.

Quality (Learn-then-Test, Angelopoulos et al., arXiv 2110.01052, with fixed-sequence testing):
the tune split orders the finalists before any held-out image is read, from the lowest risk on
the tune split to the highest. Each finalist j in that order is a null hypothesis "its risk on
the image distribution exceeds the objective's limit α", rejected when the one-sided exact
(Clopper–Pearson) upper bound at 1 − δ of its held-out failures is ≤ α; the test stops at the
first finalist it cannot reject. Every rejected one is then within α at once, with probability
≥ 1 − δ (the family-wise error of a fixed sequence of level-δ tests is δ), so the fastest of
them may be chosen. The assumption: held-out images and the images the model will see are
exchangeable (drawn alike); nothing is claimed for another distribution.

Speed: a finalist's speed-up is the median of paired ratios (the unpruned model's time over its
own, in the same interleaved round), with a distribution-free lower bound for the median from
the order statistics; an objective on speed is met on that bound.

No scipy: the only thing needed is the binomial tail, computed exactly in log space below and
checked against scipy's binomtest in tests/test_tune_certify.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DELTA = 0.05  # the default error probability of the certificate (`--delta`)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) ≤ k), summed exactly in log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def clopper_pearson_upper(failures: int, n: int, delta: float = DELTA) -> float:
    """The one-sided exact upper bound at 1 − δ of a binomial rate: the p with
    P(Bin(n, p) ≤ failures) = δ (1 when n is 0 or every trial failed)."""
    if n == 0 or failures >= n:
        return 1.0
    low, high = failures / n, 1.0
    for _ in range(200):  # bisection to the float's resolution; the tail falls as p rises
        middle = (low + high) / 2
        if binomial_cdf(failures, n, middle) > delta:
            low = middle
        else:
            high = middle
        if high - low < 1e-15:
            break
    return high


def images_needed(limit: float, delta: float = DELTA) -> int:
    """The fewest held-out images that can certify a rate ≤ `limit`: all of them without a failure,
    (1 − limit)^n ≤ δ."""
    if limit <= 0:
        return math.inf
    return math.ceil(math.log(delta) / math.log1p(-limit))


def fixed_sequence(failures: list[int], n: int, limit: float, delta: float = DELTA) -> list[float | None]:
    """Test the finalists in the given order (fixed before the held-out images were read): each one's
    Clopper–Pearson bound, until the first above `limit`; None for those never tested. Certified are
    the ones before the first bound above the limit."""
    bounds, stopped = [], False
    for count in failures:
        if stopped:
            bounds.append(None)
            continue
        bound = clopper_pearson_upper(count, n, delta)
        bounds.append(bound)
        stopped = bound > limit
    return bounds


def certified(bounds: list[float | None], limit: float) -> list[bool]:
    return [b is not None and b <= limit for b in bounds]


@dataclass(frozen=True)
class MedianBounds:
    """The median of paired samples and distribution-free bounds at 1 − δ on each side (order
    statistics; None when there are too few samples for that confidence)."""
    median: float
    low: float | None
    high: float | None


def median_bounds(samples: list[float], delta: float = DELTA) -> MedianBounds:
    """The k-th smallest sample is below the median with probability P(Bin(m, ½) ≥ k); the largest
    such k with P(Bin(m, ½) ≤ k − 1) ≤ δ gives the one-sided lower bound (the upper by symmetry)."""
    ordered, m = sorted(samples), len(samples)
    k = 0
    while k < m and binomial_cdf(k, m, 0.5) <= delta:
        k += 1
    median = ordered[m // 2] if m % 2 else (ordered[m // 2 - 1] + ordered[m // 2]) / 2
    if k == 0:
        return MedianBounds(median, None, None)
    return MedianBounds(median, ordered[k - 1], ordered[m - k])


def paired_speedups(unpruned_ms: list[float], candidate_ms: list[float]) -> list[float]:
    """One ratio per interleaved round: both timings of a round saw the same machine load."""
    return [u / c for u, c in zip(unpruned_ms, candidate_ms)]


def relative_spread(samples: list[float]) -> float:
    """How noisy the machine was: the interquartile range of the timings over their median."""
    low, middle, high = np.percentile(samples, [25, 50, 75])
    return float((high - low) / middle)


def decide(points: list, goal, held_out: int, delta: float, noise: float):
    """(chosen or None, closest, reason when none, guarantee) for the finalists `points`, whose
    tune-split ranks, timings and held-out failures are filled in. Sets their test order, bounds
    and certificates."""
    for p in points:
        if p.failures is not None:
            p.failure_bound = clopper_pearson_upper(p.failures, held_out, delta)
    if goal.on_speed:
        return _decide_speed(points, goal, delta, noise)
    limit = goal.risk_limit
    order = sorted(points, key=lambda p: (p.tune_failure_rate, p.tune_loss, -p.flops_ratio))
    bounds = fixed_sequence([p.failures for p in order], held_out, limit, delta)
    for i, (p, bound, ok) in enumerate(zip(order, bounds, certified(bounds, limit))):
        p.test_order, p.certified = (i + 1 if bound is not None else None), ok
    passed = [p for p in order if p.certified]
    chosen = min(passed, key=lambda p: p.measured_ms) if passed else None
    what = {"disagreement": "top-1 disagreement with the unpruned model",
            "accuracy-drop": "top-1 disagreement with the unpruned model (which bounds the accuracy drop)",
            "cosine": f"share of images with an output cosine under {goal.limit:g}"}[goal.kind]
    tested = sum(b is not None for b in bounds)
    if chosen is None:
        first = order[0]
        return None, first, (
            f"no schedule meets {goal.text} on the {held_out} held-out images: the first in the test order, "
            f"{first.spec}, fails on {first.failures}, an upper bound of {first.failure_bound:.2%} at "
            f"{1 - delta:.0%} (certifying {limit:.2%} needs at least {images_needed(limit, delta)} held-out images "
            "with none failing)"), ""
    return chosen, chosen, None, (
        f"With probability at least {1 - delta:.0%} over the draw of the {held_out} held-out images, the {what} of "
        f"{chosen.spec} on images drawn like them (exchangeable with them) is at most {limit:.2%}: {tested} "
        "finalists tested in an order fixed on the tune split, each by a one-sided Clopper–Pearson bound, stopping at "
        f"the first failure (Learn-then-Test, fixed-sequence). Its speed ({chosen.speedup:.2f}x measured) is not part "
        "of the guarantee.")


def _decide_speed(points: list, goal, delta: float, noise: float):
    def bound_meets(p):
        if goal.kind == "speedup":
            return p.speedup_low is not None and p.speedup_low >= goal.limit
        return p.slow_ms is not None and p.slow_ms <= goal.limit

    def median_meets(p):
        return p.speedup >= goal.limit if goal.kind == "speedup" else p.measured_ms <= goal.limit

    meets = [p for p in points if bound_meets(p)]
    chosen = min(meets, key=lambda p: (p.tune_loss, p.measured_ms)) if meets else None
    if chosen is not None:
        held = (f" Chosen on the tune split alone, so its held-out disagreement bound ({chosen.failure_bound:.2%}, "
                f"Clopper–Pearson at {1 - delta:.0%}) holds for it as it is."
                if chosen.failure_bound is not None else "")
        measured = (f"{chosen.speedup:.2f}x, at least {chosen.speedup_low:.2f}x" if goal.kind == "speedup"
                    else f"{chosen.measured_ms:.2f} ms, at most {chosen.slow_ms:.2f} ms")
        return chosen, chosen, None, (
            f"{chosen.spec} meets {goal.text} on the {1 - delta:.0%} bound of its median over paired, interleaved "
            f"rounds ({measured}) on this machine as loaded during the run (timings spread {noise:.0%}).{held}")
    closest = (max(points, key=lambda p: p.speedup) if goal.kind == "speedup"
               else min(points, key=lambda p: p.measured_ms))
    if median_meets(closest):
        low = closest.speedup_low if goal.kind == "speedup" else closest.slow_ms
        shown = "–" if low is None else (f"{low:.2f}x" if goal.kind == "speedup" else f"{low:.2f} ms")
        return None, closest, (
            f"the machine is too noisy to certify {goal.text}: {closest.spec} has a median of "
            + (f"{closest.speedup:.2f}x" if goal.kind == "speedup" else f"{closest.measured_ms:.2f} ms")
            + f" but a {1 - delta:.0%} bound of {shown} (the unpruned model's timings spread {noise:.0%}, "
            "interquartile range over median); rerun on a quieter machine or with more --rounds"), ""
    return None, closest, (
        f"no schedule meets {goal.text}: the fastest finalist, {closest.spec}, measured "
        + (f"{closest.speedup:.2f}x" if goal.kind == "speedup" else f"{closest.measured_ms:.2f} ms")), ""
