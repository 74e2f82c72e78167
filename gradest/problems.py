"""Synthetic routing problems with exact objectives (docs/estimators.md §2–3).

Each problem is written functionally over a dict of parameters, so that parameters may carry leading sample
dimensions (`...`): the measurement engine replicates them K times and one backward pass gives K independent
per-sample gradients. Every problem has per-token losses f_t(y_t), and its objective is their mean over tokens:

    J(theta) = mean_t E_{D_t}[ f_t(y_t) ],   y_t = sum_j g_j(z_t) e_{t, D_j}    (gated)
                                             y_t = sum_j v_{D_j}                (categorical)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

from gradest.errors import GradestError
from gradest.estimators import CATEGORICAL, GATED, Estimator, Objective, Routing
from gradest.estimators.base import integer_at_least, positive_at_most, seed_value


@dataclass
class ProblemConfig:
    """Everything that defines a synthetic problem instance; the seed fixes data, teacher and initial student."""

    problem: str = "moe-regression"
    experts: int = 4  # n (for poly: categories per latent)
    tokens: int = 32  # T (for poly: the number m of latents)
    dim: int = 8  # input dimension of router and experts
    out_dim: int = 4  # expert output dimension
    classes: int = 4  # moe-classify: number of classes
    top_k: int = 1
    sharpness: float = 1.0  # scale of the student's router logits at initialisation
    power: float = 2.0  # poly: exponent p in |D - c|^p
    center: float = 0.45  # poly: target c
    seed: int = 0

    def __post_init__(self):
        if not seed_value(self.seed):
            raise GradestError(f"invalid seed {self.seed!r}; valid: {seed_value.text}")
        if self.problem not in PROBLEMS:
            raise GradestError(f"unknown problem '{self.problem}'; valid: {', '.join(PROBLEMS)}")
        for name in ("tokens", "dim", "out_dim", "classes", "top_k", "experts"):
            size = SIZES[name]
            if not size(getattr(self, name)):
                why = " (routing needs a choice)" if name == "experts" else ""
                raise GradestError(f"{name} must be {size.text}{why}, got {getattr(self, name)!r}")
        if self.top_k > self.experts:
            raise GradestError(f"top_k={self.top_k} is larger than experts={self.experts}; valid: 1 <= top_k <= "
                               f"{self.experts}")
        for name in ("sharpness", "power"):
            if not SCALES[name](getattr(self, name)):
                raise GradestError(f"{name} must be {SCALES[name].text}, got {getattr(self, name)!r}")
        if not math.isfinite(self.center):
            raise GradestError(f"center must be a finite number, got {self.center!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def settings(cls, config: dict) -> dict:
        """The problem settings of a flat configuration (a study cell's): every field but the seed."""
        return {f.name: config[f.name] for f in fields(cls) if f.name != "seed"}


# The declared range of each size of a problem (`gradest compare`'s options and a study cell's settings alike)
SIZES = {"tokens": integer_at_least(1), "dim": integer_at_least(1), "out_dim": integer_at_least(1),
         "classes": integer_at_least(1), "top_k": integer_at_least(1), "experts": integer_at_least(2)}
# logits scaled by 1e300 overflow float64 in the first softmax: a scale or exponent is kept far from that
SCALES = {"sharpness": positive_at_most(1e6), "power": positive_at_most(1e6)}

# Problem-specific defaults that differ from ProblemConfig's (for `gradest compare` and compare studies alike):
# ReinMax's polynomial programming is binary.
PROBLEM_DEFAULTS = {"poly": {"experts": 2}}


class Problem:
    """Base: data and initial parameters in float64, the router, the experts and the per-token loss."""

    kind = GATED
    router_param = "router"
    description = ""

    def __init__(self, config: ProblemConfig):
        self.config = config
        self.n, self.k, self.T = config.experts, config.top_k, config.tokens
        self.generator = torch.Generator().manual_seed(config.seed)
        self.params: dict[str, Tensor] = {}
        self.build()

    @property
    def device(self) -> torch.device:
        return self.params[self.router_param].device

    def to(self, device) -> "Problem":
        """Move data and parameters (float64 stays float64) to a device, e.g. "cuda"."""
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        self.params = {name: value.to(device) for name, value in self.params.items()}
        return self

    def randn(self, *shape, scale=1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=self.generator, dtype=torch.float64)

    def build(self) -> None:
        raise NotImplementedError

    # the model, functionally: `...` are sample dimensions that parameters may carry
    def logits(self, params) -> Tensor:  # (..., T, n)
        return torch.einsum("td,...nd->...tn", self.x, params["router"])

    def expert_outputs(self, params) -> Tensor:  # (..., T, n, d)
        return torch.einsum("td,...nod->...tno", self.x, params["experts"])

    def token_loss(self, params, y: Tensor) -> Tensor:  # y (..., T, B, d) -> f (..., T, B)
        raise NotImplementedError

    def loss(self, params, estimator: Estimator, *, noise: Tensor | None = None, training: bool = True):
        """The per-sample surrogate loss (...,): its value is the mean token loss of the routing drawn, and its
        gradient is the estimator's gradient of J. Also returns the logits (for gradients w.r.t. them)."""
        z = self.logits(params)
        e = self.expert_outputs(params)
        state = self.steady_state(estimator) if estimator.stateful else None
        routing = estimator.route(z, kind=self.kind, training=training, noise=noise, state=state)
        y = mix(e, routing)
        f = self.token_loss(params, y)
        f_zero = self.token_loss(params, torch.zeros_like(y[..., :1, :]))[..., 0] \
            if estimator.needs_zero_output else None
        return estimator.surrogate(f, routing, f_zero).mean(-1), z

    def steady_state(self, estimator: Estimator) -> dict[str, Tensor]:
        """A stateful estimator's state at the initial parameters, as training would leave it there: a synthetic
        problem is measured at fixed parameters, with no training run to produce one."""
        with torch.no_grad():
            return estimator.steady_state(self.expert_outputs(self.params), self.logits(self.params))

    def objective_value(self, params=None, objective: Objective | None = None) -> float:
        """J at `params` (default: the initial ones) for an objective (default: top-k of softmax(z), no mask)."""
        objective = objective or Objective(k=self.k)
        with torch.no_grad():
            return self.loss(params or self.params, objective.exact())[0].item()


def mix(expert_outputs: Tensor, routing: Routing) -> Tensor:
    """y (..., T, B, d) = sum_j gates_j e_{experts_j}: gather each branch's experts and weigh them."""
    offset = 0 if routing.offset is None else routing.offset
    if routing.experts is None:  # dense: every expert, in order
        return routing.gates @ expert_outputs + offset
    e = expert_outputs.unsqueeze(-3)  # (..., T, 1, n, d)
    index = routing.experts.unsqueeze(-1)  # (..., T, B, k, 1), or fewer leading dims (broadcast)
    ndim = max(e.dim(), index.dim())
    chosen = torch.take_along_dim(e.reshape((1,) * (ndim - e.dim()) + e.shape),
                                  index.reshape((1,) * (ndim - index.dim()) + index.shape), dim=-2)
    return (routing.gates.unsqueeze(-1) * chosen).sum(-2) + offset


class MoERegression(Problem):
    """A planted teacher MoE (sharp linear router, linear experts) labels the inputs; the student, a linear router
    with linear experts, is scored by the quadratic loss f_t(y) = 1/2 ||y - target_t||^2, on which SparseMixer's
    mid-point step is exact (docs/estimators.md §3 notes)."""

    description = "teacher-student MoE regression, quadratic loss"

    def build(self):
        c = self.config
        self.x = self.randn(c.tokens, c.dim)
        teacher_router = self.randn(c.experts, c.dim, scale=3 / math.sqrt(c.dim))
        teacher_experts = self.randn(c.experts, c.out_dim, c.dim, scale=1 / math.sqrt(c.dim))
        choice = (self.x @ teacher_router.T).argmax(-1)
        self.target = torch.einsum("tod,td->to", teacher_experts[choice], self.x)
        self.params = {"router": self.randn(c.experts, c.dim, scale=c.sharpness / math.sqrt(c.dim)),
                       "experts": self.randn(c.experts, c.out_dim, c.dim, scale=1 / math.sqrt(c.dim))}

    def token_loss(self, params, y):
        return 0.5 * (y - self.target.unsqueeze(-2)).pow(2).sum(-1)


class MoEClassify(Problem):
    """An MoE layer feeding a linear softmax classifier, cross-entropy against a teacher's labels: f is not
    quadratic, so every ODE step of the SparseMixer family has some bias here."""

    description = "MoE layer + softmax classifier, cross-entropy"

    def build(self):
        c = self.config
        self.x = self.randn(c.tokens, c.dim)
        teacher_router = self.randn(c.experts, c.dim, scale=3 / math.sqrt(c.dim))
        teacher_experts = self.randn(c.experts, c.classes, c.dim)
        choice = (self.x @ teacher_router.T).argmax(-1)
        self.labels = torch.einsum("tcd,td->tc", teacher_experts[choice], self.x).argmax(-1)
        self.params = {"router": self.randn(c.experts, c.dim, scale=c.sharpness / math.sqrt(c.dim)),
                       "experts": self.randn(c.experts, c.out_dim, c.dim, scale=1 / math.sqrt(c.dim)),
                       "classifier": self.randn(c.classes, c.out_dim, scale=1 / math.sqrt(c.out_dim))}

    def token_loss(self, params, y):
        log_p = torch.einsum("...tbd,...cd->...tbc", y, params["classifier"]).log_softmax(-1)
        labels = self.labels[:, None, None].expand(*log_p.shape[:-1], 1)
        return -log_p.gather(-1, labels).squeeze(-1)


class Polynomial(Problem):
    """ReinMax's polynomial programming (Liu et al. 2023, §6): m = `tokens` independent categorical latents
    with values v_i = i / (n - 1) (binary for n = 2), loss mean_t |D_t - c|^p. Ungated: the logits are the
    parameters."""

    kind = CATEGORICAL
    router_param = "logits"
    description = "ReinMax polynomial programming, ungated categorical"

    def build(self):
        c = self.config
        self.values = torch.linspace(0, 1, c.experts, dtype=torch.float64)[:, None]
        self.params = {"logits": self.randn(c.tokens, c.experts, scale=c.sharpness)}

    def logits(self, params):
        return params["logits"]

    def expert_outputs(self, params):
        return self.values.expand(self.T, self.n, 1)

    def token_loss(self, params, y):
        return (y - self.config.center).abs().pow(self.config.power).sum(-1)


PROBLEMS: dict[str, type[Problem]] = {"poly": Polynomial, "moe-regression": MoERegression,
                                      "moe-classify": MoEClassify}


def make_problem(config: ProblemConfig | None = None, **overrides) -> Problem:
    """The problem instance a config describes, e.g. `make_problem(problem="poly", tokens=16)`."""
    config = ProblemConfig(**{**(config.to_dict() if config else {}), **overrides})
    return PROBLEMS[config.problem](config)
