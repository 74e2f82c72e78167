"""The exact gradient (docs/estimators.md §2) equals central finite differences of the exact objective, in float64."""

import itertools

import pytest
import torch

from gradest.measure import exact_gradient, gradient_samples, replicate
from gradest.estimators import Objective, get_estimator
from gradest.problems import make_problem

OBJECTIVES = [
    Objective(k=1),
    Objective(k=2),
    Objective(k=1, mask="reference", r=0.3),
    Objective(k=2, mask="paper", r=0.3, temperature=2.0),
]


def finite_differences(problem, objective, h=1e-6):
    """Central differences of J w.r.t. every parameter element, in the order `exact_gradient(wrt='all')` uses."""
    grads = []
    for name in sorted(problem.params):
        flat = problem.params[name].reshape(-1)
        for i in range(flat.numel()):
            values = []
            for step in (h, -h):
                params = {k: v.clone() for k, v in problem.params.items()}
                params[name].reshape(-1)[i] += step
                values.append(problem.objective_value(params, objective))
            grads.append((values[0] - values[1]) / (2 * h))
    return torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"k{o.k}-{o.mask}-t{o.temperature}")
@pytest.mark.parametrize("name", ["moe-regression", "moe-classify", "poly"])
def test_exact_gradient_equals_finite_differences(name, objective):
    """grad J by enumeration = central differences of J, for every problem, top-1 and top-2, with and without the
    sparsity mask and the temperature of sparsemixer-v2*."""
    problem = make_problem(problem=name, experts=3, tokens=3, dim=3, out_dim=2, classes=3, top_k=objective.k,
                           sharpness=2.0, power=1.5 if name == "poly" else 2.0, seed=1)
    exact = exact_gradient(problem, objective, wrt="all")
    fd = finite_differences(problem, objective)
    assert exact.abs().max() > 1e-3  # a vacuous zero gradient would pass trivially
    torch.testing.assert_close(exact, fd, rtol=1e-6, atol=1e-8)


def test_masked_objective_differs_from_unmasked():
    """The mask changes the objective (so rows that use it need their own target) and top-2 is not top-1."""
    problem = make_problem(problem="moe-regression", experts=4, tokens=4, sharpness=3.0, seed=2)
    grads = [exact_gradient(problem, o) for o in (OBJECTIVES[0], OBJECTIVES[2])]
    assert (grads[0] - grads[1]).norm() > 1e-3 * grads[0].norm()
    top2 = make_problem(problem="moe-regression", experts=4, tokens=4, sharpness=3.0, seed=2, top_k=2)
    assert (exact_gradient(top2) - grads[0]).norm() > 1e-3 * grads[0].norm()


def test_objective_is_probability_weighted_sum_over_tuples():
    """J enumerates ordered k-tuples: written out by hand for top-2 on one token, it matches objective_value."""
    problem = make_problem(problem="moe-regression", experts=3, tokens=1, dim=2, out_dim=2, top_k=2, seed=3)
    z = problem.logits(problem.params)[0]
    e = problem.expert_outputs(problem.params)[0]
    total = 0.0
    for d1, d2 in itertools.permutations(range(3), 2):
        p1 = z.softmax(-1)[d1]
        rest = z.clone()
        rest[d1] = -float("inf")
        p2 = rest.softmax(-1)[d2]
        y = p1 * e[d1] + p2 * e[d2]
        total += p1 * p2 * problem.token_loss(problem.params, y[None, None, :])[0, 0]
    assert problem.objective_value() == pytest.approx(float(total), rel=1e-12)


@pytest.mark.parametrize("name", ["moe-regression", "moe-classify"])
def test_router_gradient_is_sum_of_token_outer_products(name):
    """Per-sample router-weight gradients = sum_t grad z_t (outer) x_t (estimators.md §4), for exact and a sampler."""
    problem = make_problem(problem=name, experts=4, tokens=5, dim=3, seed=4)
    for estimator in (Objective(k=1).exact(),
                      get_estimator("sparsemixer", mask="none"), get_estimator("reinmax")):
        g_logits = gradient_samples(problem, estimator, 3, "logits", seed=7).reshape(3, 5, 4)
        g_router = gradient_samples(problem, estimator, 3, "router", seed=7).reshape(3, 4, 3)
        torch.testing.assert_close(g_router, g_logits.transpose(1, 2) @ problem.x, rtol=1e-12, atol=1e-14)
    assert set(replicate(problem, 2, "router")) == set(problem.params)
