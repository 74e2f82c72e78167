"""The contract every registry entry honours, checked generically over all of them (like torch.distributions)."""

import itertools
import math

import pytest
import torch
from scipy import stats

from gradest.errors import GradestError
from gradest.estimators import CATEGORICAL, GATED, REGISTRY, applicable, get_estimator
from gradest.estimators.base import sequential_route
from gradest.problems import make_problem

NAMES = list(REGISTRY)


def logits(*shape, seed=0, scale=1.5):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_declarations(name):
    """Each entry declares its family, a reference, sparsity, problem kinds and valid default hyper-parameters."""
    cls = REGISTRY[name]
    assert cls.name == name and cls.family and cls.reference and cls.__doc__
    assert cls.applies_to <= {GATED, CATEGORICAL} and GATED in cls.applies_to
    assert cls().label == name  # the defaults construct, and are the unlabelled default
    for key, param in cls.params.items():
        assert param.constraint(param.default) and param.doc, key
    assert ("k" in cls.params) == cls.supports_topk
    for variant in cls.variants:
        cls(**variant)


def route(estimator, z, **options):
    """Route with a state of random default outputs for a stateful estimator (an MoE layer owns the real one)."""
    state = None
    if estimator.stateful:
        state = {key: torch.randn_like(value) for key, value in estimator.init_state(z.shape[-1], 3).items()}
    return estimator.route(z, state=state, **options)


@pytest.mark.parametrize("name,k", [(name, k) for name in NAMES for k in (1, 2)
                                    if k == 1 or REGISTRY[name].supports_topk])
def test_routing_shapes(name, k):
    """Routing has (..., B, k) experts and gates; training draws distinct experts; gates are finite."""
    cls = REGISTRY[name]
    estimator = cls(k=k) if cls.supports_topk else cls()
    z = logits(2, 7, 5)
    routing = route(estimator, z)
    B = math.perm(5, k) if estimator.enumerates else 1
    width = k if estimator.sparse or estimator.enumerates else 5
    assert routing.gates.shape == (2, 7, B, width) and torch.isfinite(routing.gates).all()
    if estimator.sparse or estimator.enumerates:
        experts = routing.experts.expand(2, 7, B, width)  # may be stored broadcastable (exact: (B, k))
        assert (experts.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts
    else:
        assert routing.experts is None  # dense: all experts


@pytest.mark.parametrize("name", NAMES)
def test_inference_is_deterministic_argmax(name):
    """In inference every estimator routes to the arg-max (top-k: the k largest), ignores the RNG, and gates with
    the same (masked) softmax it trains with, with no coin-flip scale."""
    cls = REGISTRY[name]
    estimator = cls(k=2) if cls.supports_topk else cls()
    z = logits(3, 6, 5, seed=1)
    first = route(estimator, z, training=False)
    torch.manual_seed(123)
    second = route(estimator, z, training=False)
    assert torch.equal(first.experts, second.experts) and torch.equal(first.gates, second.gates)
    k = estimator.k
    assert torch.equal(first.experts[..., 0, :].sort(-1).values, z.topk(k).indices.sort(-1).values)
    if estimator.noise_dim(5) == 0 and not estimator.enumerates:  # deterministic routers: top-k of softmax(z)
        expected = z.softmax(-1).topk(k).values
    else:
        expected = estimator.objective().route(z)[1]
    torch.testing.assert_close(first.gates[..., 0, :], expected)


def test_surrogate_value_is_the_loss_of_the_drawn_routing():
    """Whatever its backward, every estimator's surrogate loss has the value of the routing it drew."""
    problem = make_problem(problem="moe-classify", experts=4, tokens=6, seed=2)
    for name in applicable(GATED):
        estimator = get_estimator(name, baseline="mean") if REGISTRY[name].score_function \
            else get_estimator(name)
        loss, z = problem.loss(problem.params, estimator, noise=torch.rand(6, estimator.noise_dim(4)))
        if estimator.enumerates:
            assert loss.item() == pytest.approx(problem.objective_value(), rel=1e-12)
        else:
            assert loss.item() > 0 and math.isfinite(loss.item())


def test_sequential_topk_frequencies():
    """Sequential top-2 draws (GRIN Alg. 3) follow P(D1, D2) = p_D1 * softmax(z without D1)_D2 (chi-square test),
    also under the sparsity mask, which never draws a masked expert."""
    z = torch.tensor([1.0, 0.7, 0.2, -0.4], dtype=torch.float64)
    for mask, r in (("none", 0.0), ("reference", 0.4)):
        N = 100_000
        u = torch.rand(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        experts, _, _ = sequential_route(z.expand(N, 4), 2, mask=mask, r=r, u=u)
        pairs = list(itertools.permutations(range(4), 2))
        probs = torch.stack([sequential_route(z, 2, mask=mask, r=r, experts=torch.tensor(t))[1].prod()
                             for t in pairs])
        counts = torch.tensor([((experts[:, 0] == a) & (experts[:, 1] == b)).sum() for a, b in pairs])
        assert counts[probs == 0].sum() == 0
        live = probs > 0
        if mask != "none":
            assert (~live).any()  # the mask removes some pairs here
        p_value = stats.chisquare(counts[live].numpy(), (N * probs[live] / probs[live].sum()).numpy()).pvalue
        assert p_value > 1e-3


@pytest.mark.parametrize("form,expected", [("reference", [True, True, True, False]),
                                           ("paper", [True, True, False, False])])
def test_sparsity_mask_forms(form, expected):
    """docs/estimators.md §2: reference masks z* - z_i > 2r max(|z_i|, z*); paper keeps z* - z_i <= r (|z_i| + |z*|)."""
    from gradest.estimators.base import sparsity_mask
    z = torch.tensor([2.0, 1.7, 1.62, 0.5])  # gaps 0.3, 0.38, 1.5; r = 0.1: reference keeps gaps <= 0.4,
    # paper keeps gaps <= 0.37, 0.362, 0.25
    keep = sparsity_mask(z, z.max(), form, 0.1)
    assert keep.tolist() == expected


# ------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("call,words", [
    (lambda: get_estimator("nosuch"), ["unknown estimator 'nosuch'", "sparsemixer"]),
    (lambda: get_estimator("st", temperature=2), ["unknown hyper-parameter 'temperature'", "tau"]),
    (lambda: get_estimator("st", tau=0.0), ["tau=0.0", "> 0"]),
    (lambda: get_estimator("sparsemixer", jitter_eps=-0.1), ["jitter_eps=-0.1", ">= 0"]),
    (lambda: get_estimator("sparsemixer", mask="both"), ["mask='both'", "reference, paper, none"]),
    (lambda: get_estimator("reinforce", k=0), ["k=0", "integer >= 1"]),
    (lambda: get_estimator("reinforce", baseline="ema"), ["baseline", "none, zero, mean"]),
    (lambda: get_estimator("switch", jitter_eps=float("nan")), ["jitter_eps=nan"]),
    (lambda: get_estimator("topk", k=4).route(logits(3, 3)), ["k=4", "n=3"]),
    (lambda: get_estimator("st").route(logits(3, 1)), ["at least 2 experts", "n=1"]),
    (lambda: get_estimator("sparsemixer").route(torch.tensor([[0.0, float("nan")]])), ["NaN or inf"]),
    (lambda: get_estimator("reinmax").route(torch.tensor([[0.0, float("inf")]])), ["NaN or inf"]),
    (lambda: get_estimator("switch").route(logits(2, 3), kind=CATEGORICAL),
     ["does not apply to a categorical problem", "st", "reinforce", "exact"]),
])
def test_bad_input_gives_a_clear_error(call, words):
    """Bad input raises GradestError with one line naming what was wrong and what is valid."""
    with pytest.raises(GradestError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_problem_configs():
    for overrides, word in [(dict(experts=1), "experts"), (dict(top_k=5, experts=3), "top_k=5"),
                            (dict(sharpness=0.0), "sharpness"), (dict(problem="nosuch"), "moe-regression"),
                            (dict(tokens=0), "tokens")]:
        with pytest.raises(GradestError, match=word):
            make_problem(**overrides)
