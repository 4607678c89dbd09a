"""Paired statistics for comparing training recipes: intervals over seeds, McNemar's exact test, the verdict.

Two recipes are compared on runs with the same training seed (a pair per seed) evaluated on the same examples.
Two sources of noise are measured separately:

- between seeds: ``mean_interval`` of the per-seed differences, a Student-t interval with n - 1 degrees of
  freedom (no interval from one seed);
- between examples: ``mcnemar_exact`` on the discordant examples of a pair (``discordant_pairs``), per seed,
  and pooled over seeds by summing the discordant counts of every seed before the test (the pooled test treats
  the seeds' examples as one sample; it does not see the spread between seeds, the interval does).

``verdict`` combines both into one rule: a difference is beyond noise when the interval excludes 0 and the
pooled McNemar p is below ``alpha``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

#: Confidence of the intervals over seeds.
CONFIDENCE = 0.95
#: Level of the pooled McNemar test.
ALPHA = 0.05
#: The rule ``verdict`` applies, in words for a results page.
RULE = (
    f"a difference is beyond noise when its {CONFIDENCE:.0%} interval over seeds excludes 0 and the pooled "
    f"McNemar test gives p < {ALPHA}; where the reports hold no per-example results, on the interval alone; "
    "with one paired seed there is no interval and no verdict"
)


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t quantile: ``P(|T| <= q) = confidence`` for ``T`` with ``df`` degrees of freedom."""
    from scipy.stats import t  # scipy comes with scikit-learn; imported here, only results pages need it

    return float(t.ppf(0.5 + confidence / 2, df))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float | None, float | None]:
    """Mean of ``values`` with its Student-t interval ``mean ± t * s / sqrt(n)`` (n - 1 degrees of freedom).

    Returns:
        ``(mean, low, high)``; ``low`` and ``high`` are None for a single value (no spread to measure).
    """
    if not values:
        raise ValueError("mean_interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = t_quantile(confidence, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def discordant_pairs(reference: np.ndarray, other: np.ndarray) -> tuple[int, int]:
    """The discordant examples of two models on the same examples, bool ``[N]`` each (True: right).

    Returns:
        ``(b, c)``: ``b`` examples only ``reference`` gets right, ``c`` examples only ``other`` gets right; the
            difference in accuracy is ``(c - b) / N``.
    """
    reference, other = np.asarray(reference, dtype=bool), np.asarray(other, dtype=bool)
    if reference.shape != other.shape or reference.ndim != 1:
        raise ValueError(f"expected two bool arrays [N] of one length, got {reference.shape} and {other.shape}")
    return int((reference & ~other).sum()), int((~reference & other).sum())


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: the binomial test of ``b`` successes in ``b + c`` trials at p = 1/2.

    ``p = min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``, computed in exact integers (no
    underflow at large counts); 1 when there is no discordant pair.
    """
    if min(b, c) < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    term, tail = 1, 1  # C(n, 0), then the running sum of C(n, i) for i <= k
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)  # int / int rounds correctly at any size


def verdict(mean: float, low: float | None, high: float | None, p: float | None, alpha: float = ALPHA) -> str:
    """The rule ``RULE`` for a difference in accuracy, in words.

    Args:
        mean: The mean difference over seeds (positive: better than the reference).
        low: Lower end of its interval; None with one seed.
        high: Upper end.
        p: The pooled McNemar p, or None when the reports hold no per-example results.
        alpha: Level of the McNemar test.

    Returns:
        ``"beyond noise (better)"``, ``"beyond noise (worse)"``, ``"within noise"`` or ``"no verdict (one seed)"``.
    """
    if low is None or high is None:
        return "no verdict (one seed)"
    if (low > 0 or high < 0) and (p is None or p < alpha):
        return f"beyond noise ({'better' if mean > 0 else 'worse'})"
    return "within noise"
