"""Statistics over seeds: means with 95% Student-t intervals, and how a report prints them."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

def mean_interval(values) -> tuple[float, float, float, int]:
    """(mean, lo, hi, n): the mean over seeds with its 95% Student-t interval; lo = hi = mean for one seed."""
    from scipy import stats
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(values.mean())
    if n == 1:
        return mean, mean, mean, 1
    half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def aggregate_seeds(df: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per group of `keys` (in first-seen order): `seeds`, and for each metric its mean over the group's
    rows (seeds) with the 95% t-interval as `<metric>_lo`, `<metric>_hi`."""
    rows = []
    for values, group in df.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        row["seeds"] = len(group)
        for metric in metrics:
            if metric in group:
                mean, lo, hi, _ = mean_interval(group[metric].to_numpy(float))
                row.update({metric: mean, f"{metric}_lo": lo, f"{metric}_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def plus_minus(mean: float, lo: float, hi: float, n: int) -> str:
    """`1.23 ± 0.04` (half-width of the 95% interval over seeds); the bare value for one seed."""
    if not np.isfinite(mean):
        return "-"
    if n <= 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {(hi - lo) / 2:.2g}"


def paired_test(differences) -> dict:
    """Student's paired t-test of differences taken within a seed (a run minus its baseline, same initialisation
    and data): their mean, 95% interval, how many are below zero, the two-sided p-value of "mean 0", and the
    sign test's (how often "k of n lower" happens by chance: 5 of 5 alone is p = 0.0625)."""
    from scipy import stats
    values = np.asarray([v for v in differences if v is not None and np.isfinite(v)], dtype=float)
    mean, lo, hi, n = mean_interval(values)
    lower = int((values < 0).sum())
    with warnings.catch_warnings():  # near-identical differences: scipy warns of precision, the p stays right
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_1samp(values, 0.0).pvalue) if n > 1 and values.std() > 0 else float("nan")
    sign = float(stats.binomtest(lower, n, 0.5).pvalue) if n else float("nan")
    return {"mean": mean, "lo": lo, "hi": hi, "seeds": n, "lower": lower, "p": p, "sign_p": sign}


def welch_test(a, b) -> dict:
    """Welch's unequal-variance t-test of mean(a) - mean(b) (e.g. one arm's paired differences in two groups): the
    difference, its 95% interval (Welch-Satterthwaite degrees of freedom), the smaller sample's size as
    `seeds`, and the two-sided p-value of "same mean". Non-finite values are left out; under 2 values a side, no
    test (NaN interval and p)."""
    from scipy import stats
    a = np.asarray([v for v in a if v is not None and np.isfinite(v)], dtype=float)
    b = np.asarray([v for v in b if v is not None and np.isfinite(v)], dtype=float)
    mean = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    result = {"mean": mean, "lo": float("nan"), "hi": float("nan"), "seeds": min(len(a), len(b)), "p": float("nan")}
    if len(a) < 2 or len(b) < 2:
        return result
    if a.std() == 0 and b.std() == 0:  # no spread: t is undefined
        return result
    test = stats.ttest_ind(a, b, equal_var=False)
    interval = test.confidence_interval(0.95)
    result.update(lo=float(interval.low), hi=float(interval.high), p=float(test.pvalue))
    return result


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment over one family of tests: the i-th smallest of m p-values is multiplied by
    (m - i + 1), kept monotone, capped at 1. NaN (no test) is left out of the family and stays NaN."""
    values = np.asarray(pvalues, dtype=float)
    tested = np.flatnonzero(np.isfinite(values))
    adjusted = np.full(len(values), np.nan)
    running = 0.0
    for rank, index in enumerate(tested[np.argsort(values[tested], kind="stable")]):
        running = max(running, min(1.0, (len(tested) - rank) * values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def p_text(p: float) -> str:
    return "-" if not np.isfinite(p) else f"{p:.2g}" if p >= 0.001 else "< 0.001"
