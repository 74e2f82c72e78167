"""Gate-as-proxy routing: standard MoE training, which back-propagates only through the gate (docs/estimators.md §3).

No routing gradient nabla_0 at all; these are the baselines every other estimator is compared with.
"""

from __future__ import annotations

from gradest.estimators.base import (Estimator, Routing, boolean, hparam, positive_integer, register, softmax,
                                     unit_interval)


@register
class Switch(Estimator):
    """Switch Transformer routing (Fedus, Zoph, Shazeer 2021, "Switch Transformers").

    docs/estimators.md §3, row `switch`: D = argmax(z * u), u ~ U[1-eps, 1+eps] in training; y = p~_D e_D with
    p~ = softmax(z * u); the router learns only through p~_D. The routing reports p~ as the distribution it
    routed with (`Routing.probs`: the P_i of the reference's balance loss, `balance_probs="routed"`).
    """

    name = "switch"
    family = "gate as proxy"
    reference = "Fedus et al. 2021, Switch Transformers (arXiv:2101.03961)"
    jitter_eps: float = hparam(0.01, unit_interval, "multiplicative logit jitter eps: u ~ U[1-eps, 1+eps]")

    def noise_dim(self, n):
        return n

    selection_bias = True  # D = argmax(z * u + b), gates p~_D: the bias steers selection only

    def sample(self, logits, noise, kind, bias=None):
        return self.infer(logits * (1 - self.jitter_eps + 2 * self.jitter_eps * noise), kind, bias)

    def infer(self, logits, kind, bias=None):
        d = (logits if bias is None else logits + bias.to(logits.dtype)).detach().argmax(-1, keepdim=True)
        p = softmax(logits)
        return Routing(d.unsqueeze(-2), p.gather(-1, d).unsqueeze(-2), probs=p.unsqueeze(-2))


@register
class TopK(Estimator):
    """GShard-style top-k routing (Lepikhin et al. 2021, "GShard").

    docs/estimators.md §3, row `topk`: the k largest logits, y = sum_{i in S} g_i e_i with g = softmax(z),
    optionally renormalised over S; the router learns only through g.
    """

    name = "topk"
    family = "gate as proxy"
    reference = "Lepikhin et al. 2021, GShard (arXiv:2006.16668)"
    supports_topk = True
    k: int = hparam(1, positive_integer, "experts per token")
    renormalize: bool = hparam(False, boolean, "renormalise the k gates to sum to 1 (GShard, Mixtral)")

    def noise_dim(self, n):
        return 0

    selection_bias = True  # the k largest of z + b, gates g_i of z (DeepSeek-V3's rule on a softmax router)

    def sample(self, logits, noise, kind, bias=None):
        return self.infer(logits, kind, bias)  # deterministic: training routes as inference does

    def infer(self, logits, kind, bias=None):
        if bias is None:
            gates, experts = softmax(logits).topk(self.k, dim=-1)
        else:
            experts = (logits + bias.to(logits.dtype)).detach().topk(self.k, dim=-1).indices
            gates = softmax(logits).gather(-1, experts)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return Routing(experts.unsqueeze(-2), gates.unsqueeze(-2))

