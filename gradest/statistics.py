"""Statistics over seeds: means with 95% Student-t intervals, and how a report prints them."""

from __future__ import annotations

import math

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
