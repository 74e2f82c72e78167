"""The contract every routing-gradient estimator honours, and the sampling rules they share (docs/estimators.md §2–3).

An estimator is a routing rule. Given router logits `z` of shape (..., n) it returns a `Routing`: which experts each
token uses, and the gate weights that multiply those experts' outputs. The gates carry the estimator's backward, so
a layer that computes `y = sum_j gates_j * E_{experts_j}(x)` and back-propagates gets the estimator's gradient
without knowing which estimator it holds. Score-function estimators add a term to the loss through `surrogate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradest.errors import GradestError

GATED = "gated"  # an MoE layer: y = sum_j p_{D_j} e_{D_j}
CATEGORICAL = "categorical"  # an ungated latent: y = sum_j v_{D_j}, fixed values v, no gate
MASKS = ("reference", "paper", "none")


# --------------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Constraint:
    """A predicate on a hyper-parameter value, with the words that describe it in error messages."""

    check: Any
    text: str

    def __call__(self, value) -> bool:
        return bool(self.check(value))


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The largest integer any count, size or seed may be: torch's and numpy's int64, and a study cell's JSON. A larger
# one is refused by the setting's constraint (one line), not by an OverflowError deep in torch.
MAX_INT = 2 ** 63 - 1
# A learning rate beyond this never trains (a test drives 1e6 to divergence on purpose); float32 takes up to 3.4e38,
# so a larger value would overflow in the optimiser before any step could show the divergence.
MAX_LR = 1e6


def _is_integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


positive = Constraint(lambda v: _is_real(v) and v > 0, "a number > 0")
nonnegative = Constraint(lambda v: _is_real(v) and v >= 0, "a number >= 0")
unit_interval = Constraint(lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)")


def positive_at_most(high: float) -> Constraint:
    """A number > 0 that must stay far from float overflow (a scale, a rate)."""
    return Constraint(lambda v: _is_real(v) and 0 < v <= high, f"a number > 0 and <= {high:g}")


learning_rate = positive_at_most(MAX_LR)
# a softmax temperature: logits divided by 1e-300 are inf, and the step after is NaN, whatever the learning rate
temperature_value = Constraint(lambda v: _is_real(v) and 1e-6 <= v <= 1e6, "a number > 0, from 1e-06 to 1e+06")
# a loss's weight (load balance, z-loss): beyond 1e6 it is all the loss there is, and 1e308 overflows it
coefficient = Constraint(lambda v: _is_real(v) and 0 <= v <= 1e6, "a number >= 0 and <= 1e+06")
boolean = Constraint(lambda v: isinstance(v, bool), "true or false")


def one_of(*choices: str) -> Constraint:
    return Constraint(lambda v: v in choices, "one of " + ", ".join(choices))


def integer_at_least(low: int) -> Constraint:
    """A count or a size: an integer >= `low` (and, like every integer, at most MAX_INT)."""
    return Constraint(lambda v: _is_integer(v) and low <= v <= MAX_INT, f"an integer >= {low} (below 2**63)")


def integer_between(low: int, high: int) -> Constraint:
    return Constraint(lambda v: _is_integer(v) and low <= v <= high, f"an integer from {low:,} to {high:,}")


positive_integer = integer_at_least(1)
# Every command's seed (torch.Generator.manual_seed takes up to 2**64 - 1; numpy's and a cell's JSON, 2**63 - 1)
seed_value = integer_between(0, MAX_INT)


# A run keeps a row of metrics per step in memory: more steps than this is a typo, not a plan (10 million
# Switch steps take weeks on a GPU).
MAX_STEPS = 10_000_000


def optional(constraint: Constraint, meaning: str) -> Constraint:
    """`constraint`, or None (which means `meaning`)."""
    return Constraint(lambda v: v is None or constraint(v), f"{constraint.text}, or none ({meaning})")


def check_settings(where: str, values: dict, constraints: dict[str, Constraint]) -> None:
    """One line naming the first setting of `values` that breaks its constraint, and what is valid."""
    for key, constraint in constraints.items():
        if not constraint(values[key]):
            raise GradestError(f"invalid {where} setting {key}={values[key]!r}; valid: {constraint.text}")


@dataclass(frozen=True)
class Param:
    """A hyper-parameter: its default, the constraint a value must meet, and what it means."""

    default: Any
    constraint: Constraint
    doc: str

    def parse(self, text: str):
        """Read a value typed on the command line, with the default's type."""
        return parse_as(text, self.default)


def hparam(default, constraint: Constraint, doc: str) -> Any:
    """Declare a hyper-parameter as a typed class attribute, as `dataclasses.field` does:

        class Switch(Estimator):
            jitter_eps: float = hparam(0.01, unit_interval, "multiplicative logit jitter")

    The class keeps the `Param` (in `params`, validated generically); an instance holds the plain value."""
    return Param(default, constraint, doc)


def parse_as(text: str, default):
    """A command-line value read as the type of `default` (any number, or a boolean, when the default is None);
    text that does not parse is returned as it is, for the constraint check to name."""
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if isinstance(default, bool):
        return words.get(text.lower(), text)
    if isinstance(default, (int, float)) or default is None:
        try:
            value = float(text)
        except ValueError:
            return words.get(text.lower(), text) if default is None else text
        if isinstance(default, float) or not value.is_integer():
            return value
        return int(value)
    return text


# ------------------------------------------------------------------------------------------------------ routing
class NonFiniteLogits(GradestError):
    """Router logits with NaN or inf: bad input, or a model that diverged (the trainer reports it so)."""


@dataclass
class Routing:
    """What a routing rule decided for a batch of tokens.

    Each token has B branches (B = 1 for every sampling estimator; `exact` enumerates all expert tuples) and each
    branch k experts. A dense estimator uses every expert: `experts` is None and `gates` has one weight per expert.
    """

    experts: Tensor | None  # (..., B, k) long, broadcastable to gates: each branch's experts in the order chosen;
    #                         None: all n experts (dense)
    gates: Tensor  # (..., B, k) or (..., B, n): the weight on each expert's output; carries the backward
    branch_prob: Tensor | None = None  # (..., B): probability of each branch, with gradient (exact only)
    log_prob: Tensor | None = None  # (...): log-probability of the sampled experts (score-function estimators)
    offset: Tensor | None = None  # (..., B, d): added to the mixed output (a stateful estimator's default outputs)
    # (..., B, n), with gradient: the distribution the experts were chosen from, where it is not the objective's
    # first stage (Switch's softmax of its jittered logits); None: the objective's (`Objective.probabilities`)
    probs: Tensor | None = None


def sparsity_mask(z: Tensor, z_star: Tensor, kind: str, r: float) -> Tensor | None:
    """Experts kept by SparseMixer's sparsity mask (estimators.md §2), relative to the largest logit still available;
    None when nothing is masked.

    reference (SparseMixer code, PhiMoE): masked when z* - z_i > 2r max(|z_i|, z*);
    paper (GRIN Eq. 2): kept when z* - z_i <= r (|z_i| + |z*|).
    """
    if kind == "none":
        return None
    gap = z_star - z
    if kind == "reference":
        return gap <= 2 * r * torch.maximum(z.abs(), z_star)
    return gap <= r * (z.abs() + z_star.abs())


def softmax(z: Tensor) -> Tensor:
    """softmax over the last dimension. torch's CPU kernel is slow on rows as short as a router's (about 10 ns an
    element at n = 8); this computes the same values and gradient 3-5x faster. Rows may hold -inf (masked)."""
    e = (z - z.detach().amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def inverse_cdf(p: Tensor, u: Tensor) -> Tensor:
    """Index i with cdf_{i-1} <= u < cdf_i, so P(i) = p_i exactly; zero-probability entries are never drawn."""
    cdf = p.cumsum(-1)
    cdf = (cdf / cdf[..., -1:]).contiguous()
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp_max(p.shape[-1] - 1)


def sequential_route(logits: Tensor, k: int, *, mask: str = "none", r: float = 0.0, temperature: float = 1.0,
                     u: Tensor | None = None, experts: Tensor | None = None, bias: Tensor | None = None):
    """GRIN's sequential top-k (Liu et al. 2024, Alg. 3) over a (masked) softmax of `logits / temperature`.

    Stage j picks D_j from p^(j), the softmax over the logits not yet chosen (masked relative to the largest of
    them). D_j is drawn by inverse CDF from uniforms `u[..., j]`, taken from `experts[..., j]` when given (to
    enumerate), or is the arg-max when neither is given (inference). Returns the experts (..., k), their gates
    p^(j)_{D_j} (..., k) with autograd through the softmax, and whether each was the arg-max of its stage.

    `bias` (n,), a selection bias (auxiliary-loss-free balancing, `Estimator.selection_bias`): each stage draws
    (and masks, and takes its arg-max) from the softmax of (z + b) / temperature instead, while the gates stay
    p^(j)_{D_j} of the unbiased logits over the same kept experts.
    """
    z = logits / temperature if temperature != 1 else logits
    chooser = z if bias is None else z + (bias / temperature if temperature != 1 else bias).to(z.dtype)
    removed = None  # experts already chosen (the first stage skips this bookkeeping: it is the hot path)
    chosen, gates, was_max = [], [], []
    for j in range(k):
        z_j = z if removed is None else z.masked_fill(removed, -math.inf)
        c_j = z_j if bias is None else chooser if removed is None else chooser.masked_fill(removed, -math.inf)
        z_star, top = c_j.detach().max(-1, keepdim=True)
        keep = sparsity_mask(chooser.detach(), z_star, mask, r)
        if removed is not None:
            keep = ~removed if keep is None else keep & ~removed
        p = softmax(z_j if keep is None else z_j.masked_fill(~keep, -math.inf))
        drawn_from = p if bias is None else softmax(c_j if keep is None else c_j.masked_fill(~keep, -math.inf))
        if experts is not None:
            d = experts[..., j:j + 1]
        elif u is not None:
            d = inverse_cdf(drawn_from.detach(), u[..., j:j + 1])
        else:
            d = top
        chosen.append(d)
        gates.append(torch.take_along_dim(p, d, -1))  # broadcasts: enumerated branches share stage 1's p
        was_max.append(d == top)
        if j + 1 < k:
            if removed is None:
                removed = torch.zeros(torch.broadcast_shapes(z.shape[:-1], d.shape[:-1]) + z.shape[-1:],
                                      dtype=torch.bool, device=z.device)
            removed = removed.scatter(-1, d, True)
    return torch.cat(chosen, -1), torch.cat(gates, -1), torch.cat(was_max, -1)


def value_with_gradient(p: Tensor, value_scale, grad_scale: float) -> Tensor:
    """A tensor whose forward value is `value_scale * p` and whose gradient is `grad_scale` times p's."""
    return grad_scale * p - ((grad_scale - value_scale) * p).detach()


# ---------------------------------------------------------------------------------------------------- objective
@dataclass(frozen=True)
class Objective:
    """The expected loss a routing rule's forward samples from (docs/estimators.md §2):

        J = E[ f(sum_j p^(j)_{D_j} e_{D_j}) ],   D by sequential top-k from the (masked) softmax of z / temperature.

    Every estimator is measured against one (`Estimator.objective()`); its exact gradient is that of the `exact`
    estimator routing it (`Objective.exact()`). `r` is the sparsity-mask width, 0 when `mask` is none."""

    k: int = 1
    mask: str = "none"
    r: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        if self.mask not in MASKS:
            raise GradestError(f"unknown mask '{self.mask}'; valid: {', '.join(MASKS)}")
        if self.mask == "none":  # the width of no mask is no setting: one objective, one label
            object.__setattr__(self, "r", 0.0)

    @property
    def label(self) -> str:
        """e.g. `exact(k=1)`, `exact(k=2, temperature=2, mask=reference r=0.1)`: the `target` column of reports."""
        parts = [f"k={self.k}"]
        if self.temperature != 1:
            parts.append(f"temperature={self.temperature:g}")
        if self.mask != "none":
            parts.append(f"mask={self.mask} r={self.r:g}")
        return f"exact({', '.join(parts)})"

    def route(self, logits: Tensor, *, u: Tensor | None = None, experts: Tensor | None = None,
              bias: Tensor | None = None):
        """`sequential_route` under this objective: drawn from uniforms `u`, forced to `experts`, or the arg-max;
        chosen from z + `bias` when given (a selection bias)."""
        return sequential_route(logits, self.k, mask=self.mask, r=self.r, temperature=self.temperature, u=u,
                                experts=experts, bias=bias)

    def probabilities(self, logits: Tensor) -> Tensor:
        """The distribution of the first expert (..., n): the masked softmax of z / temperature."""
        z = logits / self.temperature if self.temperature != 1 else logits
        keep = sparsity_mask(z.detach(), z.detach().amax(-1, keepdim=True), self.mask, self.r)
        return softmax(z if keep is None else z.masked_fill(~keep, -math.inf))

    def exact(self) -> "Estimator":
        """The estimator whose routing is this objective itself, enumerated: its gradient is grad J exactly."""
        return REGISTRY["exact"].of(self)  # the one estimator every objective has (estimators/exact.py)


# ---------------------------------------------------------------------------------------------------- estimator
REGISTRY: dict[str, type["Estimator"]] = {}


def register(cls):
    """Class decorator: add an estimator to the registry under `cls.name`. A second class with a taken name is
    refused (re-importing the same module is not a second class)."""
    old = REGISTRY.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise GradestError(f"an estimator named '{cls.name}' is already registered ({old.__module__}."
                           f"{old.__qualname__}); choose another name")
    REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove an estimator from the registry (for throwaway estimators, e.g. in tests)."""
    REGISTRY.pop(name, None)


class Estimator:
    """The contract every estimator honours (the model: `torch.distributions.Distribution`).

    A subclass declares what it is in class attributes and implements `noise_dim` and `sample`; it may override
    `objective`, `infer`, `with_score`, `init_state` and `update_state`, each documented below. Everything else
    (validation, the registry, `route`, the CLI, `compare`, the MoE layer, studies) works from these.

    Identity:
      name, family, reference   registry name, the row of docs/estimators.md §3 it implements, its paper.
    Hyper-parameters: typed class attributes declared with `hparam(default, constraint, doc)`; collected in
      `params` (name -> Param, `k` first) and validated by one generic check; an instance holds plain values.
    Capabilities (callers test these, never the name):
      dense             needs every expert's output on every token (`Routing.experts` is None); else sparse;
      enumerates        routes every expert tuple as a weighted branch (`Routing.branch_prob`): no MoE layer;
      score_function    adds a score-function term through `with_score` (needs `Routing.log_prob`);
      needs_zero_output `with_score` needs f(0), the loss with the layer's output zeroed (one extra pass);
      min_batch         the fewest items `with_score`'s f may have (reinforce's leave-one-out mean needs 2);
      stateful          keeps state between steps in buffers the layer owns (`init_state`, `update_state`);
      applies_to        problem kinds it is defined for (GATED, CATEGORICAL);
      supports_topk     whether k >= 2 is allowed (then it declares the hyper-parameter `k`);
      selection_bias    routes with a selection bias b (n,) (auxiliary-loss-free balancing, DeepSeek-V3): its
                        `sample` and `infer` take `bias=` and choose the experts from z + b (a sampling estimator
                        draws from the distribution of z + b), while the gates, and so the backward, stay those
                        of the unbiased z at the chosen experts. Its objective is then: D drawn by the rule from
                        z + b, y = sum_j g_j(z) e_{D_j}.
    Defaults for users:
      variants          hyper-parameter settings that `--estimators all` measures as separate rows;
      omega             whether an MoE layer holding it scales its output by a learnable omega by default.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    reference: ClassVar[str]
    dense: ClassVar[bool] = False
    enumerates: ClassVar[bool] = False
    score_function: ClassVar[bool] = False
    needs_zero_output: bool = False  # may be a property of the hyper-parameters (reinforce's baseline)
    min_batch: int = 1  # may be a property of the hyper-parameters (reinforce's baseline)
    stateful: ClassVar[bool] = False
    applies_to: ClassVar[frozenset] = frozenset({GATED})
    supports_topk: ClassVar[bool] = False
    selection_bias: ClassVar[bool] = False
    params: ClassVar[dict[str, Param]] = {}
    variants: ClassVar[tuple[dict, ...]] = ({},)
    omega: ClassVar[bool] = False
    k: int = 1  # experts per token; a top-k estimator declares it as a hyper-parameter

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        params = {}
        for klass in reversed(cls.__mro__):
            params.update({key: value for key, value in vars(klass).items() if isinstance(value, Param)})
        cls.params = dict(sorted(params.items(), key=lambda item: item[0] != "k"))  # k first: the shape

    def __init__(self, **hparams):
        for key in hparams:
            if key not in self.params:
                valid = ", ".join(self.params) or "none"
                raise GradestError(f"unknown hyper-parameter '{key}' for estimator '{self.name}'; valid: {valid}")
        for key, param in self.params.items():
            value = hparams.get(key, param.default)
            if not param.constraint(value):
                raise GradestError(f"invalid {key}={value!r} for estimator '{self.name}': must be "
                                   f"{param.constraint.text}")
            setattr(self, key, value)

    @property
    def sparse(self) -> bool:
        return not self.dense

    @property
    def hparams(self) -> dict:
        """Every hyper-parameter's value, in declaration order (`k` first)."""
        return {key: getattr(self, key) for key in self.params}

    def __repr__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        """The name plus every hyper-parameter that differs from its default, e.g. `reinforce(baseline=mean)`."""
        changed = [f"{k}={v}" for k, v in self.hparams.items() if v != self.params[k].default and k != "k"]
        return self.name + (f"({', '.join(changed)})" if changed else "")

    # ------------------------------------------------------------------------------------------ what it targets
    def objective(self) -> Objective:
        """The objective its forward samples from; its bias is measured against this objective's exact gradient.
        Default: sequential top-k of softmax(z), no mask, temperature 1 (docs/estimators.md §3)."""
        return Objective(k=self.k)

    # ------------------------------------------------------------------------------------------------ routing
    def check(self, n: int, kind: str = GATED) -> None:
        """Raise a GradestError if this estimator cannot route n experts on a problem of this kind."""
        if kind not in self.applies_to:
            names = ", ".join(sorted(name for name, cls in REGISTRY.items() if kind in cls.applies_to))
            raise GradestError(f"estimator '{self.name}' does not apply to a {kind} problem; use one of: {names}")
        if n < 2:
            raise GradestError(f"routing needs at least 2 experts, got n={n}")
        if self.k > n:
            raise GradestError(f"k={self.k} is larger than the number of experts n={n}; valid: 1 <= k <= {n}")

    def noise_dim(self, n: int) -> int:
        """Override: how many U[0, 1) numbers one token's routing consumes in training, for n experts. 0 means
        the estimator is deterministic given the logits (the measurement engine then computes one sample)."""
        raise NotImplementedError

    def route(self, logits: Tensor, *, kind: str = GATED, training: bool = True, noise: Tensor | None = None,
              state: dict[str, Tensor] | None = None, bias: Tensor | None = None) -> Routing:
        """Route tokens with logits (..., n). `noise` (..., noise_dim) fixes the randomness; drawn if None.
        `state`: a stateful estimator's buffers (from `init_state`, owned by the layer); None for the others.
        `bias` (n,): a selection bias (see `selection_bias`), without gradient; None for none."""
        self.check(logits.shape[-1], kind)
        if bias is not None:
            if not self.selection_bias:
                names = ", ".join(name for name, cls in REGISTRY.items() if cls.selection_bias)
                raise GradestError(f"estimator '{self.name}' cannot route with a selection bias (auxiliary-loss-"
                                   f"free balancing); valid: {names}")
            if bias.shape != logits.shape[-1:]:
                raise GradestError(f"a selection bias must have shape ({logits.shape[-1]},), one per expert; got "
                                   f"{tuple(bias.shape)}")
        biased = {} if bias is None else {"bias": bias.detach()}
        # On an accelerator this check would stall every layer of every step on a host sync; there the trainer's
        # check of the loss catches a NaN instead.
        if logits.device.type == "cpu" and not torch.isfinite(logits).all():
            raise NonFiniteLogits("router logits contain NaN or inf; valid: finite numbers")
        if self.stateful and state is None:
            raise GradestError(f"estimator '{self.name}' keeps state: route it with the buffers of init_state "
                               f"(an MoE layer owns them)")
        if not training:
            routing = self.infer(logits, kind, **biased)
        else:
            m = self.noise_dim(logits.shape[-1])
            if noise is None:
                noise = torch.rand(*logits.shape[:-1], m, dtype=logits.dtype, device=logits.device)
            elif noise.shape != (*logits.shape[:-1], m):
                raise GradestError(f"noise for '{self.name}' must have shape {(*logits.shape[:-1], m)}, "
                                   f"got {tuple(noise.shape)}")
            routing = self.sample(logits, noise, kind, **biased)
        return self.with_state(routing, logits, state, training) if self.stateful else routing

    def sample(self, logits: Tensor, noise: Tensor, kind: str) -> Routing:
        """Override: training routing of logits (..., n) with uniforms `noise` (..., noise_dim(n)).

        Return a `Routing` with ONE branch (B = 1): `experts` (..., 1, k) and `gates` (..., 1, k), or, for a dense
        estimator, `experts` None and `gates` (..., 1, n). The forward value of the gates is the weight each
        expert's output gets; their gradient is the estimator's backward. In a CATEGORICAL problem there is no
        gate: the forward value of the weights must be onehot (1 on each chosen expert). A score-function
        estimator also sets `log_prob` (...,), with gradient."""
        raise NotImplementedError

    def infer(self, logits: Tensor, kind: str, bias: Tensor | None = None) -> Routing:
        """Override only to change inference routing. Default: the arg-max expert(s) of the objective's (masked,
        tempered) softmax, gates from that softmax; no jitter, no coin flips; one branch. `bias` reaches it only
        for an estimator with `selection_bias`: the arg-max of z + b, gates of z."""
        experts, gates, _ = self.objective().route(logits, bias=bias)
        if kind == CATEGORICAL:
            gates = torch.ones_like(gates)
        return Routing(experts.unsqueeze(-2), gates.unsqueeze(-2))

    def surrogate(self, f: Tensor, routing: Routing, f_zero: Tensor | None = None) -> Tensor:
        """The loss to back-propagate, given the downstream loss f (..., B) of each branch; its value is f.

        Sampling estimators have one branch; an enumerating one weighs its branches by their probability.
        """
        if routing.branch_prob is not None:
            return (routing.branch_prob * f).sum(-1)
        return self.with_score(f.squeeze(-1), routing.log_prob, f_zero)

    def with_score(self, f: Tensor, log_prob: Tensor | None, f_zero: Tensor | None = None) -> Tensor:
        """Override (score-function estimators): the loss of items (sequences, tokens) whose sampled experts have
        total log-probability `log_prob`: its value must be f; its gradient adds the score-function term. Returns f
        itself for every other estimator. A trainer whose loss is per sequence calls this with log P summed over
        each sequence's tokens; `f_zero` is f with the layer's output zeroed (when `needs_zero_output`)."""
        return f

    # -------------------------------------------------------------------------------------------------- state
    def init_state(self, n: int, d: int, *, dtype=torch.float32, device=None) -> dict[str, Tensor]:
        """Override (stateful estimators): the buffers one layer with n experts of output width d keeps for this
        estimator. The layer registers them (so they move with it and are saved in its checkpoints)."""
        return {}

    def with_state(self, routing: Routing, logits: Tensor, state: dict[str, Tensor], training: bool) -> Routing:
        """Override (stateful estimators): the routing completed from the state, e.g. an `offset` (..., B, d) that
        the layer adds to its output."""
        return routing

    def steady_state(self, expert_outputs: Tensor, logits: Tensor) -> dict[str, Tensor]:
        """Override (stateful estimators): the state that training would converge to with the parameters held
        fixed, from every expert's outputs (T, n, d) and the logits (T, n) of T tokens; used where no training run
        produced one (synthetic problems)."""
        raise NotImplementedError

    @torch.no_grad()
    def update_state(self, state: dict[str, Tensor], experts: Tensor, outputs: Tensor) -> None:
        """Override (stateful estimators): update `state` in place after a training forward pass, from the
        (token, choice) pairs' experts (P,) and those experts' outputs (P, d), without gradient. The layer calls it
        only in training."""
