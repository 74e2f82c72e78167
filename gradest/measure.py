"""Measuring an estimator against the exact gradient (docs/estimators.md §4).

K gradient samples come from one backward pass: the parameters being differentiated are replicated K times (a
leading sample dimension), so the K surrogate losses are independent functions of independent copies and the
gradient of their sum holds every per-sample gradient. `gradient_samples_loop` is the naive baseline: K backward
passes, one per sample, with the same noise, hence the same numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from gradest.errors import GradestError
from gradest.estimators import Estimator, Objective, expand_estimators
from gradest.problems import Problem, ProblemConfig, make_problem

WRT = ("logits", "router", "all")  # what the gradient is taken with respect to
Z95 = 1.959963984540054


def draw_noise(problem: Problem, estimator: Estimator, samples: int, seed: int) -> Tensor:
    """All the randomness of K samples' routing, drawn up front so that any evaluation order sees the same."""
    g = torch.Generator().manual_seed(seed)  # on the CPU, so that every device sees the same numbers
    noise = torch.rand(samples, problem.T, estimator.noise_dim(problem.n), generator=g, dtype=torch.float64)
    return noise.to(problem.device)


def replicate(problem: Problem, samples: int, wrt: str) -> dict[str, Tensor]:
    """The problem's parameters, with those differentiated copied `samples` times along a new leading dim."""
    if wrt not in WRT:
        raise GradestError(f"unknown gradient target '{wrt}'; valid: {', '.join(WRT)}")
    names = set(problem.params) if wrt == "all" else {problem.router_param}
    return {name: p.detach().expand(samples, *p.shape).clone().requires_grad_() if name in names else p.detach()
            for name, p in problem.params.items()}


def gradient_samples(problem: Problem, estimator: Estimator, samples: int, wrt: str = "router", *,
                     seed: int = 0, noise: Tensor | None = None, max_elements: int = 2 ** 24) -> Tensor:
    """K independent gradient samples (K, P) of the estimator, from one forward and one backward pass.

    Memory is bounded by doing at most `max_elements` (about, per activation tensor) at once: K is split into
    as few chunks as that allows, with the noise drawn up front, so chunking never changes the numbers. An
    estimator that draws no noise (exact, topk) is deterministic: one sample is computed and repeated.
    """
    if not isinstance(samples, int) or samples < 1:
        raise GradestError(f"samples must be an integer >= 1, got {samples!r}")
    if noise is None:
        noise = draw_noise(problem, estimator, samples, seed)
    if estimator.noise_dim(problem.n) == 0:
        return one_backward(problem, estimator, 1, wrt, noise[:1]).expand(samples, -1)
    width = max(problem.n, problem.config.dim, problem.config.out_dim, problem.config.classes)
    chunk = max(1, max_elements // (problem.T * problem.n * width))
    return torch.cat([one_backward(problem, estimator, len(part), wrt, part) for part in noise.split(chunk)])


def one_backward(problem: Problem, estimator: Estimator, samples: int, wrt: str, noise: Tensor) -> Tensor:
    params = replicate(problem, samples, wrt)
    loss, z = problem.loss(params, estimator, noise=noise)
    if wrt == "logits" and not z.is_leaf:
        z.retain_grad()
    loss.sum().backward()
    if wrt == "logits":
        return z.grad.reshape(samples, -1)
    names = sorted(problem.params) if wrt == "all" else [problem.router_param]
    return torch.cat([params[name].grad.reshape(samples, -1) for name in names], dim=1)


def gradient_samples_loop(problem: Problem, estimator: Estimator, samples: int, wrt: str = "router", *,
                          seed: int = 0, noise: Tensor | None = None) -> Tensor:
    """The naive baseline: one backward pass per sample, with the noise `gradient_samples` would use."""
    if noise is None:
        noise = draw_noise(problem, estimator, samples, seed)
    return torch.cat([gradient_samples(problem, estimator, 1, wrt, noise=noise[i:i + 1]) for i in range(samples)])


def exact_gradient(problem: Problem, objective: Objective | None = None, wrt: str = "router") -> Tensor:
    """grad J by enumeration (P,) for an objective (default: the problem's top-k of softmax(z), no mask)."""
    objective = objective or Objective(k=problem.k)
    return gradient_samples(problem, objective.exact(), 1, wrt)[0]


# --------------------------------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Metric:
    """A column of a measurement row (`measure`'s, the probe's), and how the reports head it: `heading` in a study
    report's tables, `summary` in `gradest compare`'s (empty: that table leaves it out; every metric is in the CSVs,
    with its 95% interval as `<column>_lo`, `<column>_hi`)."""

    column: str
    heading: str = ""
    summary: str = ""


# The one list of metrics: what `measure` computes for each estimator, what the summaries and reports show.
METRICS = (Metric("rel_bias", "relative bias", "rel_bias"), Metric("bias_sq"),
           Metric("variance", "variance", "variance"), Metric("mse", "MSE", "mse"),
           Metric("cos_mean", summary="cos_mean"), Metric("cos_of_mean", "cos(mean, exact)", "cos_of_mean"),
           Metric("sec_per_sample", "s/sample", "sec/sample"))
# The configuration a compare row belongs to: its problem and the ProblemConfig fields a row records.
CONFIG_COLUMNS = ["problem", "experts", "tokens", "top_k", "sharpness"]


def configuration_label(row) -> str:
    return (f"{row['problem']}: n={row['experts']}, T={row['tokens']}, k={row['top_k']}, "
            f"sharpness={row['sharpness']:g}")


def by_configuration(df: pd.DataFrame):
    """(label, rows) for each problem configuration, in the order compare() measured them."""
    for _, rows in df.groupby(CONFIG_COLUMNS, sort=False):
        yield configuration_label(rows.iloc[0]), rows


def bias_variance(samples: Tensor, reference: Tensor, z: float = Z95) -> dict[str, float]:
    """Bias, variance and cosine metrics of K gradient samples (K, P) against a reference gradient g* (P,), each
    with a normal confidence interval from the jackknife standard error (every leave-one-out value in O(KP)).

    bias_sq = ||mean - g*||^2 - V/K is the U-statistic mean over pairs j != l of (g_j - g*).(g_l - g*): unbiased
    for the squared bias, so an unbiased estimator's interval covers 0. Its standard error is the jackknife's,
    corrected by the U-statistic's second-order term (see below). rel_bias = sqrt(max(bias_sq, 0)) / ||g*||.
    """
    samples, reference = samples.double(), reference.double()
    K = samples.shape[0]
    if K < 3:
        raise GradestError(f"bias and variance need at least 3 samples, got {K}")
    a = samples - reference
    ref_sq = float(reference.pow(2).sum())
    ref_norm = math.sqrt(ref_sq)
    S = a.sum(0)
    q = a.pow(2).sum(1)  # ||a_j||^2
    sa = a @ S  # S.a_j
    ag = a @ reference  # a_j.g*
    cos_each = (samples @ reference) / (samples.norm(dim=1) * ref_norm).clamp_min(1e-300)

    def stats(S_sq, Q, Sg, m, cos_sum):
        """Metrics from sufficient statistics of m samples: ||S||^2, sum ||a||^2, S.g*, sum of cosines."""
        bias_sq = (S_sq - Q) / (m * (m - 1))
        variance = ((Q - S_sq / m) / (m - 1)).clamp_min(0)  # rounding can leave -1e-17 for a constant
        mean_dot_g = Sg / m + ref_sq
        mean_norm = (S_sq / m ** 2 + 2 * Sg / m + ref_sq).clamp_min(0).sqrt()
        cos_of_mean = mean_dot_g / (mean_norm * ref_norm).clamp_min(1e-300)
        return {"bias_sq": bias_sq, "variance": variance, "mse": bias_sq + variance,
                "cos_mean": cos_sum / m, "cos_of_mean": cos_of_mean}

    S_sq, Q, Sg = S.pow(2).sum(), q.sum(), S @ reference
    full = stats(S_sq, Q, Sg, K, cos_each.sum())
    loo = stats(S_sq - 2 * sa + q, Q - q, Sg - ag, K - 1, cos_each.sum() - cos_each)
    # bias_sq is a degree-2 U-statistic: Var = 4 b'Sigma b / K + 2 tr(Sigma^2) / K^2 to second order. The
    # jackknife estimates the first term plus 2 tr(Sigma^2)/K^2 too much on average, and at zero bias it collapses
    # whenever the mean lands near g*: so take off the excess and never go below the second term.
    # tr(Sigma^2) estimated without the (tr Sigma)^2 / K bias of the plug-in, which dominates in many dimensions
    centred = samples - samples.mean(0)
    gram = centred @ centred.T if K <= centred.shape[1] else centred.T @ centred
    df = K - 1
    tr_cov, tr_cov_sq = float(centred.pow(2).sum()) / df, float(gram.pow(2).sum()) / df ** 2
    tr_sigma_sq = max(df ** 2 / ((df - 1) * (df + 2)) * (tr_cov_sq - tr_cov ** 2 / df), 0.0)
    second_order = 2 * tr_sigma_sq / K ** 2
    out = {}
    for name, value in full.items():
        var = (K - 1) / K * float((loo[name] - loo[name].mean()).pow(2).sum())
        if name == "bias_sq":
            var = max(var - second_order, second_order)
        se = math.sqrt(var)
        out[name], out[name + "_lo"], out[name + "_hi"] = float(value), float(value) - z * se, float(value) + z * se
    return with_relative_bias(out, ref_norm)


def with_relative_bias(metrics: dict, ref_norm: float) -> dict:
    """Add rel_bias = sqrt(max(bias_sq, 0)) / ||g*|| and its interval (from bias_sq's), and ref_norm."""
    def rel(b):
        return math.sqrt(max(b, 0.0)) / ref_norm if ref_norm > 0 else math.nan

    for suffix in ("", "_lo", "_hi"):
        metrics["rel_bias" + suffix] = rel(metrics["bias_sq" + suffix])
    metrics["ref_norm"] = ref_norm
    return metrics


def bias_variance_mc(samples: Tensor, draws: Tensor, z: float = Z95) -> dict[str, float]:
    """`gradest.measure.bias_variance` against a Monte-Carlo reference given by its S independent draws (S, P),
    unbiased for g* = E[draw], whose own noise is accounted for.

    With r̄ the mean draw, ||mean - r̄||^2 - V/K (what bias_variance corrects for the samples' noise) still
    over-states ||E g - g*||^2 by E||r̄ - g*||^2 = tr Cov(draw) / S, estimated unbiasedly by
    ŝ² = sum_s ||r_s - r̄||^2 / (S (S - 1)) (the reference's squared standard error). So

        bias_sq = ||mean - r̄||^2 - V/K - ŝ²  =  mean over j != l, s != s' of (g_j - r_s).(g_l - r_s'),

    a two-sample U-statistic, unbiased for the squared bias. Its standard error adds the jackknife over the
    draws (leave one draw out, in closed form) to the jackknife over the samples: the interval widens with the
    reference's noise. mse = bias_sq + V likewise; the cosines are taken against r̄ (a noisy r̄ pulls them toward
    0), with the draws' jackknife added to their intervals. ref_norm = sqrt(max(||r̄||^2 - ŝ², 0)), the
    noise-corrected norm that rel_bias divides by.
    """
    samples, draws = samples.double(), draws.double()
    S = draws.shape[0]
    if S < 3:
        raise GradestError(f"a Monte-Carlo reference needs at least 3 draws, got {S}")
    ref = draws.mean(0)
    out = bias_variance(samples, ref, z)
    r = draws - ref
    q = r.pow(2).sum(1)
    Q = float(q.sum())
    noise = Q / (S * (S - 1))  # ŝ²
    a_mean = samples.mean(0) - ref

    def widen(name, value, loo):
        se_samples = (out[name + "_hi"] - out[name]) / z
        se_draws = math.sqrt((S - 1) / S * float((loo - loo.mean()).pow(2).sum()))
        se = math.sqrt(se_samples ** 2 + se_draws ** 2)
        out[name], out[name + "_lo"], out[name + "_hi"] = value, value - z * se, value + z * se

    # leave draw s out: the mean draw moves by -r_s/(S-1) and the U-statistic of the draws becomes
    # (2||r_s||^2 - Q) / ((S-1)(S-2))
    bias_loo = out["bias_sq"] + 2 * (r @ a_mean) / (S - 1) + (2 * q - Q) / ((S - 1) * (S - 2))
    widen("bias_sq", out["bias_sq"] - noise, bias_loo)
    widen("mse", out["mse"] - noise, bias_loo)
    refs_loo = ref - r / (S - 1)  # (S, P)
    refs_norm = refs_loo.norm(dim=1).clamp_min(1e-300)
    mean = samples.mean(0)
    widen("cos_of_mean", out["cos_of_mean"], (refs_loo @ mean) / (refs_norm * mean.norm().clamp_min(1e-300)))
    cos = (samples @ refs_loo.T) / (samples.norm(dim=1, keepdim=True).clamp_min(1e-300) * refs_norm)
    widen("cos_mean", out["cos_mean"], cos.mean(0))

    return with_relative_bias(out, math.sqrt(max(float(ref.pow(2).sum()) - noise, 0.0)))


# --------------------------------------------------------------------------------------------------- compare
def measure(problem: Problem, estimator: Estimator, samples: int, wrt: str = "router", seed: int = 0,
            reference: Tensor | None = None) -> dict:
    """One row: the estimator's metrics against the exact gradient of the objective it is measured against."""
    estimator.check(problem.n, problem.kind)
    objective = estimator.objective()
    if reference is None:
        reference = exact_gradient(problem, objective, wrt)
    start = time.perf_counter()
    grads = gradient_samples(problem, estimator, samples, wrt, seed=seed)
    seconds = time.perf_counter() - start
    computed = 1 if estimator.noise_dim(problem.n) == 0 else samples  # deterministic: one sample computed
    branches = math.perm(problem.n, problem.k) if estimator.enumerates else 1
    config = {key: value for key, value in problem.config.to_dict().items() if key not in ("problem", "seed")}
    row = {"problem": problem.config.problem, "estimator": estimator.label, "target": objective.label,
           "wrt": wrt, "samples": samples, **config, "seed": seed}
    row.update(bias_variance(grads, reference))
    row.update({"sec_per_sample": seconds / computed,
                "experts_per_token": problem.k if estimator.sparse else problem.n,
                "downstream_per_token": branches + (1 if estimator.needs_zero_output else 0)})
    return row


def compare(configs: list[ProblemConfig], estimators: list[str] | str = "all", samples: int = 2000,
            wrt: str = "router", seed: int = 0, settings: dict | None = None, progress=None) -> pd.DataFrame:
    """Every estimator on every problem configuration, one row each (docs/estimators.md §4), as a DataFrame. Rows whose
    estimator samples from the common objective share one exact reference."""
    from gradest.memory import check_compare
    from gradest.problems import PROBLEMS
    # (before a problem is built: a problem of 2**40 tokens would take the memory itself)
    check_compare(configs, lambda config: expand_estimators(estimators, PROBLEMS[config.problem].kind, config.top_k,
                                                            settings), samples, wrt)
    jobs = []
    for config in configs:
        problem = make_problem(config)
        for estimator in expand_estimators(estimators, problem.kind, problem.k, settings):
            estimator.check(problem.n, problem.kind)
            jobs.append((problem, estimator))
    rows, references = [], {}
    for problem, estimator in (progress(jobs) if progress else jobs):
        key = (id(problem), estimator.objective())
        if key not in references:
            references[key] = exact_gradient(problem, estimator.objective(), wrt)
        rows.append(measure(problem, estimator, samples, wrt, seed, references[key]))
    return pd.DataFrame(rows)
