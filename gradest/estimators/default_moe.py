"""Default MoE: missing experts answer with a running average of their past outputs (docs/estimators.md §3.12)."""

from __future__ import annotations

import torch

from gradest.estimators.base import hparam, one_of, register, softmax, unit_interval
from gradest.estimators.switch import TopK


@register
class DefaultMoE(TopK):
    """Default MoE (Panda, Baherwani, Sarwar, Therien, Chakraborty, Goldstein 2025, "Dense Backpropagation
    Improves Training for Sparse Mixture-of-Experts", arXiv:2504.12463).

    The routing of `topk`: S = the k largest of p = softmax(z) (optionally renormalised); an expert i outside S
    contributes p_i e^_i, e^_i an exponential moving average (stop-gradient) of its outputs on the tokens it saw:
    y = sum_{i in S} p_i e_i + sum_{i not in S} p_i e^_i, so the router gets J(p)^T c~ with c~_i = f'(y).e_i on S
    and f'(y).e^_i off S: a dense gradient at sparse compute. `forward=backward-only` keeps the default term out of
    the forward value. State per layer: e^ (n, d), zero at first; after each training forward,
    e^_i <- beta e^_i + (1 - beta) mean of e_i over the tokens routed to i (unchanged if none), so a step uses the
    outputs seen before it."""

    name = "default-moe"
    family = "dense backward"
    reference = "Panda et al. 2025, Dense Backpropagation Improves Training for Sparse MoE (arXiv:2504.12463)"
    stateful = True
    selection_bias = False  # its defaults stand in for the experts off the top-k of z itself
    beta: float = hparam(0.9, unit_interval, "EMA decay of the default outputs")
    forward: str = hparam("substitute", one_of("substitute", "backward-only"),
                          "whether the default outputs enter the forward value or only the router's gradient")

    def init_state(self, n, d, *, dtype=torch.float32, device=None):
        return {"default": torch.zeros(n, d, dtype=dtype, device=device)}

    def with_state(self, routing, logits, state, training):
        p = softmax(logits)
        off = p.scatter(-1, routing.experts[..., 0, :], 0.0)  # p_i off S, with gradient
        # a copy: the layer updates the state in place after this forward, before its backward
        offset = off.to(state["default"].dtype) @ state["default"].clone()
        if self.forward == "backward-only":
            offset = offset - offset.detach()
        routing.offset = offset.unsqueeze(-2)
        return routing

    @torch.no_grad()
    def update_state(self, state, experts, outputs):
        default = state["default"]
        n = default.shape[0]
        counts = torch.bincount(experts, minlength=n).to(default.dtype)
        sums = default.new_zeros(default.shape).index_add_(0, experts, outputs.to(default.dtype))
        seen = counts > 0
        mean = sums[seen] / counts[seen, None]
        default[seen] = self.beta * default[seen] + (1 - self.beta) * mean

    def steady_state(self, expert_outputs, logits):
        chosen = softmax(logits).topk(self.k, dim=-1).indices  # (T, k)
        on = torch.zeros_like(logits).scatter(-1, chosen, 1.0)  # (T, n)
        counts = on.sum(0)
        default = torch.einsum("tn,tnd->nd", on, expert_outputs) / counts.clamp_min(1)[:, None]
        return {"default": default}
