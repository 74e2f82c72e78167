"""Every estimator's Monte-Carlo mean router-logit gradient equals its closed-form expectation (estimators.md §2–3), and
the unbiasedness facts, measured with the metrics engine (docs/estimators.md §4).

The expectations are computed here from the docs' formulas by an independent implementation: our own masked softmax
(§2 reference form by default), our own enumeration of experts, ordered pairs and coin flips, and `torch.autograd`
only for f'(y), the gradient of a problem's per-token loss at a given output y. No estimator's `route`/`sample`
code is used to compute an expectation. A problem's objective is the mean over its T tokens of the per-token
losses, so every per-token logit gradient carries a factor 1/T.

Each comparison is a per-coordinate two-sided z-test at family-wise level ALPHA (Bonferroni over coordinates),
with the standard error estimated from the samples; coordinates without sampling noise must agree to NEAR relative.
Negative controls show that the same test rejects plausible wrong formulas by a wide margin.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

from gradest.estimators import GATED, REGISTRY, Objective, get_estimator
from gradest.measure import bias_variance, draw_noise, exact_gradient, gradient_samples
from gradest.problems import make_problem

ALPHA = 1e-3  # family-wise false-alarm probability of one comparison (all coordinates together)
NEAR = 1e-9  # relative agreement required where there is no sampling noise
K = 60_000  # gradient samples per comparison
Z_CI = float(norm.ppf(1 - ALPHA / 2))  # the metrics engine's intervals at the same level (not its 95% default)
SEED = 7
REINFORCE_REL_BIAS_HI = 0.2  # reinforce's interval must exclude a bias this large (switch's is about 0.65-0.8)

# Small problems. The seeds are chosen so that estimators.md §2's reference mask (r = 0.1) keeps two or three experts on
# some tokens and one on others (test_masked_problems_exercise_both_branches checks this): with one expert left
# the masked gradient is zero and a test would be vacuous.
PROBLEMS = {"moe-regression": dict(experts=4, tokens=5, dim=4, out_dim=3, seed=10),
            "moe-classify": dict(experts=4, tokens=6, dim=4, out_dim=3, seed=0),
            "poly": dict(experts=4, tokens=4, power=1.5, seed=1)}
GATED_PROBLEMS = ["moe-regression", "moe-classify"]


def build(name: str, k: int = 1):
    return make_problem(problem=name, top_k=k, **PROBLEMS[name])


# ================================================================================================ shared math
class Model:
    """A problem's quantities at its initial parameters, detached: logits z (T, n), expert outputs e (T, n, d)
    (for a categorical problem the values v_i), and the per-token loss f_t with its gradient f'_t at any y."""

    def __init__(self, problem):
        self.problem = problem
        self.gated = problem.kind == GATED
        with torch.no_grad():
            self.z = problem.logits(problem.params).detach()
            self.e = problem.expert_outputs(problem.params).detach().expand(*self.z.shape, -1)
        self.T, self.n = self.z.shape

    def f(self, y):
        """f_t(y_t): y (..., T, d) -> (..., T)."""
        return self.problem.token_loss(self.problem.params, y.unsqueeze(-2)).squeeze(-1)

    def fprime(self, y):
        """f'_t(y_t) by autograd: y (..., T, d) -> (..., T, d). Token t's loss depends on y_t only."""
        y = y.detach().requires_grad_()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.f(y).sum(), y)
        return grad

    def expert(self, D):
        """e_{t, D_t} for expert indices D (..., T) -> (..., T, d)."""
        e = self.e.expand(*D.shape, *self.e.shape[-2:])
        return e.gather(-2, D[..., None, None].expand(*D.shape, 1, e.shape[-1])).squeeze(-2)


def keep_mask(x, available, mask, r):
    """docs/estimators.md §2: the experts the sparsity mask keeps, relative to z*, the largest logit still available."""
    z_star = x.masked_fill(~available, -math.inf).amax(-1, keepdim=True)
    if mask == "reference":  # masked when z* - z_i > 2r max(|z_i|, z*)
        keep = ~((z_star - x) > 2 * r * torch.maximum(x.abs(), z_star))
    elif mask == "paper":  # kept when z* - z_i <= r (|z_i| + |z*|)
        keep = (z_star - x) <= r * (x.abs() + z_star.abs())
    else:
        keep = torch.ones_like(available)
    return keep & available


def masked_softmax(z, removed=None, mask="none", r=0.0, temperature=1.0):
    """Softmax of z / temperature over the available experts that the mask keeps (zero elsewhere); the mask is
    piecewise constant, so the gradient flows through the softmax only."""
    x = z / temperature
    available = torch.ones_like(x, dtype=torch.bool) if removed is None else ~removed
    keep = keep_mask(x.detach(), available, mask, r)
    return x.masked_fill(~keep, -math.inf).softmax(-1)


def gate_jacobian(p, D, temperature=1.0):
    """grad_z p_D for p = masked softmax(z / temperature): p_D (onehot_D - p) / temperature, rows (..., n)."""
    p_D = p.gather(-1, D.unsqueeze(-1))
    return p_D * (F.one_hot(D, p.shape[-1]).to(p.dtype) - p) / temperature


def jt(q, g):
    """J(q)^T g = q*g - q (q.g), the softmax Jacobian (at softmax value q) applied to g."""
    return q * g - q * (q * g).sum(-1, keepdim=True)


@dataclass
class Stage:
    p: torch.Tensor  # (T, n) the softmax this stage samples from (zero on removed and masked experts)
    D: torch.Tensor  # (T,) the expert chosen at this stage
    is_max: torch.Tensor  # (T,) whether D is the largest logit still available

    @property
    def gate(self):
        return self.p.gather(-1, self.D[:, None]).squeeze(-1)


def sequential_stages(z, experts, mask="none", r=0.0, temperature=1.0):
    """GRIN's sequential top-k (estimators.md §2) for a fixed ordered tuple of experts: stage j samples D_j from the
    (masked) softmax of the logits not chosen yet, masked relative to the largest of them."""
    removed = torch.zeros_like(z, dtype=torch.bool)
    stages = []
    for d in experts:
        D = torch.full(z.shape[:-1], d, dtype=torch.long)
        top = z.detach().masked_fill(removed, -math.inf).argmax(-1)
        stages.append(Stage(masked_softmax(z, removed, mask, r, temperature), D, top == D))
        removed = removed | F.one_hot(D, z.shape[-1]).bool()
    return stages


def exact_enumeration(model, k=1, mask="none", r=0.0, temperature=1.0):
    """grad_z J by autograd of the enumerated objective J = mean_t sum_{D1..Dk} prod_j p^(j)_{Dj} f_t(y),
    y = sum_j p^(j)_{Dj} e_{Dj} (gated) or sum_j v_{Dj} (categorical). Flattened (T*n,)."""
    z = model.z.clone().requires_grad_()
    J = 0.0
    for experts in itertools.permutations(range(model.n), k):
        prob, y = 1.0, 0.0
        for stage in sequential_stages(z, experts, mask, r, temperature):
            prob = prob * stage.gate
            y = y + (stage.gate[:, None] if model.gated else 1.0) * model.expert(stage.D)
        J = J + prob * model.f(y)
    (grad,) = torch.autograd.grad(J.mean(), z)
    return grad.reshape(-1)


def exact_top1_terms(model, mask="none", r=0.0):
    """estimators.md §2's exact top-1 gradient, expert by expert: nabla_1 terms p_i f'(a_i).e_i grad p_i / T (the gate
    path) and nabla_0 terms (f(a_i) - f(0)) grad p_i / T (the routing path), a_i = p_i e_i, each (n, T, n) with
    [i, t] the term of expert i on token t's logits; the sum of both over i is grad J."""
    p = masked_softmax(model.z, mask=mask, r=r)
    D = torch.arange(model.n)[:, None].expand(model.n, model.T)  # (n, T): expert i for every token
    gate = p.T[..., None]  # (n, T, 1)
    a = gate * model.expert(D)
    jac = gate_jacobian(p.expand(model.n, -1, -1), D) / model.T
    nabla_1 = (gate[..., 0] * (model.fprime(a) * model.expert(D)).sum(-1))[..., None] * jac
    nabla_0 = (model.f(a) - model.f(torch.zeros_like(a)))[..., None] * jac
    return nabla_1, nabla_0


def argmax_expert(model):
    """(n, T) bool: whether expert i is token t's arg-max logit."""
    return torch.arange(model.n)[:, None] == model.z.argmax(-1)[None, :]


# ---------------------------------------------------------------- SparseMixer family: estimators.md §3's expectations
@dataclass(frozen=True)
class GateRule:
    """A sparse gate-path estimator as docs/estimators.md §3 writes its expectation: the router gradient of one draw is
    `scale * f'(y).e_D grad p_D`, p = masked softmax(z / temperature), at the forward output y = s p_D e_D; the
    arg-max expert always takes the Euler step s = 1 (steps[0]); any other takes s with the given probability."""

    scale: float
    steps: tuple  # ((probability, s), ...), steps[0] the Euler step s = 1
    temperature: float = 1.0

    def __post_init__(self):
        assert self.steps[0][1] == 1 and abs(sum(q for q, _ in self.steps) - 1) < 1e-12


RULES = {
    # E_D[2 f'(a).e_D grad p_D]
    "first-order": GateRule(2.0, ((1.0, 1.0),)),
    # E_D[(delta 2 f'(a) + (1 - delta)(f'(a) + f'(a/2))).e_D grad p_D]
    "sparsemixer": GateRule(2.0, ((0.5, 1.0), (0.5, 0.5))),
    # E_D[(delta f'(a) + (1 - delta)(1/4 f'(a) + 3/4 f'(a/3))).e_D grad p_D]
    "sparsemixer-v2": GateRule(1.0, ((0.25, 1.0), (0.75, 1 / 3))),
    # E_D[2 (delta f'(a) + (1 - delta)(5/8 f'(a) + 3/8 f'(a/3))).e_D grad p_D], p = masked softmax(z / 2)
    "sparsemixer-v2*": GateRule(2.0, ((0.625, 1.0), (0.375, 1 / 3)), temperature=2.0),
}


def gate_rule_expectation(model, rule, k=1, mask="reference", r=0.1):
    """E[router gradient] of a GateRule with sequential top-k (k = 1 or 2): enumerate the ordered expert tuples
    with their sequential probabilities and every stage's step s, y = sum_j s_j p^(j)_{Dj} e_{Dj}, gradient
    scale * sum_j f'(y).e_{Dj} grad p^(j)_{Dj}. Flattened (T*n,)."""
    total = torch.zeros(model.T, model.n, dtype=torch.float64)
    for experts in itertools.permutations(range(model.n), k):
        stages = sequential_stages(model.z, experts, mask, r, rule.temperature)
        prob = math.prod(stage.gate for stage in stages)
        for outcome in itertools.product(range(len(rule.steps)), repeat=k):
            weight, y = prob, 0.0
            for stage, o in zip(stages, outcome):
                q, s = rule.steps[o]
                weight = weight * torch.where(stage.is_max, float(o == 0), q)
                y = y + s * stage.gate[:, None] * model.expert(stage.D)
            fp = model.fprime(y)
            grad = sum((fp * model.expert(st.D)).sum(-1, keepdim=True) * gate_jacobian(st.p, st.D, rule.temperature)
                       for st in stages)
            total += weight[:, None] * rule.scale * grad
    return (total / model.T).reshape(-1)


# ------------------------------------------------------------------------- straight-through family, switch, topk
def relaxed_backward(model, D, soft, rule, tau=1.0):
    """The router gradient of one draw of `st`/`gumbel-st` (rule "st": J(soft)^T g / tau, soft = softmax of the
    (perturbed) logits / tau) or `reinmax` (2 J(pi)^T g - 1/2 J(p)^T g, pi = (h + softmax(z/tau)) / 2), with
    g_i = f'(y).p_i e_i (gated; plus the gate path f'(y).e_D grad p_D) or f'(y).v_i (categorical), y the forward
    output of choice D. D (..., T), soft (..., T, n) -> (..., T, n), per token (no 1/T)."""
    p = model.z.softmax(-1).expand(*D.shape, model.n)
    h = F.one_hot(D, model.n).to(p.dtype)
    e = model.e.expand(*D.shape, *model.e.shape[-2:])
    if model.gated:
        e = p[..., None] * e  # the gated layer weighs expert i's output by p_i
    y = (h[..., None] * e).sum(-2)
    fp = model.fprime(y)
    g = (fp[..., None, :] * e).sum(-1)  # g_i = dloss/dh_i
    if rule == "st":
        back = jt(soft, g) / tau
    else:
        back = 2 * jt((h + soft) / 2, g) - 0.5 * jt(p, g)
    if model.gated:
        back = back + (fp * model.expert(D)).sum(-1, keepdim=True) * gate_jacobian(p, D)
    return back


def dense_expectation(model, rule, tau=1.0):
    """st / reinmax: the backward is deterministic given D ~ p, so E = sum_D p_D backward(D). Flattened."""
    D = torch.arange(model.n)[:, None].expand(model.n, model.T)
    soft = (model.z / tau).softmax(-1).expand(model.n, -1, -1)
    grads = relaxed_backward(model, D, soft, rule, tau)  # (n, T, n)
    return (model.z.softmax(-1).T[..., None] * grads).sum(0).reshape(-1) / model.T


def gumbel_st_draws(model, tau, generator, m):
    """m draws of gumbel-st's gradient: D = argmax(z + G), soft = softmax((z + G) / tau), G Gumbel(0, 1)."""
    gumbel = -torch.empty(m, model.T, model.n, dtype=torch.float64).exponential_(generator=generator).log()
    x = model.z + gumbel
    return relaxed_backward(model, x.argmax(-1), (x / tau).softmax(-1), "st", tau).reshape(m, -1) / model.T


def switch_backward(model, u):
    """switch's gradient for jitter u (..., T, n): D = argmax(z*u), y = p~_D e_D, p~ = softmax(z*u), autograd
    through p~_D only: f'(y).e_D p~_D (onehot_D - p~) * u."""
    zu = model.z * u
    p, D = zu.softmax(-1), zu.argmax(-1)
    e_D = model.expert(D)
    fp = model.fprime(p.gather(-1, D[..., None]) * e_D)
    return ((fp * e_D).sum(-1, keepdim=True) * gate_jacobian(p, D) * u).reshape(*u.shape[:-2], -1) / model.T


def switch_draws(model, eps, generator, m):
    u = 1 - eps + 2 * eps * torch.rand(m, model.T, model.n, dtype=torch.float64, generator=generator)
    return switch_backward(model, u)


def topk_backward(model, k, renormalize):
    """topk: S = the k largest logits, y = sum_{i in S} g_i e_i, g = softmax(z) (renormalised over S if asked);
    gradient sum_{i in S} f'(y).e_i grad g_i, by autograd of our own g. Deterministic. Flattened."""
    z = model.z.clone().requires_grad_()
    S = z.detach().topk(k, dim=-1).indices
    g = z.softmax(-1).gather(-1, S)
    if renormalize:
        g = g / g.sum(-1, keepdim=True)
    e_S = torch.stack([model.expert(S[:, j]) for j in range(k)], -2)  # (T, k, d)
    fp = model.fprime((g.detach()[..., None] * e_S).sum(-2))
    (grad,) = torch.autograd.grad(((fp[:, None, :] * e_S).sum(-1) * g).sum() / model.T, z)
    return grad.reshape(-1)


def monte_carlo(draw, samples, seed, chunk=100_000):
    """Mean and standard error of `samples` draws of an independent implementation, `draw(generator, m)`."""
    generator = torch.Generator().manual_seed(seed)
    total = total_sq = 0.0
    for start in range(0, samples, chunk):
        x = draw(generator, min(chunk, samples - start))
        total, total_sq = total + x.sum(0), total_sq + x.pow(2).sum(0)
    mean = total / samples
    var = (total_sq - samples * mean ** 2).clamp_min(0) / (samples - 1)
    return mean, (var / samples).sqrt()


# ================================================================================================ the z-test
def mismatch(samples, expected, expected_se=None, alpha=ALPHA):
    """Largest |mean - expected| / tolerance over coordinates; <= 1 means agreement. Tolerance = z_crit SE +
    NEAR max|expected|, SE = sample std / sqrt(K) (combined with `expected_se` when the expectation is itself a
    Monte-Carlo mean), z_crit two-sided with Bonferroni over the coordinates. Coordinates with no sampling noise
    (SE = 0) thus need near-equality to NEAR relative. Returns (ratio, description of the worst coordinate)."""
    K, P = samples.shape
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(K)
    if expected_se is not None:
        se = (se ** 2 + expected_se ** 2).sqrt()
    z_crit = float(norm.ppf(1 - alpha / (2 * P)))
    tol = z_crit * se + NEAR * max(float(expected.abs().max()), 1e-300)
    ratio = (mean - expected).abs() / tol
    i = int(ratio.argmax())
    return float(ratio[i]), (f"coordinate {i}: mean {float(mean[i]):.6g} vs expected {float(expected[i]):.6g}, "
                             f"SE {float(se[i]):.3g}, z_crit {z_crit:.2f}, ratio {float(ratio[i]):.3g}")


def assert_mean_matches(samples, expected, expected_se=None):
    assert float(expected.abs().max()) > 1e-6, "vacuous: the expected gradient is zero"
    ratio, worst = mismatch(samples, expected, expected_se)
    assert ratio <= 1, worst


def samples_of(problem, name, seed=SEED, samples=K, **hparams):
    return gradient_samples(problem, get_estimator(name, **hparams), samples, wrt="logits", seed=seed)


# ================================================================================================ the tests
COVERED: set[tuple[str, tuple]] = set()  # (estimator name, hyper-parameters) each expectation test covers


def cover(cases):
    """Record the (estimator, hyper-parameters) of parametrised cases for the coverage test, and return them."""
    for name, hparams, *_ in cases:
        COVERED.add((name, tuple(sorted(hparams.items()))))
    return cases


def case_id(value):
    """Readable test ids: an estimator or problem name, or its hyper-parameters `key=value,...`."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "default"
    return str(value)


def design_mask(hparams):
    """The mask an estimator of the SparseMixer family samples with: estimators.md §2's reference form, r = 0.1, unless
    the case asks for another (taken from docs/estimators.md, not from the estimator's own declaration)."""
    mask = hparams.get("mask", "reference")
    return mask, (hparams.get("jitter_eps", 0.1) if mask != "none" else 0.0)


# ------------------------------------------------------------------------------------ the helpers themselves
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mask", ["none", "reference", "paper"])
def test_gate_jacobian_is_the_masked_softmax_jacobian(mask, temperature):
    """Our closed-form grad p^(j)_D = p_D (onehot_D - p) / temperature equals autograd of our masked softmax, at
    both stages of sequential top-2 (the second with D1 removed)."""
    model = Model(build("moe-classify"))
    z = model.z.clone().requires_grad_()
    for experts in [(0, 1), (2, 3), (3, 0)]:
        for stage in sequential_stages(z, experts, mask, 0.1, temperature):
            (auto,) = torch.autograd.grad(stage.gate.sum(), z, retain_graph=True)
            torch.testing.assert_close(auto, gate_jacobian(stage.p.detach(), stage.D, temperature),
                                       rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", GATED_PROBLEMS)
def test_masked_problems_exercise_both_branches(name):
    """The chosen problems are not vacuous under the reference mask (r = 0.1): some tokens keep two or more
    experts with a non-arg-max probability above 0.3, and some experts are masked."""
    model = Model(build(name))
    p = masked_softmax(model.z, mask="reference", r=0.1)
    second = p.sort(-1, descending=True).values[:, 1]
    assert int((second > 0.3).sum()) >= 2
    assert bool((p == 0).any())


EXACT_OBJECTIVES = [Objective(k=1), Objective(k=1, mask="reference", r=0.1), Objective(k=2),
                    Objective(k=2, mask="reference", r=0.1, temperature=2.0), Objective(k=2, mask="paper", r=0.3)]


# On poly a masked top-2 objective is constant (y = v_D1 + v_D2 is symmetric and each token keeps two experts at
# most), so its gradient is identically zero: that case would be vacuous.
EXACT_CASES = [(name, objective) for name in PROBLEMS for objective in EXACT_OBJECTIVES
               if not (name == "poly" and objective.k == 2 and objective.mask != "none")]


@pytest.mark.parametrize("name,objective", EXACT_CASES,
                         ids=[f"{n}-k{o.k}-{o.mask}-t{o.temperature:g}" for n, o in EXACT_CASES])
def test_exact_gradient_matches_our_enumeration(name, objective):
    """gradest.measure.exact_gradient (wrt logits) equals our own enumeration of estimators.md §2's objective to 1e-10,
    and for top-1 docs/estimators.md's nabla_1 + nabla_0 decomposition equals it too."""
    model = Model(build(name, objective.k))
    ours = exact_enumeration(model, objective.k, objective.mask, objective.r, objective.temperature)
    assert float(ours.abs().max()) > 1e-3
    theirs = exact_gradient(model.problem, objective, wrt="logits")
    torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-12)
    if objective.k == 1 and objective.temperature == 1 and model.gated:
        nabla_1, nabla_0 = exact_top1_terms(model, objective.mask, objective.r)
        torch.testing.assert_close((nabla_1 + nabla_0).sum(0).reshape(-1), ours, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- SparseMixer family, top-1, top-2
GATE_CASES = cover([(name, variant) for name in RULES for variant in REGISTRY[name].variants])


@pytest.mark.slow
@pytest.mark.parametrize("problem_name", GATED_PROBLEMS)
@pytest.mark.parametrize("name,hparams", GATE_CASES, ids=case_id)
def test_gate_path_estimator_matches_design_expectation(name, hparams, problem_name):
    """first-order, sparsemixer, sparsemixer-v2, sparsemixer-v2* (reference mask r = 0.1, and mask=none), top-1:
    the MC mean of the logit gradient equals docs/estimators.md §3's E_D[...] formula."""
    problem = build(problem_name)
    expected = gate_rule_expectation(Model(problem), RULES[name], 1, *design_mask(hparams))
    assert_mean_matches(samples_of(problem, name, **hparams), expected)


TOP2_CASES = cover([(name, {"k": 2, **variant}) for name in ["first-order", "sparsemixer-v2", "sparsemixer-v2*"]
                    for variant in REGISTRY[name].variants])


@pytest.mark.slow
@pytest.mark.parametrize("problem_name", GATED_PROBLEMS)
@pytest.mark.parametrize("name,hparams", TOP2_CASES, ids=case_id)
def test_top2_gate_path_estimator_matches_enumeration(name, hparams, problem_name):
    """Top-2 (GRIN Alg. 3): the MC mean equals the enumeration over ordered pairs (D1, D2) with sequential
    probabilities (D2 from the softmax with D1 removed, masked relative to the largest remaining logit) and both
    stages' coin flips."""
    problem = build(problem_name, k=2)
    expected = gate_rule_expectation(Model(problem), RULES[name], 2, *design_mask(hparams))
    assert_mean_matches(samples_of(problem, name, **hparams), expected)


# ------------------------------------------------------------------------------- straight-through, ReinMax
DENSE_CASES = cover([("st", {}), ("st", {"tau": 0.5}), ("reinmax", {}), ("reinmax", {"tau": 2.0})])


@pytest.mark.slow
@pytest.mark.parametrize("problem_name", list(PROBLEMS))
@pytest.mark.parametrize("name,hparams", DENSE_CASES, ids=case_id)
def test_relaxed_estimator_matches_sum_over_choices(name, hparams, problem_name):
    """st and reinmax: deterministic backward given D ~ p, so the MC mean equals sum_D p_D backward(D) with the
    backward written from docs/estimators.md's table (st via sigma_tau, reinmax 2 J(pi)^T g - 1/2 J(p)^T g), gated and
    categorical."""
    problem = build(problem_name)
    expected = dense_expectation(Model(problem), name, hparams.get("tau", 1.0))
    assert_mean_matches(samples_of(problem, name, **hparams), expected)


# ------------------------------------------------------------------------------------------- noise integrals
NOISE_CASES = cover([("gumbel-st", {}, problem) for problem in PROBLEMS]
                    + [("gumbel-st", {"tau": 0.5}, "moe-classify")]
                    + [("switch", {}, problem) for problem in GATED_PROBLEMS]
                    + [("switch", {"jitter_eps": 0.3}, problem) for problem in GATED_PROBLEMS])


@pytest.mark.slow
@pytest.mark.parametrize("name,hparams,problem_name", NOISE_CASES)
def test_noise_integral_estimator_matches_large_independent_sample(name, hparams, problem_name):
    """gumbel-st and switch: the MC mean equals a 4x larger independent sample of the docs' formula written here
    (Gumbel perturbation of z; multiplicative jitter u ~ U[1-eps, 1+eps] with autograd through p~_D only),
    compared by a two-sample z-test."""
    model = Model(build(problem_name))
    if name == "gumbel-st":
        tau = hparams.get("tau", 1.0)
        mean, se = monte_carlo(lambda g, m: gumbel_st_draws(model, tau, g, m), 4 * K, seed=SEED + 1)
    else:
        eps = hparams.get("jitter_eps", 0.01)
        mean, se = monte_carlo(lambda g, m: switch_draws(model, eps, g, m), 4 * K, seed=SEED + 1)
    assert_mean_matches(samples_of(model.problem, name, **hparams), mean, se)


@pytest.mark.parametrize("problem_name", GATED_PROBLEMS)
def test_switch_without_jitter_is_the_argmax_gate_path(problem_name):
    """switch with jitter_eps=0: every sample equals the deterministic arg-max gate path f'(a).e_D grad p_D."""
    model = Model(build(problem_name))
    expected = switch_backward(model, torch.ones_like(model.z))
    samples = samples_of(model.problem, "switch", samples=100, jitter_eps=0.0)
    torch.testing.assert_close(samples, expected.expand_as(samples), rtol=NEAR, atol=NEAR * float(expected.abs().max()))
    assert_mean_matches(samples, expected)


TOPK_CASES = cover([("topk", {"k": k, "renormalize": renormalize}) for k in (1, 2) for renormalize in (False, True)]
                   + [("topk", {})])


@pytest.mark.parametrize("problem_name", GATED_PROBLEMS)
@pytest.mark.parametrize("name,hparams", TOPK_CASES, ids=case_id)
def test_topk_is_the_deterministic_gate_path(name, hparams, problem_name):
    """topk (GShard): no randomness, so every sample equals sum_{i in S} f'(y).e_i grad g_i."""
    model = Model(build(problem_name))
    expected = topk_backward(model, hparams.get("k", 1), hparams.get("renormalize", False))
    samples = samples_of(model.problem, name, samples=100, **hparams)
    if hparams.get("k", 1) == 1 and hparams.get("renormalize"):
        # a renormalised single gate is the constant 1: no router gradient, up to rounding
        assert float(samples.abs().max()) < 1e-12 and float(expected.abs().max()) < 1e-12
    else:
        assert_mean_matches(samples, expected)


# ------------------------------------------------------------------------------------------ unbiased ones
UNBIASED_CASES = cover([(name, variant) for name in ["reinforce", "exact"] for variant in REGISTRY[name].variants])


@pytest.mark.slow
@pytest.mark.parametrize("problem_name", list(PROBLEMS))
@pytest.mark.parametrize("name,hparams", UNBIASED_CASES, ids=case_id)
def test_unbiased_estimator_mean_is_the_exact_gradient(name, hparams, problem_name):
    """reinforce (every baseline) and exact: the MC mean equals our enumeration of the exact gradient."""
    model = Model(build(problem_name))
    samples = samples_of(model.problem, name, samples=100 if name == "exact" else K, **hparams)
    assert_mean_matches(samples, exact_enumeration(model))


TOP2_UNBIASED_CASES = cover([("reinforce", {"k": 2, **variant}) for variant in REGISTRY["reinforce"].variants]
                            + [("exact", {"k": 2})])


@pytest.mark.slow
@pytest.mark.parametrize("problem_name", list(PROBLEMS))
@pytest.mark.parametrize("name,hparams", TOP2_UNBIASED_CASES, ids=case_id)
def test_top2_unbiased_estimator_mean_is_the_exact_gradient(name, hparams, problem_name):
    """Top-2 reinforce (every baseline) and exact: the MC mean equals our enumeration over ordered pairs."""
    model = Model(build(problem_name, k=2))
    samples = samples_of(model.problem, name, samples=100 if name == "exact" else K, **hparams)
    assert_mean_matches(samples, exact_enumeration(model, k=2))


# ------------------------------------------------------------------- dense router gradients at sparse forwards
def densemixer_backward(model, k, renormalize):
    """densemixer: S = top-k of p, forward y = sum_{i in S} g_i e_i; router gradient = that of the dense mixture
    sum_i w_i e_i over every expert at f'(y): w = p, or renormalised p_i / N on S and p_i / sg(N) off S,
    N = sum_S p (the package's `partscale_fix_expert`). Deterministic. Flattened."""
    z = model.z.clone().requires_grad_()
    p = z.softmax(-1)
    S = p.detach().topk(k, dim=-1).indices
    on = torch.zeros_like(p).scatter(-1, S, 1.0)
    w = p
    if renormalize:
        N = (p * on).sum(-1, keepdim=True)
        w = p * on / N + p * (1 - on) / N.detach()
    y = ((w * on).detach()[..., None] * model.e).sum(-2)
    c = (model.fprime(y)[:, None, :] * model.e).sum(-1)  # c_i = f'(y).e_i, every expert
    (grad,) = torch.autograd.grad((c * w).sum() / model.T, z)
    return grad.reshape(-1)


def default_moe_backward(model, k, forward, renormalize):
    """default-moe: S = top-k of p; e^_i = the mean of e_i over the tokens whose top-k holds i (where the EMA of a
    layer whose parameters stay fixed settles); y = sum_{i in S} g_i e_i (+ sum_{i not in S} p_i e^_i when the
    defaults enter the forward); router gradient sum_{i in S} f'(y).e_i grad g_i + sum_{i not in S} f'(y).e^_i
    grad p_i. Deterministic. Flattened."""
    z = model.z.clone().requires_grad_()
    p = z.softmax(-1)
    S = p.detach().topk(k, dim=-1).indices
    on = torch.zeros_like(p).scatter(-1, S, 1.0)
    default = torch.einsum("tn,tnd->nd", on, model.e) / on.sum(0).clamp_min(1)[:, None]
    g = p * on
    if renormalize:
        g = g / g.sum(-1, keepdim=True)
    y = (g.detach()[..., None] * model.e).sum(-2)
    if forward == "substitute":
        y = y + ((p * (1 - on)).detach()[..., None] * default).sum(-2)
    fp = model.fprime(y)
    c_on = (fp[:, None, :] * model.e).sum(-1)
    c_off = fp @ default.T
    (grad,) = torch.autograd.grad(((c_on * g) + (c_off * p * (1 - on))).sum() / model.T, z)
    return grad.reshape(-1)


def gapped_logits(z, D, gap):
    """GST's perturbed logits m(z, D): m_D = max z, m_i = min(z_i, max z - gap); gap "p" = -log(1 - p_D) / p_D."""
    z_star = z.max(-1, keepdim=True).values
    h = F.one_hot(D, z.shape[-1]).to(z.dtype)
    if gap == "p":
        p_D = z.softmax(-1).gather(-1, D[..., None]) * (1 - 1e-5)
        gap = -torch.log1p(-p_D) / p_D
    return torch.where(h.bool(), z_star, torch.minimum(z, z_star - gap))


def gapped_expectation(model, gap, tau):
    """gapped-st: the backward is deterministic given D ~ p (st's, through softmax(m(z, D) / tau)), so
    E = sum_D p_D backward(D). Flattened."""
    D = torch.arange(model.n)[:, None].expand(model.n, model.T)
    soft = (gapped_logits(model.z.expand(model.n, -1, -1), D, gap) / tau).softmax(-1)
    grads = relaxed_backward(model, D, soft, "st", tau)
    return (model.z.softmax(-1).T[..., None] * grads).sum(0).reshape(-1) / model.T


DENSEMIXER_CASES = cover([("densemixer", {"k": k, "renormalize": renormalize}) for k in (1, 2)
                          for renormalize in (False, True)] + [("densemixer", {})])


@pytest.mark.parametrize("problem_name", GATED_PROBLEMS)
@pytest.mark.parametrize("name,hparams", DENSEMIXER_CASES, ids=case_id)
def test_densemixer_is_the_dense_mixture_gradient(name, hparams, problem_name):
    """densemixer: no randomness, so every sample equals J(w)^T [f'(y).e_i]_i over all experts at the top-k
    forward y (renormalised: the package's rule); the conventional top-k gradient is only its S-part."""
    model = Model(build(problem_name))
    k, renormalize = hparams.get("k", 1), hparams.get("renormalize", False)
    expected = densemixer_backward(model, k, renormalize)
    samples = samples_of(model.problem, name, samples=100, **hparams)
    assert_mean_matches(samples, expected)
    assert (expected - topk_backward(model, k, renormalize)).abs().max() > 1e-3  # not the gate path alone


DEFAULT_MOE_CASES = cover([("default-moe", {"k": k, "forward": forward}) for k in (1, 2)
                           for forward in ("substitute", "backward-only")]
                          + [("default-moe", {"k": 2, "renormalize": True}), ("default-moe", {})])


@pytest.mark.parametrize("problem_name", GATED_PROBLEMS)
@pytest.mark.parametrize("name,hparams", DEFAULT_MOE_CASES, ids=case_id)
def test_default_moe_is_the_gate_path_plus_the_defaults(name, hparams, problem_name):
    """default-moe at its settled state: every sample equals the gate path of the routed experts plus
    f'(y).e^_i grad p_i for every other expert, y with (or without) the default outputs."""
    model = Model(build(problem_name))
    expected = default_moe_backward(model, hparams.get("k", 1), hparams.get("forward", "substitute"),
                                    hparams.get("renormalize", False))
    assert_mean_matches(samples_of(model.problem, name, samples=100, **hparams), expected)


GAPPED_CASES = cover([("gapped-st", {}), ("gapped-st", {"gap": "p"}), ("gapped-st", {"tau": 0.5}),
                      ("gapped-st", {"gap": 2.0, "tau": 2.0})])


@pytest.mark.slow
@pytest.mark.parametrize("problem_name", list(PROBLEMS))
@pytest.mark.parametrize("name,hparams", GAPPED_CASES, ids=case_id)
def test_gapped_st_matches_sum_over_choices(name, hparams, problem_name):
    """gapped-st: deterministic backward given D ~ p, so the MC mean equals sum_D p_D backward(D), with the
    perturbed logits m(z, D) written here from the paper (gated and categorical)."""
    model = Model(build(problem_name))
    expected = gapped_expectation(model, hparams.get("gap", 1.0), hparams.get("tau", 1.0))
    assert_mean_matches(samples_of(model.problem, name, **hparams), expected)


RB_GUMBEL_CASES = cover([("rb-gumbel", {}, problem) for problem in PROBLEMS]
                        + [("rb-gumbel", {"tau": 0.5, "draws": 4}, "moe-classify")])


@pytest.mark.slow
@pytest.mark.parametrize("name,hparams,problem_name", RB_GUMBEL_CASES)
def test_rb_gumbel_has_gumbel_st_mean(name, hparams, problem_name):
    """rb-gumbel: Rao-Blackwellisation keeps the mean, E[rb-gumbel] = E[gumbel-st] at the same tau: its MC mean
    equals a 4x larger independent sample of gumbel-st's formula (two-sample z-test)."""
    model = Model(build(problem_name))
    tau = hparams.get("tau", 1.0)
    mean, se = monte_carlo(lambda g, m: gumbel_st_draws(model, tau, g, m), 4 * K, seed=SEED + 2)
    assert_mean_matches(samples_of(model.problem, name, **hparams), mean, se)


@pytest.mark.slow
@pytest.mark.parametrize("problem_name", list(PROBLEMS))
def test_rb_gumbel_variance_is_at_most_gumbel_st(problem_name):
    """Rao-Blackwellisation cannot add variance: rb-gumbel's variance (trace) is at most gumbel-st's at the same
    tau (within the interval), and on the ungated problem, where the relaxation is the whole gradient, it is
    measurably smaller (disjoint intervals at level ALPHA)."""
    model = Model(build(problem_name))
    reference = exact_enumeration(model)
    rb = bias_variance(samples_of(model.problem, "rb-gumbel"), reference, z=Z_CI)
    gumbel = bias_variance(samples_of(model.problem, "gumbel-st"), reference, z=Z_CI)
    assert rb["variance_lo"] <= gumbel["variance_hi"]
    if problem_name == "poly":
        assert rb["variance_hi"] < gumbel["variance_lo"]


def test_every_registered_estimator_is_covered():
    """Every estimator of the registry, with every variant it declares, has an expectation test above."""
    names = {name for name, _ in COVERED}
    assert set(REGISTRY) <= names, f"no expectation test for {sorted(set(REGISTRY) - names)}"
    for name, cls in REGISTRY.items():
        for variant in cls.variants:
            assert any(n == name and set(variant.items()) <= set(h) for n, h in COVERED), (name, variant)


# ----------------------------------------------------------------------------------------- negative controls
WRONG = {
    "sparsemixer vs first-order's expectation": ("sparsemixer", {"mask": "none"}, 1, RULES["first-order"]),
    "sparsemixer with gradient scale 1": ("sparsemixer", {}, 1, replace(RULES["sparsemixer"], scale=1.0)),
    "first-order with gradient scale 1": ("first-order", {"mask": "none"}, 1, replace(RULES["first-order"], scale=1.0)),
    "sparsemixer-v2 with coin 3/4": ("sparsemixer-v2", {"mask": "none"}, 1,
                                     replace(RULES["sparsemixer-v2"], steps=((0.75, 1.0), (0.25, 1 / 3)))),
    "sparsemixer-v2* with coin 3/8": ("sparsemixer-v2*", {"mask": "none"}, 1,
                                      replace(RULES["sparsemixer-v2*"], steps=((0.375, 1.0), (0.625, 1 / 3)))),
    "sparsemixer-v2* at temperature 1": ("sparsemixer-v2*", {"mask": "none"}, 1,
                                         replace(RULES["sparsemixer-v2*"], temperature=1.0)),
    "top-2 sparsemixer-v2 with coin 3/4": ("sparsemixer-v2", {"k": 2, "mask": "none"}, 2,
                                           replace(RULES["sparsemixer-v2"], steps=((0.75, 1.0), (0.25, 1 / 3)))),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(WRONG))
def test_comparison_rejects_a_wrong_expectation(case):
    """Negative control: the same z-test, on the same samples a passing test uses, rejects a plausible wrong
    formula (wrong estimator, gradient scale 1 instead of 2, swapped coin, wrong temperature) by a factor > 3."""
    name, hparams, k, wrong_rule = WRONG[case]
    problem = build("moe-regression", k)
    wrong = gate_rule_expectation(Model(problem), wrong_rule, k, *design_mask(hparams))
    ratio, worst = mismatch(samples_of(problem, name, **hparams), wrong)
    assert ratio > 3, worst


@pytest.mark.slow
def test_comparison_rejects_reinmax_as_st_and_gate_path_as_exact():
    """Negative control for the dense and unbiased tests: reinmax samples do not match st's expectation, and
    reinforce samples do not match the gate path alone (nabla_1, what switch-style training follows)."""
    model = Model(build("moe-classify"))
    ratio, worst = mismatch(samples_of(model.problem, "reinmax"), dense_expectation(model, "st"))
    assert ratio > 3, worst
    nabla_1, _ = exact_top1_terms(model)
    ratio, worst = mismatch(samples_of(model.problem, "reinforce"), nabla_1.sum(0).reshape(-1))
    assert ratio > 3, worst


# ============================================================================ unbiasedness via the metrics engine
@pytest.mark.parametrize("problem_name", list(PROBLEMS))
def test_exact_has_no_bias(problem_name):
    """bias_variance: `exact` against our enumeration has rel_bias < 1e-10 (float noise only)."""
    model = Model(build(problem_name))
    out = bias_variance(samples_of(model.problem, "exact", samples=3), exact_enumeration(model))
    assert out["rel_bias"] < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("problem_name", list(PROBLEMS))
@pytest.mark.parametrize("baseline", ["none", "zero", "mean"])
def test_reinforce_bias_interval_covers_zero(baseline, problem_name):
    """bias_variance: reinforce (every baseline) has rel_bias_lo == 0, its interval covering zero bias, and the
    interval is informative (rel_bias_hi small)."""
    model = Model(build(problem_name))
    out = bias_variance(samples_of(model.problem, "reinforce", baseline=baseline), exact_enumeration(model), z=Z_CI)
    assert out["rel_bias_lo"] == 0, out
    assert out["rel_bias_hi"] < REINFORCE_REL_BIAS_HI, out


@pytest.mark.parametrize("problem_name", GATED_PROBLEMS)
def test_switch_is_measurably_biased(problem_name):
    """bias_variance: switch follows the gate path only, so where nabla_0 is not zero its rel_bias_lo > 0."""
    model = Model(build(problem_name))
    nabla_1, nabla_0 = exact_top1_terms(model)
    exact = (nabla_1 + nabla_0).sum(0).reshape(-1)
    assert float(nabla_0.sum(0).norm()) > 0.1 * float(exact.norm())
    out = bias_variance(samples_of(model.problem, "switch", samples=5000), exact, z=Z_CI)
    assert out["rel_bias_lo"] > 0, out


@functools.lru_cache(maxsize=None)
def sparsemixer_on_quadratic(mask):
    """sparsemixer's samples (K, T, n) on moe-regression (quadratic f), the expert D (K, T) each drew, recovered
    by inverse CDF of its noise on our masked softmax, and the exact gradient's terms (docs/estimators.md §2)."""
    problem = build("moe-regression")
    model = Model(problem)
    estimator = get_estimator("sparsemixer", mask=mask)
    mask, r = design_mask({"mask": mask})
    noise = draw_noise(problem, estimator, K, SEED)
    samples = gradient_samples(problem, estimator, K, wrt="logits", noise=noise).reshape(K, model.T, model.n)
    p = masked_softmax(model.z, mask=mask, r=r)
    D = (p.cumsum(-1) <= noise[..., 0:1]).sum(-1).clamp_max(model.n - 1)
    # honest check of the recovered D: each token's gradient lies along grad p_D
    jac = gate_jacobian(p.expand(K, -1, -1), D)
    along = (samples * jac).sum(-1, keepdim=True) / (jac * jac).sum(-1, keepdim=True).clamp_min(1e-300)
    assert float((samples - along * jac).abs().max()) <= 1e-10 * float(samples.abs().max())
    return model, samples, D, exact_top1_terms(model, mask, r)


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["reference", "none"])
def test_sparsemixer_midpoint_branch_is_unbiased_on_quadratic_loss(mask):
    """On moe-regression (quadratic f) sparsemixer's mid-point branch is exact: its samples zeroed where the
    drawn expert is the arg-max have mean sum_{i != argmax} [p_i f'(a_i).e_i + (f(a_i) - f(0))] grad p_i / T
    (z-test and bias_variance's interval covering 0)."""
    model, samples, D, (nabla_1, nabla_0) = sparsemixer_on_quadratic(mask)
    off = D != model.z.argmax(-1)
    assert float(off.double().mean()) > 0.05  # the branch is exercised
    restricted = (samples * off[..., None]).reshape(K, -1)
    target = ((nabla_1 + nabla_0) * ~argmax_expert(model)[..., None]).sum(0).reshape(-1)
    assert_mean_matches(restricted, target)
    out = bias_variance(restricted, target, z=Z_CI)
    assert out["rel_bias_lo"] == 0, out


@pytest.mark.parametrize("mask", ["reference", "none"])
def test_sparsemixer_is_biased_only_through_the_argmax_term(mask):
    """On moe-regression the full sparsemixer is measurably biased (rel_bias_lo > 0) against the exact gradient,
    and unbiased against it once the arg-max expert's exact term is replaced by Euler's 2 p f'(a).e grad p."""
    model, samples, _, (nabla_1, nabla_0) = sparsemixer_on_quadratic(mask)
    samples = samples.reshape(K, -1)
    at_max = argmax_expert(model)[..., None]
    exact = (nabla_1 + nabla_0).sum(0).reshape(-1)
    out = bias_variance(samples, exact, z=Z_CI)
    assert out["rel_bias_lo"] > 0, out
    euler_at_max = (nabla_1 + nabla_0 + at_max * (nabla_1 - nabla_0)).sum(0).reshape(-1)
    out = bias_variance(samples, euler_at_max, z=Z_CI)
    assert out["rel_bias_lo"] == 0, out
    assert_mean_matches(samples, euler_at_max)
