"""DenseMixer: a sparse forward with the router gradient of the dense mixture (docs/estimators.md §3.11)."""

from __future__ import annotations

from gradest.estimators.base import Routing, register, softmax
from gradest.estimators.switch import TopK


@register
class DenseMixer(TopK):
    """DenseMixer (Yao et al. 2025, "DenseMixer: Improving MoE Post-Training with Precise Router Gradient"; the
    `densemixer` package, `forward` of its Qwen3-MoE / OLMoE blocks).

    Forward: the routing of `topk`, S = the k largest of p = softmax(z), y = sum_{i in S} g_i e_i, g = p (or
    p / sum_S p with `renormalize`, Qwen's norm_topk_prob). Backward: the gradient of the dense mixture
    sum_i w_i e_i over EVERY expert, w = p; renormalised, w_i = p_i / N on S and p_i / sg(N) off S, N = sum_S p.
    The router gets
    J(w)^T [f'(y).e_i]_i; an expert gets gradient only from the tokens routed to it (weight g_i). Every expert
    runs on every token in training, none extra in inference."""

    name = "densemixer"
    family = "dense backward"
    reference = "Yao et al. 2025, DenseMixer: Improving MoE Post-Training with Precise Router Gradient"
    dense = True
    selection_bias = False  # its dense backward is built around the top-k of z itself

    def sample(self, logits, noise, kind):
        p = softmax(logits)
        chosen = p.detach().topk(self.k, dim=-1).indices
        on = p.new_zeros(p.shape).scatter(-1, chosen, 1.0)
        w = p
        if self.renormalize:
            total = (p * on).sum(-1, keepdim=True)
            w = p * on / total + p * (1 - on) / total.detach()
        # value: the top-k gates (0 off S); gradient: w's, over all experts
        gates = (w * on).detach() + w - w.detach()
        return Routing(None, gates.unsqueeze(-2))
