"""The contract every routing-gradient estimator honours, and the sampling rules they share (DESIGN.md §2–3).

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


positive = Constraint(lambda v: _is_real(v) and v > 0, "a number > 0")
nonnegative = Constraint(lambda v: _is_real(v) and v >= 0, "a number >= 0")
unit_interval = Constraint(lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)")
positive_integer = Constraint(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
boolean = Constraint(lambda v: isinstance(v, bool), "true or false")


def one_of(*choices: str) -> Constraint:
    return Constraint(lambda v: v in choices, "one of " + ", ".join(choices))


@dataclass(frozen=True)
class Param:
    """A hyper-parameter: its default, the constraint a value must meet, and what it means."""

    default: Any
    constraint: Constraint
    doc: str

    def parse(self, text: str):
        """Read a value typed on the command line, with the default's type."""
        return parse_as(text, self.default)


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


def sparsity_mask(z: Tensor, z_star: Tensor, kind: str, r: float) -> Tensor | None:
    """Experts kept by SparseMixer's sparsity mask (DESIGN §2), relative to the largest logit still available;
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
                     u: Tensor | None = None, experts: Tensor | None = None):
    """GRIN's sequential top-k (Liu et al. 2024, Alg. 3) over a (masked) softmax of `logits / temperature`.

    Stage j picks D_j from p^(j), the softmax over the logits not yet chosen (masked relative to the largest of
    them). D_j is drawn by inverse CDF from uniforms `u[..., j]`, taken from `experts[..., j]` when given (to
    enumerate), or is the arg-max when neither is given (inference). Returns the experts (..., k), their gates
    p^(j)_{D_j} (..., k) with autograd through the softmax, and whether each was the arg-max of its stage.
    """
    z = logits / temperature if temperature != 1 else logits
    removed = None  # experts already chosen (the first stage skips this bookkeeping: it is the hot path)
    chosen, gates, was_max = [], [], []
    for j in range(k):
        z_j = z if removed is None else z.masked_fill(removed, -math.inf)
        z_star, top = z_j.detach().max(-1, keepdim=True)
        keep = sparsity_mask(z.detach(), z_star, mask, r)
        if removed is not None:
            keep = ~removed if keep is None else keep & ~removed
        p = softmax(z_j if keep is None else z_j.masked_fill(~keep, -math.inf))
        if experts is not None:
            d = experts[..., j:j + 1]
        elif u is not None:
            d = inverse_cdf(p.detach(), u[..., j:j + 1])
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


# ---------------------------------------------------------------------------------------------------- estimator
REGISTRY: dict[str, type["Estimator"]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


class Estimator:
    """Base contract. Subclasses declare what they are and implement `noise_dim` and `sample`.

    Class attributes:
      name, family, reference   registry name, the row of DESIGN §3 it implements, the paper it comes from;
      sparse                    whether it needs only the chosen experts' outputs;
      applies_to                problem kinds it is defined for (GATED, CATEGORICAL);
      supports_topk             whether k >= 2 is allowed;
      params                    hyper-parameters with defaults and constraints (validated generically);
      variants                  hyper-parameter settings that `--estimators all` measures as separate rows;
      omega                     whether an MoE layer holding it scales its output by a learnable omega by default
                                (DESIGN §3: omega is the layer's option, usable with any estimator).
    """

    name: ClassVar[str]
    family: ClassVar[str]
    reference: ClassVar[str]
    sparse: ClassVar[bool] = True
    applies_to: ClassVar[frozenset] = frozenset({GATED})
    supports_topk: ClassVar[bool] = False
    params: ClassVar[dict[str, Param]] = {}
    variants: ClassVar[tuple[dict, ...]] = ({},)
    omega: ClassVar[bool] = False

    def __init__(self, **hparams):
        for key in hparams:
            if key not in self.params:
                valid = ", ".join(self.params) or "none"
                raise GradestError(f"unknown hyper-parameter '{key}' for estimator '{self.name}'; valid: {valid}")
        self.hparams = {key: hparams.get(key, param.default) for key, param in self.params.items()}
        for key, value in self.hparams.items():
            if not self.params[key].constraint(value):
                raise GradestError(f"invalid {key}={value!r} for estimator '{self.name}': must be "
                                   f"{self.params[key].constraint.text}")

    def __getattr__(self, key):
        hparams = self.__dict__.get("hparams", {})
        if key in hparams:
            return hparams[key]
        raise AttributeError(key)

    def __repr__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        """The name plus every hyper-parameter that differs from its default, e.g. `reinforce(baseline=mean)`."""
        changed = [f"{k}={v}" for k, v in self.hparams.items() if v != self.params[k].default and k != "k"]
        return self.name + (f"({', '.join(changed)})" if changed else "")

    # ------------------------------------------------------------------------------------------ what it targets
    @property
    def k(self) -> int:
        return self.hparams.get("k", 1)

    def objective(self) -> dict:
        """The objective its sampling is unbiased for in the forward: E over sequential top-k from a masked
        softmax of z / temperature (DESIGN §3: a bias figure is measured against this, or a declared target)."""
        return {"k": self.k, "mask": "none", "r": 0.0, "temperature": 1.0}

    needs_zero_output = False  # whether `surrogate` needs f(0), the loss with the layer's output zeroed

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
        """How many U[0, 1) numbers one token's routing consumes in training."""
        raise NotImplementedError

    def route(self, logits: Tensor, *, kind: str = GATED, training: bool = True,
              noise: Tensor | None = None) -> Routing:
        """Route tokens with logits (..., n). `noise` (..., noise_dim) fixes the randomness; drawn if None."""
        self.check(logits.shape[-1], kind)
        # On an accelerator this check would stall every layer of every step on a host sync; there the trainer's
        # check of the loss catches a NaN instead.
        if logits.device.type == "cpu" and not torch.isfinite(logits).all():
            raise GradestError("router logits contain NaN or inf; valid: finite numbers")
        if not training:
            return self.infer(logits, kind)
        m = self.noise_dim(logits.shape[-1])
        if noise is None:
            noise = torch.rand(*logits.shape[:-1], m, dtype=logits.dtype, device=logits.device)
        elif noise.shape != (*logits.shape[:-1], m):
            raise GradestError(f"noise for '{self.name}' must have shape {(*logits.shape[:-1], m)}, "
                               f"got {tuple(noise.shape)}")
        return self.sample(logits, noise, kind)

    def sample(self, logits: Tensor, noise: Tensor, kind: str) -> Routing:
        raise NotImplementedError

    def infer(self, logits: Tensor, kind: str) -> Routing:
        """Inference: the arg-max expert(s), gates from the same (masked) softmax; no jitter, no coin flips."""
        obj = self.objective()
        experts, gates, _ = sequential_route(logits, self.k, mask=obj["mask"], r=obj["r"],
                                             temperature=obj["temperature"])
        if kind == CATEGORICAL:
            gates = torch.ones_like(gates)
        return Routing(experts.unsqueeze(-2), gates.unsqueeze(-2))

    def surrogate(self, f: Tensor, routing: Routing, f_zero: Tensor | None = None) -> Tensor:
        """The loss to back-propagate, given the downstream loss f (..., B) of each branch; its value is f.

        Sampling estimators have one branch; `exact` weighs its branches by their probability.
        """
        if routing.branch_prob is not None:
            return (routing.branch_prob * f).sum(-1)
        return self.with_score(f.squeeze(-1), routing.log_prob, f_zero)

    def with_score(self, f: Tensor, log_prob: Tensor | None, f_zero: Tensor | None = None) -> Tensor:
        """The loss of items (sequences, tokens) whose sampled experts have total log-probability `log_prob`:
        value f; a score-function estimator adds its term to the gradient. f itself for every other estimator.
        A trainer whose loss is per sequence calls this with log P summed over each sequence's tokens."""
        return f
