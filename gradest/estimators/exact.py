"""The exact gradient as a routing rule (docs/estimators.md §2 and row `exact`): every expert tuple is a branch."""

from __future__ import annotations

import itertools

import torch

from gradest.estimators.base import (CATEGORICAL, GATED, MASKS, Estimator, Objective, Routing, hparam, nonnegative,
                                     one_of, positive_integer, register,
                                     temperature_value)


@register
class Exact(Estimator):
    """The objective J = E_D[f(sum_j p^(j)_{D_j} e_{D_j})] itself, enumerated: every ordered k-tuple of experts
    (n(n-1)... terms) is a branch weighted by its probability, so autograd gives grad J exactly, nabla_0 included.
    Costs n expert evaluations and one downstream evaluation per branch. Its hyper-parameters choose the objective
    (k, sparsity mask, temperature) so that each estimator can be measured against the objective it samples from.
    """

    name = "exact"
    family = "exact"
    reference = "docs/estimators.md §2: the exact dense-routing gradient, by enumeration"
    dense = True
    enumerates = True
    applies_to = frozenset({GATED, CATEGORICAL})
    supports_topk = True
    k: int = hparam(1, positive_integer, "experts per token")
    mask: str = hparam("none", one_of(*MASKS), "sparsity mask of the objective's softmax")
    jitter_eps: float = hparam(0.1, nonnegative, "mask width r (used when mask is not none)")
    temperature: float = hparam(1.0, temperature_value, "softmax temperature of the objective's sampling")

    @classmethod
    def of(cls, objective: Objective) -> "Exact":
        """The exact estimator of an objective (its own mask width only when it has a mask)."""
        r = objective.r if objective.mask != "none" else cls.params["jitter_eps"].default
        return cls(k=objective.k, mask=objective.mask, jitter_eps=r, temperature=objective.temperature)

    def objective(self):
        return Objective(self.k, self.mask, self.jitter_eps, self.temperature)

    def noise_dim(self, n):
        return 0

    def sample(self, logits, noise, kind):
        n = logits.shape[-1]
        # the same tuples for every token: (B, k), broadcast against the gates (..., B, k)
        experts = torch.tensor(list(itertools.permutations(range(n), self.k)), device=logits.device)
        # logits (..., 1, n) broadcast against the branches: stage 1's softmax is computed once, not per branch
        _, gates, _ = self.objective().route(logits.unsqueeze(-2),
                                             experts=experts.expand(*logits.shape[:-1], *experts.shape))
        branch_prob = gates.prod(-1)
        if kind == CATEGORICAL:
            gates = torch.ones_like(gates)
        return Routing(experts, gates, branch_prob=branch_prob)

