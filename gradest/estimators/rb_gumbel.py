"""Rao-Blackwellised straight-through Gumbel-softmax (docs/estimators.md §3.13)."""

from __future__ import annotations

import torch

from gradest.estimators.base import hparam, inverse_cdf, positive_integer, register, softmax
from gradest.estimators.straight_through import StraightThroughFamily


@register
class RaoBlackwellGumbel(StraightThroughFamily):
    """Gumbel-Rao (Paulus, Maddison, Krause, ICLR 2021, "Rao-Blackwellizing the Straight-Through Gumbel-Softmax
    Gradient Estimator", arXiv:2010.04838): D ~ p, then M Gumbel vectors G_m drawn conditionally on
    argmax(z + G_m) = D; forward onehot(D), backward through the mean over m of softmax((z + G_m) / tau), the G_m
    held fixed. Given D this is E[gumbel-st's backward | D] estimated with M draws: the same mean as gumbel-st
    at the same tau, and no more variance.

    Conditional Gumbels from exponentials E_i = -log U_i (the authors' construction): with Z = sum_j exp(z_j),
    z_D + G_D = log Z - log E_D, and z_i + G_i = -log(E_i exp(-z_i) + E_D / Z) for i != D."""

    name = "rb-gumbel"
    family = "straight-through"
    reference = "Paulus et al. 2021, Rao-Blackwellizing the Straight-Through Gumbel-Softmax (arXiv:2010.04838)"
    draws: int = hparam(10, positive_integer, "Gumbel vectors M drawn conditionally on the sampled expert")

    def noise_dim(self, n):
        return 1 + self.draws * n

    def relaxed_onehot(self, logits, noise):
        n = logits.shape[-1]
        d = inverse_cdf(softmax(logits.detach()), noise[..., :1])
        hard = torch.zeros_like(logits).scatter(-1, d, 1.0)
        with torch.no_grad():
            z = logits.unsqueeze(-2)  # (..., 1, n) against the M draws (..., M, n)
            tiny = torch.finfo(noise.dtype).tiny
            exponential = -noise[..., 1:].unflatten(-1, (self.draws, n)).clamp_min(tiny).log()
            log_e = exponential.log()
            log_e_chosen = log_e.gather(-1, d.unsqueeze(-2).expand(*d.shape[:-1], self.draws, 1))
            log_total = z.logsumexp(-1, keepdim=True)
            perturbed = torch.where(hard.unsqueeze(-2).bool(), log_total - log_e_chosen,
                                    -torch.logaddexp(log_e - z, log_e_chosen - log_total))
            gumbel = perturbed - z
        soft = softmax((logits.unsqueeze(-2) + gumbel) / self.tau).mean(-2)
        return hard + soft - soft.detach()
