"""Score-function estimator (docs/estimators.md §3 row `reinforce`): unbiased, sparse, high variance."""

from __future__ import annotations

import torch

from gradest.errors import GradestError
from gradest.estimators.base import (CATEGORICAL, GATED, Estimator, Routing, hparam, one_of, positive_integer,
                                     register, sequential_route)


@register
class Reinforce(Estimator):
    """REINFORCE (Williams 1992): gate path + (f - b) grad log P(D), D drawn by sequential top-k.

    Baselines b: `none` (0); `zero`, the loss with the layer's output zeroed, f(0) (one extra downstream pass);
    `mean`, the leave-one-out mean of f over the other items of the batch (last dimension of f). Each is
    independent of the item's own draw, so the estimator stays unbiased.
    """

    name = "reinforce"
    family = "score function"
    reference = "Williams 1992, Simple statistical gradient-following algorithms (Mach. Learn. 8)"
    applies_to = frozenset({GATED, CATEGORICAL})
    supports_topk = True
    score_function = True
    k: int = hparam(1, positive_integer, "experts per token")
    baseline: str = hparam("none", one_of("none", "zero", "mean"), "control variate b subtracted from f")
    variants = ({"baseline": "none"}, {"baseline": "zero"}, {"baseline": "mean"})

    @property
    def needs_zero_output(self):
        return self.baseline == "zero"

    @property
    def min_batch(self):
        return 2 if self.baseline == "mean" else 1

    def noise_dim(self, n):
        return self.k

    def sample(self, logits, noise, kind):
        experts, gates, _ = sequential_route(logits, self.k, u=noise)
        log_prob = gates.log().sum(-1)
        if kind == CATEGORICAL:
            gates = torch.ones_like(gates)
        return Routing(experts.unsqueeze(-2), gates.unsqueeze(-2), log_prob=log_prob)

    def with_score(self, f, log_prob, f_zero=None):
        if log_prob is None:  # inference routing: nothing was sampled
            return f
        if self.baseline == "zero":
            if f_zero is None:
                raise GradestError("reinforce(baseline=zero) needs f(0), the loss with the MoE output zeroed")
            b = f_zero
        elif self.baseline == "mean":
            m = f.shape[-1]
            if m < self.min_batch:
                raise GradestError("reinforce(baseline=mean) needs a batch of at least 2 items; valid: "
                                   "baseline=none or baseline=zero")
            b = (f.sum(-1, keepdim=True) - f) / (m - 1)
        else:
            b = torch.zeros_like(f)
        score = log_prob - log_prob.detach()  # value 0, gradient grad log P(D)
        return f + (f - b).detach() * score

