"""The exact gradient as a routing rule (DESIGN §2 and row `exact`): every expert tuple is a branch."""

from __future__ import annotations

import itertools

import torch

from gradest.estimators.base import (CATEGORICAL, GATED, MASKS, Estimator, Param, Routing, nonnegative, one_of,
                                     positive, positive_integer, register, sequential_route)


@register
class Exact(Estimator):
    """The objective J = E_D[f(sum_j p^(j)_{D_j} e_{D_j})] itself, enumerated: every ordered k-tuple of experts
    (n(n-1)... terms) is a branch weighted by its probability, so autograd gives grad J exactly, nabla_0 included.
    Costs n expert evaluations and one downstream evaluation per branch. Its hyper-parameters choose the objective
    (k, sparsity mask, temperature) so that each estimator can be measured against the objective it samples from.
    """

    name = "exact"
    family = "exact"
    reference = "DESIGN.md §2: exact dense-routing gradient by enumeration"
    sparse = False
    applies_to = frozenset({GATED, CATEGORICAL})
    supports_topk = True
    params = {"k": Param(1, positive_integer, "experts per token"),
              "mask": Param("none", one_of(*MASKS), "sparsity mask of the objective's softmax"),
              "jitter_eps": Param(0.1, nonnegative, "mask width r (used when mask is not none)"),
              "temperature": Param(1.0, positive, "softmax temperature of the objective's sampling")}

    def objective(self):
        return {"k": self.k, "mask": self.mask, "r": self.jitter_eps if self.mask != "none" else 0.0,
                "temperature": self.temperature}

    def noise_dim(self, n):
        return 0

    def sample(self, logits, noise, kind):
        n = logits.shape[-1]
        # the same tuples for every token: (B, k), broadcast against the gates (..., B, k)
        experts = torch.tensor(list(itertools.permutations(range(n), self.k)), device=logits.device)
        obj = self.objective()
        # logits (..., 1, n) broadcast against the branches: stage 1's softmax is computed once, not per branch
        _, gates, _ = sequential_route(logits.unsqueeze(-2), self.k, mask=obj["mask"], r=obj["r"],
                                       temperature=obj["temperature"],
                                       experts=experts.expand(*logits.shape[:-1], *experts.shape))
        branch_prob = gates.prod(-1)
        if kind == CATEGORICAL:
            gates = torch.ones_like(gates)
        return Routing(experts, gates, branch_prob=branch_prob)


def exact_for(objective: dict) -> Exact:
    """The `exact` estimator of an objective as returned by `Estimator.objective()`."""
    return Exact(k=objective["k"], mask=objective["mask"], jitter_eps=objective["r"] if objective["mask"] != "none"
                 else Exact.params["jitter_eps"].default, temperature=objective["temperature"])
