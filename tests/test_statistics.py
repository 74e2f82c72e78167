"""The statistics the reports quote: paired t-tests, the sign test, Welch's test and Holm's correction, against
their textbook definitions."""

import math

import numpy as np
from scipy import stats

from gradest.statistics import holm, mean_interval, paired_test, welch_test


def test_holm_is_the_step_down_bonferroni():
    # sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1, kept monotone: 0.04, 0.09, max(0.08, 0.09), 0.2; NaN is no test
    assert np.allclose(holm([0.01, 0.04, 0.03, math.nan, 0.2]), [0.04, 0.09, 0.09, math.nan, 0.2], equal_nan=True)
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02]  # a family of one is not corrected


def test_paired_test_is_students_t_on_the_differences_and_the_sign_test():
    differences = [-0.1, -0.05, -0.07, -0.02, -0.04]
    result = paired_test(differences)
    assert math.isclose(result["p"], stats.ttest_1samp(differences, 0).pvalue)
    mean, lo, hi, n = mean_interval(differences)
    assert (result["mean"], result["lo"], result["hi"], result["seeds"]) == (mean, lo, hi, n)
    assert result["lower"] == 5 and math.isclose(result["sign_p"], 0.0625)  # 5 of 5 alone: 2 / 2^5


def test_welch_test_is_unequal_variance_t():
    a, b = [0.1, 0.2, 0.15, 0.3], [0.0, 0.05, -0.1, 0.02, 0.01]
    result = welch_test(a, b)
    assert math.isclose(result["p"], stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert math.isclose(result["mean"], np.mean(a) - np.mean(b)) and result["seeds"] == 4
    # the interval is t(0.975, Welch-Satterthwaite dof) standard errors either side of the difference
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    assert math.isclose(result["hi"] - result["mean"], half) and math.isclose(result["mean"] - result["lo"], half)
    # a NaN (a seed without its pair) is left out; one value a side is no test
    assert math.isclose(welch_test(a + [float("nan")], b)["p"], result["p"])
    assert math.isnan(welch_test([1.0], b)["p"]) and math.isnan(welch_test([1.0], b)["lo"])
