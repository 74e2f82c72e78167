"""SparseMixer and its successors: sparse estimators that approximate the routing gradient nabla_0 with ODE
steps along the gate, at the cost of one gate-path backward (docs/estimators.md §3 rows `first-order`, `sparsemixer`,
`sparsemixer-v2`, `sparsemixer-v2*`).

All sample from the masked softmax of the reference code (estimators.md §2) unless `mask=none`. Forward values carry
coin-flip scales (c, s) that pick the ODE step; the backward is the gate path scaled by 1 or 2, ignoring them.
"""

from __future__ import annotations

import torch

from gradest.estimators.base import (MASKS, Estimator, Objective, Routing, hparam, nonnegative, one_of,
                                     positive_integer, register, value_with_gradient)


class SparseMixerFamily(Estimator):
    family = "SparseMixer"
    jitter_eps: float = hparam(0.1, nonnegative, "sparsity-mask width r (named as in the SparseMixer code)")
    mask: str = hparam("reference", one_of(*MASKS), "sparsity mask: reference code, GRIN paper Eq. 2, or none")
    temperature = 1.0
    # `--estimators all` also measures each without its mask, to separate the mask's effect from the ODE step's
    variants = ({}, {"mask": "none"})

    def objective(self):
        return Objective(self.k, self.mask, self.jitter_eps, self.temperature)

    # a selection bias b: D is drawn from the masked softmax of z + b (coin flips: c = 1 on ITS arg-max), the gates
    # are p_D of the masked softmax of z over the same kept experts, the backward the same multiple of their path
    selection_bias = True

    def draw(self, logits, noise, bias=None):
        """Sequential top-k from the masked softmax; the first k uniforms pick the experts."""
        return self.objective().route(logits, u=noise[..., :self.k], bias=bias)


def topk_param():
    return hparam(1, positive_integer, "experts per token (GRIN Alg. 3 sequential sampling)")


@register
class FirstOrder(SparseMixerFamily):
    """SparseMixer-1st (Liu, Gao, Chen 2023, Sparse Backpropagation for MoE Training): Euler's method,
    f(a) - f(0) ~ f'(a).a, so the router gradient is the gate path doubled: 2 f'(y).e_D grad p_D."""

    name = "first-order"
    omega = True  # an ablation of SparseMixer, so it keeps SparseMixer's omega
    reference = "Liu et al. 2023, Sparse Backpropagation for MoE Training (arXiv:2310.00811), Euler"
    supports_topk = True
    k: int = topk_param()

    def noise_dim(self, n):
        return self.k

    def sample(self, logits, noise, kind, bias=None):
        experts, p, _ = self.draw(logits, noise, bias)
        return Routing(experts.unsqueeze(-2), value_with_gradient(p, 1.0, 2.0).unsqueeze(-2))


@register
class SparseMixer(SparseMixerFamily):
    """SparseMixer (Liu, Gao, Chen 2023): mid-point method. Forward c p_D e_D, c = 1 if D is the arg-max or
    U > 1/2, else 1/2; backward 2 f'(y).e_D grad p_D ignoring c. In expectation: Euler on the arg-max expert,
    mid-point f'(a/2) elsewhere, which is exact for quadratic f. Top-1 only."""

    name = "sparsemixer"
    omega = True  # the SparseMixer paper scales the MoE output by a learnable omega
    reference = "Liu et al. 2023, Sparse Backpropagation for MoE Training (arXiv:2310.00811), mid-point"

    def noise_dim(self, n):
        return 2

    def sample(self, logits, noise, kind, bias=None):
        experts, p, was_max = self.draw(logits, noise, bias)
        c = torch.where(was_max | (noise[..., 1:] > 0.5), 1.0, 0.5).to(p.dtype)
        return Routing(experts.unsqueeze(-2), value_with_gradient(p, c, 2.0).unsqueeze(-2))


class HeunFamily(SparseMixerFamily):
    """GRIN's third-order (Heun) estimators: forward s p_D e_D with s = max(delta, (1 + 2B)/3), B ~ Bernoulli(q);
    backward `grad_scale` f'(y).e_D grad p_D, s detached."""

    supports_topk = True
    k: int = topk_param()
    coin = 0.25
    grad_scale = 1.0

    def noise_dim(self, n):
        return 2 * self.k

    def sample(self, logits, noise, kind, bias=None):
        experts, p, was_max = self.draw(logits, noise, bias)
        # the scale in p's own dtype: a float32 1/3 would be 3e-8 off in a float64 measurement
        s = torch.where(was_max | (noise[..., self.k:] < self.coin), p.new_tensor(1.0), p.new_tensor(1 / 3))
        return Routing(experts.unsqueeze(-2), value_with_gradient(p, s, self.grad_scale).unsqueeze(-2))


@register
class SparseMixerV2(HeunFamily):
    """SparseMixer-v2 (Liu et al. 2024, GRIN: GRadient-INformed MoE, Alg. 1; as shipped in PhiMoE):
    B ~ Bernoulli(1/4); expectation delta f'(a) + (1 - delta)(1/4 f'(a) + 3/4 f'(a/3)) times e_D grad p_D."""

    name = "sparsemixer-v2"
    reference = "Liu et al. 2024, GRIN: GRadient-INformed MoE (arXiv:2409.12136), Alg. 1"


@register
class SparseMixerV2Star(HeunFamily):
    """SparseMixer-v2* (GRIN Alg. 2): D ~ masked softmax(z/2), B ~ Bernoulli(5/8), backward doubled."""

    name = "sparsemixer-v2*"
    reference = "Liu et al. 2024, GRIN: GRadient-INformed MoE (arXiv:2409.12136), Alg. 2"
    coin = 5 / 8
    grad_scale = 2.0
    temperature = 2.0
