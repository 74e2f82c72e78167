"""The routing families of gradest.hf: how gradest routes each kind of transformers MoE block in place of its native
rule (the rules themselves: gradest/hf/patching.py's docstring). `gradest.hf.models.SUPPORTED` gives each
architecture its family."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gradest.engines import routing_dtype
from gradest.estimators import Estimator, Routing
from gradest.estimators.sparsemixer import SparseMixerFamily


# ------------------------------------------------------------------------------------------------------ families
class Family:
    """How gradest routes one family of transformers MoE blocks: how the model computes its router logits, and how
    a routing is handed back in the router's own output format (where the router is: `Architecture.router`). `bp`,
    where a method takes it, is the block's `gradest.hf.patching.PatchedBlock` (not annotated: that module imports
    this one)."""

    def experts(self, router) -> int:
        return router.num_experts

    def native_k(self, router) -> int:
        return router.top_k

    def router_weight(self, router) -> Tensor:
        """The router's weight matrix (n, d)."""
        return router.weight

    def native_hparams(self, router, cls: type[Estimator]) -> dict:
        """Hyper-parameters of estimator class `cls` that the model fixes (defaults unless given)."""
        return {}

    def logits(self, router, hidden: Tensor) -> Tensor:
        """The router logits, computed as the model computes them, in the shape its router returns."""
        raise NotImplementedError

    def output(self, bp, hidden: Tensor, logits: Tensor, index: Tensor, gates: Tensor,
               routing: Routing | None) -> tuple:
        """The router's return value in the model's format, for experts `index` (T, m) and `gates` (T, m)."""
        raise NotImplementedError

    def install(self, bp) -> None:
        """Override further pieces of the block (the router's forward is always replaced)."""


class SoftmaxTopK(Family):
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: replaces softmax -> top-k -> optional renormalisation after the
    router's logits z = W x; returns (z, gates, experts) as their routers do."""

    def __init__(self, renormalize: bool | None, gates_in_logits_dtype: bool):
        self.renormalize = renormalize  # None: the router's `norm_topk_prob`
        self.gates_in_logits_dtype = gates_in_logits_dtype  # Qwen, OLMoE cast; Mixtral keeps float32

    def native_renormalize(self, router) -> bool:
        return bool(router.norm_topk_prob) if self.renormalize is None else self.renormalize

    def native_hparams(self, router, cls):
        return {"renormalize": self.native_renormalize(router)} if "renormalize" in cls.params else {}

    def logits(self, router, hidden):
        return F.linear(hidden.reshape(-1, router.weight.shape[-1]), router.weight)

    def output(self, bp, hidden, logits, index, gates, routing):
        return logits, gates.to(logits.dtype) if self.gates_in_logits_dtype else gates, index


class PhiMoE(SoftmaxTopK):
    """PhiMoE: replaces transformers' `sparsemixer` (SparseMixer-v2) after z = W x; the router's input jitter
    (`input_jitter_noise`, in place on its input, as the native router does) is kept."""

    def __init__(self):
        super().__init__(renormalize=False, gates_in_logits_dtype=True)

    def native_hparams(self, router, cls):
        return {"jitter_eps": float(router.router_jitter_noise)} if issubclass(cls, SparseMixerFamily) else {}

    def logits(self, router, hidden):
        if router.training and router.input_jitter_noise > 0:
            hidden *= torch.empty_like(hidden).uniform_(1.0 - router.input_jitter_noise,
                                                        1.0 + router.input_jitter_noise)
        return F.linear(hidden, router.weight, router.bias)


class GptOss(SoftmaxTopK):
    """GPT-OSS: replaces top-k of the logits then softmax over those k (= softmax renormalised over its top k)
    after z = W x + b."""

    def __init__(self):
        super().__init__(renormalize=True, gates_in_logits_dtype=True)

    def logits(self, router, hidden):
        return F.linear(hidden.reshape(-1, router.weight.shape[-1]), router.weight, router.bias)


class DeepSeekV3(SoftmaxTopK):
    """DeepSeek-V3: replaces sigmoid scoring, the correction bias and group-limited top-k after the float32
    logits z = W x; the gates are multiplied by `routed_scaling_factor`, as the native ones are."""

    def __init__(self):
        super().__init__(renormalize=None, gates_in_logits_dtype=False)

    def logits(self, router, hidden):
        dtype = routing_dtype(hidden.dtype)  # native: float32 (a float64 model stays float64 here)
        return F.linear(hidden.reshape(-1, router.weight.shape[-1]).to(dtype), router.weight.to(dtype))

    def output(self, bp, hidden, logits, index, gates, routing):
        return logits, gates * float(bp.router.routed_scaling_factor), index


class SwitchTransformers(Family):
    """SwitchTransformers: replaces top-1 of softmax(z) (and the router's input jitter) after z = W x + b
    computed in `router_dtype`; keeps expert capacity per sequence. Its router returns (dispatch (..., m, n)
    one-hot per choice slot, gates (..., m), z) and the block's forward is replaced so that m = k > 1 and dense
    routings (m = n) reach the experts, which take one one-hot slot per choice."""

    def native_k(self, router):
        return 1

    def router_weight(self, router):
        return router.classifier.weight

    def logits(self, router, hidden):
        classifier = router.classifier
        bias = None if classifier.bias is None else classifier.bias.to(router.dtype)
        return F.linear(hidden.to(router.dtype), classifier.weight.to(router.dtype), bias)

    def output(self, bp, hidden, logits, index, gates, routing):
        n, T = bp.n, index.shape[0]
        lead = hidden.shape[:-1]
        sequences = lead[0] if len(lead) > 1 else 1
        dense = routing is not None and routing.experts is None
        # the (token, choice) pairs whose expert's output the forward value uses, in token order per sequence
        choice = gates.detach().topk(bp.k, -1).indices if dense else index
        onehot = F.one_hot(choice, n)  # (T, c, n)
        per_sequence = onehot.reshape(sequences, -1, n)
        kept = ((per_sequence.cumsum(1) <= bp.router.expert_capacity) & per_sequence.bool()).any(-1)
        kept = kept.reshape(choice.shape)
        if dense:
            token_kept = kept.any(-1, keepdim=True).to(gates.dtype)
            gates = gates * token_kept.expand(gates.shape).scatter(-1, choice, kept.to(gates.dtype))
            dispatch = torch.eye(n, dtype=torch.long, device=index.device).expand(T, n, n)
            bp.kept = None
        else:
            dispatch = onehot * kept.unsqueeze(-1)
            bp.kept = kept
        m = dispatch.shape[1]
        return dispatch.reshape(*lead, m, n), gates.to(hidden.dtype).reshape(*lead, m), logits

    def install(self, bp):
        block = bp.block

        def forward(hidden_states):
            d = hidden_states.shape[-1]
            dispatch, gates, _ = block.router(hidden_states)
            m = gates.shape[-1]
            y = block.experts(hidden_states.reshape(-1, d), dispatch.reshape(-1, m, bp.n), gates.reshape(-1, m))
            return y.reshape(hidden_states.shape)

        bp.override(block, forward)

