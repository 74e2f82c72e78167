"""Straight-through estimators: dense, they relax the one-hot choice h so that every expert's output is needed.

In a gated layer the weights are h~ * p (forward value p_D on the chosen expert, gate path through p); in an
ungated categorical problem they are h~ itself. docs/estimators.md §3 rows `st`, `gumbel-st`, `reinmax`.
"""

from __future__ import annotations

import torch

from gradest.estimators.base import (CATEGORICAL, GATED, Estimator, Routing, hparam, inverse_cdf, register, softmax,
                                     temperature_value)


class StraightThroughFamily(Estimator):
    dense = True
    applies_to = frozenset({GATED, CATEGORICAL})
    tau: float = hparam(1.0, temperature_value, "temperature of the relaxation softmax(z / tau)")

    def relaxed_onehot(self, logits, noise):
        """h~: forward value onehot(D), D ~ softmax(z); backward the estimator's."""
        raise NotImplementedError

    def sample(self, logits, noise, kind):
        h = self.relaxed_onehot(logits, noise)
        weights = h * softmax(logits) if kind == GATED else h
        return Routing(None, weights.unsqueeze(-2))


def onehot_sample(logits, u):
    return torch.zeros_like(logits).scatter(-1, inverse_cdf(softmax(logits.detach()), u), 1.0)


@register
class StraightThrough(StraightThroughFamily):
    """Straight-through (Bengio, Leonard, Courville 2013): h~ = h + sigma_tau - sg(sigma_tau), D ~ p."""

    name = "st"
    family = "straight-through"
    reference = "Bengio et al. 2013, Estimating or propagating gradients through stochastic neurons (arXiv:1308.3432)"

    def noise_dim(self, n):
        return 1

    def relaxed_onehot(self, logits, noise):
        soft = softmax(logits / self.tau)
        return onehot_sample(logits, noise) + soft - soft.detach()


@register
class GumbelStraightThrough(StraightThroughFamily):
    """Straight-through Gumbel-softmax (Jang, Gu, Poole 2017): D = argmax(z + G), sigma = softmax((z + G)/tau)."""

    name = "gumbel-st"
    family = "straight-through"
    reference = "Jang et al. 2017, Categorical reparameterization with Gumbel-softmax (arXiv:1611.01144)"

    def noise_dim(self, n):
        return n

    def relaxed_onehot(self, logits, noise):
        tiny = torch.finfo(noise.dtype).tiny
        perturbed = logits - torch.log(-torch.log(noise.clamp_min(tiny)))
        soft = softmax(perturbed / self.tau)
        hard = torch.zeros_like(logits).scatter(-1, perturbed.detach().argmax(-1, keepdim=True), 1.0)
        return hard + soft - soft.detach()


class ReinMaxOneHot(torch.autograd.Function):
    """Forward onehot(D); backward 2 J(pi)^T g - 1/2 J(p)^T g, pi = (h + softmax(z/tau))/2, J(q)^T g = q*g - q(q.g)."""

    @staticmethod
    def forward(ctx, logits, hard, tau):
        ctx.save_for_backward(logits, hard)
        ctx.tau = tau
        return hard

    @staticmethod
    def backward(ctx, g):
        logits, hard = ctx.saved_tensors
        pi = 0.5 * (hard + softmax(logits / ctx.tau))
        p = softmax(logits)

        def jvp(q):
            return q * g - q * (q * g).sum(-1, keepdim=True)

        return 2 * jvp(pi) - 0.5 * jvp(p), None, None


@register
class ReinMax(StraightThroughFamily):
    """ReinMax (Liu, Gao, Chen 2023, "Bridging discrete and backpropagation: straight-through and beyond"):
    second-order accuracy (Heun's method) for the gradient through the one-hot sample, D ~ p."""

    name = "reinmax"
    family = "straight-through"
    reference = "Liu et al. 2023, ReinMax (arXiv:2304.08612)"

    def noise_dim(self, n):
        return 1

    def relaxed_onehot(self, logits, noise):
        return ReinMaxOneHot.apply(logits, onehot_sample(logits, noise), self.tau)
