"""The vectorised measurement engine: same numbers as a per-sample loop, reproducible, and correct metrics."""

import math

import pytest
import torch

from gradest.estimators import REGISTRY, applicable, expand_estimators, get_estimator
from gradest.measure import bias_variance, compare, draw_noise, gradient_samples, gradient_samples_loop
from gradest.problems import ProblemConfig, make_problem

PROBLEMS = {"moe-regression": dict(experts=4, tokens=5, dim=3, out_dim=2),
            "moe-classify": dict(experts=4, tokens=5, dim=3, out_dim=2, classes=3),
            "poly": dict(experts=3, tokens=5)}


def every_estimator(name, k=1):
    problem = make_problem(problem=name, top_k=k, sharpness=2.0, seed=5, **PROBLEMS[name])
    return problem, expand_estimators("all", problem.kind, k)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_vectorised_equals_loop(name, k):
    """K samples from one backward = K backward passes of one sample each, for every estimator, wrt all params."""
    problem, estimators = every_estimator(name, k)
    for estimator in estimators:
        fast = gradient_samples(problem, estimator, 6, "all", seed=11)
        slow = gradient_samples_loop(problem, estimator, 6, "all", seed=11)
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-13, msg=estimator.label)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_seeds_reproduce_and_differ(name):
    """The same seed gives the same samples bit for bit; another seed gives other samples for random routers."""
    problem, estimators = every_estimator(name)
    for estimator in estimators:
        a = gradient_samples(problem, estimator, 8, "router", seed=3)
        assert torch.equal(a, gradient_samples(problem, estimator, 8, "router", seed=3)), estimator.label
        if estimator.noise_dim(problem.n) > 0 and estimator.name != "switch":
            assert not torch.equal(a, gradient_samples(problem, estimator, 8, "router", seed=4)), estimator.label


def test_problems_reproduce_from_their_seed():
    """Data, teacher and initial student are a function of the config's seed."""
    for name, sizes in PROBLEMS.items():
        a, b = make_problem(problem=name, seed=9, **sizes), make_problem(problem=name, seed=9, **sizes)
        c = make_problem(problem=name, seed=10, **sizes)
        for key in a.params:
            assert torch.equal(a.params[key], b.params[key])
            assert not torch.equal(a.params[key], c.params[key])


def test_noise_is_drawn_up_front():
    """Noise has one row per sample and token; drawing it consumes no global RNG (runs are order-independent)."""
    problem = make_problem(problem="moe-regression", experts=4, tokens=5)
    estimator = get_estimator("sparsemixer-v2", k=2)
    state = torch.random.get_rng_state()
    noise = draw_noise(problem, estimator, 7, seed=1)
    assert noise.shape == (7, 5, 4) and torch.equal(state, torch.random.get_rng_state())


def naive_metrics(samples, reference):
    K = samples.shape[0]
    mean = samples.mean(0)
    variance = ((samples - mean) ** 2).sum(1).sum() / (K - 1)
    bias_sq = ((mean - reference) ** 2).sum() - variance / K
    cos = torch.nn.functional.cosine_similarity(samples, reference[None], dim=1).mean()
    cos_of_mean = torch.nn.functional.cosine_similarity(mean, reference, dim=0)
    return {"variance": variance, "bias_sq": bias_sq, "mse": bias_sq + variance, "cos_mean": cos,
            "cos_of_mean": cos_of_mean}


def test_bias_variance_matches_definitions_and_brute_force_jackknife():
    """Metrics equal the formulas of docs/estimators.md §4; their intervals are estimate +- 1.96 x the brute-force
    jackknife SE."""
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(40, 6, generator=g, dtype=torch.float64) + torch.linspace(0, 1, 6, dtype=torch.float64)
    reference = torch.linspace(0, 1.2, 6, dtype=torch.float64)
    out = bias_variance(samples, reference)
    full = naive_metrics(samples, reference)
    loo = [naive_metrics(torch.cat([samples[:j], samples[j + 1:]]), reference) for j in range(40)]
    for name, value in full.items():
        assert out[name] == pytest.approx(float(value), rel=1e-10, abs=1e-12)
        values = torch.stack([m[name] for m in loo])
        var = 39 / 40 * float(((values - values.mean()) ** 2).sum())
        if name == "bias_sq":  # the U-statistic's second-order term 2 tr(Sigma^2) / K^2 corrects the jackknife
            cov, n = torch.cov(samples.T), 39  # tr(Sigma^2) unbiased (Chen and Qin 2010)
            tr_sigma_sq = n ** 2 / ((n - 1) * (n + 2)) * float(cov.pow(2).sum() - cov.trace() ** 2 / n)
            second_order = 2 * max(tr_sigma_sq, 0.0) / 40 ** 2
            var = max(var - second_order, second_order)
        assert out[name + "_hi"] - out[name] == pytest.approx(1.959963984540054 * math.sqrt(var), rel=1e-8)
    assert out["rel_bias"] == pytest.approx(math.sqrt(max(float(full["bias_sq"]), 0)) / float(reference.norm()))


@pytest.mark.slow
@pytest.mark.parametrize("dims", [3, 20, 200])
def test_noise_corrected_bias_covers_zero_for_unbiased_noise(dims):
    """Samples = g* + noise: the corrected squared bias's 95% interval covers 0 in at least about 95% of 400
    repetitions, also in many dimensions, where the plain jackknife collapses when the mean lands near g*; and
    it is not needlessly wide: its standard error averages at most 1.5x the exact one."""
    reference = torch.ones(dims, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    covered, K, ratios = 0, 100, []
    true_se = math.sqrt(2 * dims) / K  # unit covariance, zero bias: Var(U) = 2 tr(Sigma^2) / K^2
    for _ in range(400):
        out = bias_variance(reference + torch.randn(K, dims, generator=g, dtype=torch.float64), reference)
        covered += out["bias_sq_lo"] <= 0 <= out["bias_sq_hi"]
        ratios.append((out["bias_sq_hi"] - out["bias_sq"]) / 1.959963984540054 / true_se)
    assert covered >= 372  # binomial(400, 0.95) is 380 +- 4.4 sd
    assert sum(ratios) / len(ratios) < 1.5


def test_compare_rows_and_targets():
    """compare() gives one row per estimator x config; mask and temperature rows use their own objective."""
    configs = [ProblemConfig(problem="moe-regression", experts=3, tokens=4, dim=3, out_dim=2),
               ProblemConfig(problem="poly", experts=2, tokens=4)]
    df = compare(configs, "all", samples=50)
    names = {c.problem: set(df[df.problem == c.problem].estimator.str.split("(").str[0]) for c in configs}
    assert names["moe-regression"] == set(REGISTRY)
    assert names["poly"] == set(applicable("categorical"))
    targets = dict(zip(df.estimator, df.target))
    assert targets["exact"] == "exact(k=1)" and targets["switch"] == "exact(k=1)"
    assert targets["sparsemixer"] == "exact(k=1, mask=reference r=0.1)"
    assert targets["sparsemixer(mask=none)"] == "exact(k=1)"
    assert targets["sparsemixer-v2*"] == "exact(k=1, temperature=2, mask=reference r=0.1)"
    exact = df[df.estimator == "exact"]
    assert (exact.rel_bias < 1e-10).all() and (exact.variance.abs() < 1e-20).all()
    assert set(df[df.estimator.str.startswith("st")].experts_per_token) == {3, 2}  # dense: all experts
    assert set(df[df.estimator == "sparsemixer"].experts_per_token) == {1}


def test_estimator_specs_and_settings():
    """`name:key=value` specs and `--set` settings reach the estimators that declare them, typed by default."""
    from gradest.errors import GradestError
    from gradest.estimators import parse_spec
    assert parse_spec("reinforce:baseline=mean:k=2").hparams == (("baseline", "mean"), ("k", 2))
    chosen = expand_estimators(["sparsemixer:mask=paper", "st", "reinforce"], "gated", 1,
                               {"jitter_eps": "0.2", "tau": 2})
    assert [e.label for e in chosen] == ["sparsemixer(jitter_eps=0.2, mask=paper)", "st(tau=2)", "reinforce"]
    assert chosen[0].jitter_eps == 0.2 and isinstance(chosen[0].jitter_eps, float)
    with pytest.raises(GradestError, match="no chosen estimator has the hyper-parameter 'nosuch'"):
        expand_estimators(["st"], "gated", 1, {"nosuch": 1})
    with pytest.raises(GradestError, match="does not support top-2"):
        expand_estimators(["st"], "gated", 2)


def test_chunking_and_deterministic_estimators_change_no_numbers():
    """Splitting K into memory-bounded chunks gives the same samples; a noise-free estimator is computed once."""
    problem, estimators = every_estimator("moe-classify", 2)
    for estimator in estimators:
        whole = gradient_samples(problem, estimator, 9, "all", seed=2)
        chunked = gradient_samples(problem, estimator, 9, "all", seed=2, max_elements=1)
        torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-14, msg=estimator.label)
        if estimator.noise_dim(problem.n) == 0:
            assert torch.equal(whole, gradient_samples_loop(problem, estimator, 9, "all"))
