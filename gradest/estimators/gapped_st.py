"""Gapped straight-through: ST-Gumbel's properties without its noise (docs/estimators.md §3.14)."""

from __future__ import annotations

import math

import torch

from gradest.estimators.base import Constraint, hparam, inverse_cdf, register, softmax
from gradest.estimators.straight_through import StraightThroughFamily

gap_value = Constraint(lambda v: v == "p" or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and math.isfinite(v) and v > 0), "a number > 0, or p (adaptive)")


@register
class GappedStraightThrough(StraightThroughFamily):
    """GST (Fan, Chi, Rudnicky, Ramadge, ICML 2022, "Training Discrete Deep Generative Models via Gapped
    Straight-Through Estimator", arXiv:2206.07235; the authors' `gst_mover`): D ~ p, then a deterministic
    perturbation of the logits in place of Gumbel noise, m_D = z* = max z and m_i = min(z_i, z* - gap) otherwise,
    so that D is the arg-max with a margin; forward onehot(D), backward through softmax(m / tau) with the
    perturbation m - z held fixed. `gap` 1 is GST-1.0; `gap=p` is GST-p, gap = -log(1 - p_D) / p_D."""

    name = "gapped-st"
    family = "straight-through"
    reference = "Fan et al. 2022, Gapped Straight-Through Estimator (ICML; arXiv:2206.07235)"
    gap: float = hparam(1.0, gap_value, "margin of the sampled expert over the others in the perturbed logits")

    def noise_dim(self, n):
        return 1

    def relaxed_onehot(self, logits, noise):
        z = logits.detach()
        p = softmax(z)
        d = inverse_cdf(p, noise)
        hard = torch.zeros_like(z).scatter(-1, d, 1.0)
        z_star = z.amax(-1, keepdim=True)
        gap = self.gap
        if gap == "p":
            p_d = p.gather(-1, d) * (1 - 1e-5)  # the authors' guard against p_D = 1
            gap = -torch.log1p(-p_d) / p_d
        delta = (z_star - z) * hard - (z - z_star + gap).clamp_min(0) * (1 - hard)
        soft = softmax((logits + delta) / self.tau)
        return hard + soft - soft.detach()
