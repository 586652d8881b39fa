"""Statistics for comparing runs over seeds: is a change a real gain or noise?

Pure functions over two samples of a metric (e.g. the round-trip val_bpb of a
control and a variant, one value per seed):

- the difference of means (variant - control; negative = lower BPB = better),
- a percentile bootstrap confidence interval of that difference (each group
  resampled with replacement, independently),
- a two-sided permutation p-value of the difference of means (exact
  enumeration of all relabelings when they are few, else Monte Carlo),
- Welch's two-sided t-test p-value (parametric; scipy, a dependency of jax).

Small samples limit what the distribution-free methods can say. With 3 seeds
per group there are only C(6, 3) = 20 relabelings, so the permutation p-value
is at least 2/20 = 0.1 however large the effect, and the bootstrap interval is
too narrow (it resamples only 3 values; coverage about 75-80% instead of 95%).
The challenge's own p < 0.01 over 3 seeds therefore needs the t-test's
normality assumption; report both and read the permutation p-value as "at
its floor" when it equals :func:`min_permutation_pvalue`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import combinations
from typing import Sequence

import numpy as np

EXACT_PERMUTATION_LIMIT = 200_000  # enumerate all relabelings up to this many


def _sample(values: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name}: no values")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: non-finite values {a.tolist()}")
    return a


def mean(values: Sequence[float]) -> float:
    return float(np.mean(_sample(values, "values")))


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); 0.0 for a single value."""
    a = _sample(values, "values")
    return float(np.std(a, ddof=1)) if a.size > 1 else 0.0


def mean_delta(control: Sequence[float], variant: Sequence[float]) -> float:
    """mean(variant) - mean(control)."""
    return float(np.mean(_sample(variant, "variant")) - np.mean(_sample(control, "control")))


def bootstrap_delta_ci(
    control: Sequence[float],
    variant: Sequence[float],
    confidence: float = 0.95,
    n_boot: int = 10_000,
    rng: np.random.Generator | int | None = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(variant) - mean(control).

    Each group is resampled with replacement on its own (the groups are
    independent runs); the interval is the (1-c)/2 and (1+c)/2 quantiles of
    the resampled differences.
    """
    c, v = _sample(control, "control"), _sample(variant, "variant")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot <= 0:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    rng = np.random.default_rng(rng)
    c_means = c[rng.integers(0, c.size, (n_boot, c.size))].mean(axis=1)
    v_means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(v_means - c_means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def num_relabelings(n_control: int, n_variant: int) -> int:
    return math.comb(n_control + n_variant, n_variant)


def min_permutation_pvalue(n_control: int, n_variant: int) -> float:
    """The smallest two-sided exact permutation p-value these group sizes allow.

    Relabelings come in mirror pairs with the same |difference| when the groups
    have equal size, so the floor is 2 / C(n, k) then, 1 / C(n, k) otherwise.
    """
    total = num_relabelings(n_control, n_variant)
    return (2 if n_control == n_variant else 1) / total


@lru_cache(maxsize=16)
def _relabelings(n: int, k: int) -> np.ndarray:
    """Every choice of k of n indices (the variant group of each relabeling), one per row."""
    idx = np.array(list(combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    idx.flags.writeable = False
    return idx


def permutation_pvalue(
    control: Sequence[float],
    variant: Sequence[float],
    n_perm: int = 20_000,
    rng: np.random.Generator | int | None = 0,
    exact_limit: int = EXACT_PERMUTATION_LIMIT,
) -> tuple[float, bool]:
    """Two-sided permutation p-value of |mean(variant) - mean(control)|; returns (p, exact).

    Exact: the fraction of all C(n, k) relabelings of the pooled values whose
    |difference| is at least the observed one (the observed labeling
    included). Monte Carlo when there are more than `exact_limit`
    relabelings: (1 + hits) / (1 + n_perm), which is never 0.
    """
    c, v = _sample(control, "control"), _sample(variant, "variant")
    pooled = np.concatenate([c, v])
    n, k = pooled.size, v.size
    total_sum = pooled.sum()
    observed = abs(v.mean() - c.mean())
    tol = 1e-12 * max(1.0, float(np.max(np.abs(pooled))))  # ties must count as "at least as extreme"

    def diffs(v_sums: np.ndarray) -> np.ndarray:
        return np.abs(v_sums / k - (total_sum - v_sums) / (n - k))

    if num_relabelings(c.size, k) <= exact_limit:
        stats = diffs(pooled[_relabelings(n, k)].sum(axis=1))
        return float(np.mean(stats >= observed - tol)), True
    rng = np.random.default_rng(rng)
    hits = 0
    for start in range(0, n_perm, 4096):
        m = min(4096, n_perm - start)
        perms = rng.permuted(np.broadcast_to(pooled, (m, n)), axis=1)
        hits += int(np.sum(diffs(perms[:, :k].sum(axis=1)) >= observed - tol))
    return (1 + hits) / (1 + n_perm), False


def welch_pvalue(control: Sequence[float], variant: Sequence[float]) -> float:
    """Welch's two-sided t-test p-value; nan with fewer than 2 values in a group or no variance."""
    c, v = _sample(control, "control"), _sample(variant, "variant")
    if c.size < 2 or v.size < 2:
        return float("nan")
    if np.var(c) == 0 and np.var(v) == 0:
        return 0.0 if c.mean() != v.mean() else 1.0
    from scipy import stats as scipy_stats

    return float(scipy_stats.ttest_ind(v, c, equal_var=False).pvalue)


@dataclass(frozen=True)
class Comparison:
    """A variant against the control, over seeds."""

    n_control: int
    n_variant: int
    mean_control: float
    mean_variant: float
    std_control: float
    std_variant: float
    delta: float  # mean_variant - mean_control
    rel_delta: float  # delta / mean_control
    ci_low: float
    ci_high: float
    confidence: float
    p_permutation: float
    permutation_exact: bool
    p_permutation_floor: float
    p_welch: float

    def as_dict(self) -> dict:
        return asdict(self)


def compare(
    control: Sequence[float],
    variant: Sequence[float],
    *,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    n_perm: int = 20_000,
    seed: int = 0,
) -> Comparison:
    """Every statistic of this module for one variant against the control (deterministic given `seed`)."""
    c, v = _sample(control, "control"), _sample(variant, "variant")
    lo, hi = bootstrap_delta_ci(c, v, confidence, n_boot, np.random.default_rng(seed))
    p, exact = permutation_pvalue(c, v, n_perm, np.random.default_rng(seed + 1))
    delta = mean_delta(c, v)
    return Comparison(
        n_control=int(c.size),
        n_variant=int(v.size),
        mean_control=float(c.mean()),
        mean_variant=float(v.mean()),
        std_control=std(c),
        std_variant=std(v),
        delta=delta,
        rel_delta=delta / float(c.mean()) if c.mean() != 0 else float("nan"),
        ci_low=lo,
        ci_high=hi,
        confidence=confidence,
        p_permutation=p,
        permutation_exact=exact,
        p_permutation_floor=min_permutation_pvalue(c.size, v.size) if exact else 1.0 / (1 + n_perm),
        p_welch=welch_pvalue(c, v),
    )
