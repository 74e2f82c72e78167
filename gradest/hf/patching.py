"""Route a Hugging Face `transformers` mixture-of-experts model with a gradest estimator.

    import gradest.hf

    patched = gradest.hf.patch(model, "sparsemixer-v2:jitter_eps=0.01")   # or an Estimator object
    print(patched)                      # what was patched: module names, architecture, k, n
    ... train as usual ...
    patched.undo()                      # the model's own routing again (also: `with gradest.hf.patch(...):`)

`patch` replaces the routing RULE of every MoE block it recognises and nothing else: the router's weights (and
bias), the way the model computes the router logits, the experts, shared experts, input jitter of the block, the
router-logit outputs that transformers records for its auxiliary losses (`output_router_logits=True`) all stay
the model's own. The router still returns the logits in the model's format, so those losses keep working. The
gradest.hf package is the only part of gradest that imports `transformers` (`pip install 'gradest[hf]'`): 5.x,
tested with 5.24; the block layouts below are those of 5.24 (earlier 5.x releases differ in places, e.g.
DeepSeek-V3's router returned only its logits in 5.0).

Supported architectures (model_type: block class, router attribute; the table: gradest.hf.models.SUPPORTED)
------------------------------------------------------------------------------------------------------------
softmax top-k family: mixtral (MixtralSparseMoeBlock.gate), qwen2_moe (Qwen2MoeSparseMoeBlock.gate; its shared
    expert and sigmoid shared-expert gate are kept), qwen3_moe (Qwen3MoeSparseMoeBlock.gate), olmoe
    (OlmoeSparseMoeBlock.gate). Native rule: softmax(z), top-k, renormalised over the k when `norm_topk_prob`
    (Mixtral: always). Replaced by the estimator's routing of z; Mixtral's block-level input jitter
    (`router_jitter_noise`, on the input of router and experts alike) is kept. `topk` with `renormalize` = the
    native flag (the default `patch` picks) reproduces the native block exactly (tests/test_hf.py).
phimoe (PhimoeSparseMoeBlock.router): native rule: transformers' `sparsemixer`, i.e. SparseMixer-v2 with the
    sparsity mask of width `router_jitter_noise`, Gumbel-max sampling, Heun coin flips. Replaced by the estimator;
    `sparsemixer-v2` (whose `jitter_eps` defaults to the model's `router_jitter_noise`, mask `reference`) is the
    native rule. The router's `input_jitter_noise` (input augmentation) is kept. Two quirks of the native code
    are not reproduced: it ignores `num_experts_per_tok` and always routes 2 experts (the patched block routes
    k), and its Heun scale for a non-arg-max expert that loses the coin flip is the rounded constant 0.3333
    (float32) where gradest uses 1/3, so training-mode forward values differ by 1e-4 relative on those tokens.
switch_transformers (SwitchTransformersSparseMLP.router): native rule: top-1 of softmax(z) computed in
    `router_dtype`, multiplicative jitter on the router's INPUT (`router_jitter_noise`), and expert capacity: per
    sequence, an expert takes at most `expert_capacity` tokens, in token order, the rest output 0. Replaced: the
    estimator's routing (the native input jitter is not applied; gradest `switch` jitters the logits by its
    `jitter_eps`), the same expert capacity counted over the (token, choice) pairs in token order (a dense
    estimator's pair is the expert its forward value uses: a dropped token gets 0 from every expert). The block's
    forward is replaced too, so that k > 1 and dense routings reach the experts. `switch` with jitter 0 reproduces
    the native block exactly, capacity included.
deepseek_v3 (DeepseekV3MoE.gate): native rule: s = sigmoid(z); the top-k by s + `e_score_correction_bias` among
    the `topk_group` best expert groups (group-limited); gates s_i over the chosen, renormalised when
    `norm_topk_prob`, times `routed_scaling_factor`. Replaced: the estimator's softmax-based routing of the same
    float32 logits z over ALL experts (no groups), so sigmoid scoring, the correction bias (it only steers
    selection, and is left untouched on the module) and the group limit are gone; KEPT: `routed_scaling_factor`
    multiplies the estimator's gates (so a renormalised top-k keeps the native output scale), and
    `renormalize` defaults to `norm_topk_prob`. No estimator reproduces the native rule.
gpt_oss (GptOssMLP.router): native rule: top-k of the logits (router bias included), then softmax over those
    k logits, which equals softmax(z) renormalised over its top k. Replaced by the estimator; `topk` with
    `renormalize=True` (the default here) is the native rule. The block still returns (output, router scores),
    the scores being the estimator's gates.

Precision: the logits come from the model's own operation on its own weights, in the dtype the native router
computes them in. The estimator routes them in float32, or in float64 in a float64 model (gradest's rule). That is
the native precision of Mixtral, Qwen, OLMoE, DeepSeek-V3 and Switch in bfloat16/float16/float32 models (in a
float64 model their routers round to float32); PhiMoE and GPT-OSS natively route in the model's dtype (e.g.
bfloat16), the patched blocks in float32. The gates are then cast to the dtype the native router hands its
experts: float32 for Mixtral and DeepSeek-V3, the logits' dtype for Qwen, OLMoE, PhiMoE and GPT-OSS, the block
input's for Switch.

Estimators, by capability (the flags of docs/adding-an-estimator.md):
  sparse (topk, switch, first-order, sparsemixer, sparsemixer-v2, sparsemixer-v2*, default-moe, reinforce): the
      chosen experts and their gates go through the block's own experts module, as the native top-k would.
  dense (st, gumbel-st, reinmax, rb-gumbel, gapped-st, densemixer): every expert runs on every token: the experts
      module gets top_k_index = all n experts and top_k_weights = the estimator's dense gates (0 in value off the
      chosen experts, with the estimator's gradient).
  stateful (default-moe): its state is buffers of the block, `gradest_state_<key>`, registered by `patch` (so they
      move with the model and are saved in its state_dict while patched) and removed by `undo`. The block's
      experts module is then called once per choice slot with unit weights, which gives each (token, choice)
      pair's expert output at the cost of the native call; the gated mix is formed from those, the estimator's
      `update_state` gets them after each training forward, and `Routing.offset` is added to the routed output.
      Under gradient checkpointing the recomputed forward is a training forward too and updates the state again.
  score function (reinforce): each block keeps the log-probability of the routing it sampled in
      `block.gradest_log_prob` (tokens,); the score-function term reaches the router only through `score_loss`:
          loss_per_sequence = ...                          # (batch,) the loss of each sequence
          score_loss(model, loss_per_sequence).mean().backward()
      The HF `Trainer` path needs it: its default loss is a token mean with no score term, so reinforce would
      train by its gate path only. Override `compute_loss`, e.g. for a causal LM:
          class ScoreTrainer(transformers.Trainer):
              def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
                  labels = inputs.pop("labels")
                  out = model(**inputs)
                  targets = labels[:, 1:]
                  token_loss = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), targets, reduction="none")
                  kept = (targets != -100).float()
                  per_sequence = (token_loss * kept).sum(-1) / kept.sum(-1).clamp_min(1)
                  mask = inputs.get("attention_mask")
                  loss = gradest.hf.score_loss(model, per_sequence, attention_mask=mask).mean()
                  return (loss, out) if return_outputs else loss
      `reinforce:baseline=zero` needs f(0): compute the loss again inside `with patched.zero_output():` (no
      gradient needed) and pass it as `loss_zero`.
  enumerating (exact): refused; it needs one downstream pass per expert tuple.

`k` (experts per token) is the model's `num_experts_per_tok` (1 for Switch) unless given; other hyper-parameters
the model fixes are defaults too, each only where it means the same thing: `renormalize` (topk, densemixer,
default-moe) = the native renormalisation flag, `jitter_eps` of the SparseMixer family on PhiMoE =
`router_jitter_noise`. Given hyper-parameters always win. An Estimator object is used as it is.

The engine-neutral half (the estimator built from its spec, the `Patched` handle, the state buffers, the routing
decision, `score_loss` and `routing_log_prob`) is gradest/engines.py, shared with gradest.titan; this module is the
transformers half (which blocks, their logits, their output formats).

Routing noise: an estimator draws its uniforms with torch.rand; `Patched.noise`, a callable (module name, logits
(tokens, n)) -> noise (tokens, noise_dim), supplies them instead (reproducibility, cross-implementation checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch
from torch import Tensor, nn

from gradest import engines
from gradest.engines import Patched, routing_log_prob, score_loss  # noqa: F401  (gradest.hf's API)
from gradest.errors import GradestError
from gradest.estimators import GATED, Estimator
from gradest.hf.families import Family, routing_dtype
from gradest.hf.models import TESTED_TRANSFORMERS, moe_blocks, supported_list, transformers_module


# ---------------------------------------------------------------------------------------------- patched blocks
@dataclass(eq=False)
class PatchedBlock(engines.PatchedBlock):
    """One patched transformers MoE block (`gradest.engines.PatchedBlock`), routed by its architecture's `family`."""

    family: Family | None = field(default=None, repr=False)

    def install(self) -> None:
        estimator = self.patch.estimator
        if estimator.stateful:
            self.register_state(self.router_weight().shape[-1], self.router_weight().device)
            self.experts_forward = self.block.experts.forward
            self.override(self.block.experts, self.mix_per_slot)
        self.override(self.router, self.route)
        self.family.install(self)
        self.mark()

    def router_weight(self) -> Tensor:
        return self.family.router_weight(self.router)

    # -- the replacement forwards
    def route(self, hidden: Tensor):
        """The router's forward: the model's logits, the estimator's routing, the model's output format."""
        logits = self.family.logits(self.router, hidden)
        z = logits.reshape(-1, self.n)
        z = z.to(routing_dtype(z.dtype))
        routing, index, gates = self.decide(z, self.router.training)
        return self.family.output(self, hidden, logits, index, gates, routing)

    def mix_per_slot(self, hidden: Tensor, selection: Tensor, weights: Tensor) -> Tensor:
        """The experts' forward for a stateful estimator: the block's experts module once per choice slot with
        unit weights (each pair's expert output), mixed with the gates; then the state update and the offset."""
        routing = self.routing
        if routing is None:  # zero-output pass
            return torch.zeros_like(hidden)
        ones = weights.new_ones(weights.shape[0], 1)
        outputs = [self.experts_forward(hidden, selection[:, j:j + 1], ones) for j in range(weights.shape[1])]
        y = sum(out * weights[:, j:j + 1] for j, out in enumerate(outputs)).to(hidden.dtype)
        if self.block.training:
            self.record_pairs(outputs)
        if routing.offset is not None:
            y = y + routing.offset[:, 0].to(y.dtype)
        return y


# ---------------------------------------------------------------------------------------------------- patching
def patch(model: nn.Module, estimator: str | Estimator, *, k: int | None = None, **hparams) -> Patched:
    """Route every MoE block of `model` that gradest recognises with `estimator` (a name or spec such as
    "sparsemixer-v2:jitter_eps=0.01", or an Estimator); returns the `Patched` handle (`undo()`, context manager).

    `k` defaults to the model's `num_experts_per_tok`; `hparams` are the estimator's hyper-parameters (defaults
    the model fixes: see the module docstring). Raises a one-line GradestError for a model without a supported
    MoE block, an estimator that cannot route a block (`exact`), or one that routes one expert where k > 1."""
    if not isinstance(model, nn.Module):
        raise GradestError(f"patch needs a torch nn.Module (a transformers model), got {type(model).__name__}")
    transformers = transformers_module()
    major = int(transformers.__version__.split(".")[0])
    if not TESTED_TRANSFORMERS[0] <= major < TESTED_TRANSFORMERS[1]:
        raise GradestError(f"gradest.hf supports transformers {TESTED_TRANSFORMERS[0]}.x, installed: "
                           f"{transformers.__version__}; valid: transformers>={TESTED_TRANSFORMERS[0]},"
                           f"<{TESTED_TRANSFORMERS[1]}")
    found = moe_blocks(model)
    for name, module, _ in found:
        if "_gradest_patch" in module.__dict__:
            raise GradestError(f"{name} is already patched by gradest; undo() that patch first")

    _, first, arch = found[0]
    router = arch.router_of(first)
    native_ks = {a.family.native_k(a.router_of(m)) for _, m, a in found}
    if k is None and len(native_ks) > 1:
        raise GradestError(f"the MoE blocks route different numbers of experts ({sorted(native_ks)}); valid: "
                           f"pass k")
    where = f"{arch.model_type} model"
    built = engines.build_estimator(estimator, k, native_ks.pop(),
                                    lambda cls: arch.family.native_hparams(router, cls), where, hparams, "gradest.hf")

    patched = Patched(model, built)
    for name, module, a in found:
        router = a.router_of(module)
        n = a.family.experts(router)
        built.check(n, GATED)
        patched.blocks.append(PatchedBlock(name, a.model_type, built.k, n, module, patched, router, family=a.family))
    for block in patched.blocks:
        block.install()
    return patched


def native_hparams(model: nn.Module, cls: type[Estimator]) -> dict:
    """The hyper-parameters of estimator class `cls` that `model`'s own routing fixes (its first MoE block's: see
    the module docstring), for building the estimator that will route it."""
    found = moe_blocks(model)
    if not found:
        raise GradestError(f"no mixture-of-experts block gradest.hf can route in {type(model).__name__}; valid: "
                           f"a model of {supported_list()}")
    _, first, arch = found[0]
    return arch.family.native_hparams(arch.router_of(first), cls)
