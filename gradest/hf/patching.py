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

Routing noise: an estimator draws its uniforms with torch.rand; `Patched.noise`, a callable (module name, logits
(tokens, n)) -> noise (tokens, noise_dim), supplies them instead (reproducibility, cross-implementation checks).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from gradest.errors import GradestError
from gradest.estimators import GATED, REGISTRY, Estimator, EstimatorSpec, Routing, parse_spec, trainable
from gradest.hf.families import Family, routing_dtype
from gradest.hf.models import TESTED_TRANSFORMERS, moe_blocks, supported_list, transformers_module


# ---------------------------------------------------------------------------------------------- patched blocks
@dataclass(eq=False)
class PatchedBlock:
    """One patched MoE block: its module name, architecture, k, n; it routes the block while patched."""

    name: str
    architecture: str
    k: int
    n: int
    block: nn.Module = field(repr=False)
    family: Family = field(repr=False)
    patch: "Patched" = field(repr=False)
    router: nn.Module = field(repr=False)
    routing: Routing | None = field(default=None, init=False, repr=False)  # this forward's, for the experts
    # the last routing, detached, for statistics (`gradest run --hf`): logits z (T, n) and the experts (T, k) each
    # token's forward value uses (a dense estimator's: the top k of its gates); a zero-output pass leaves it
    routed: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False)
    kept: Tensor | None = field(default=None, init=False, repr=False)  # (T, k) pairs within capacity (Switch)
    _saved: list = field(default_factory=list, init=False, repr=False)  # (module, had forward, old forward)
    _buffers: list = field(default_factory=list, init=False, repr=False)

    # -- installing and undoing
    def override(self, module: nn.Module, forward: Callable) -> None:
        """Replace `module`'s forward by an instance attribute (hooks still run); undone by `restore`."""
        self._saved.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
        module.forward = forward

    def install(self) -> None:
        estimator = self.patch.estimator
        if estimator.stateful:
            d = self.router_weight().shape[-1]
            device = self.router_weight().device
            for key, value in estimator.init_state(self.n, d, device=device).items():
                name = f"gradest_state_{key}"
                self.block.register_buffer(name, value)
                self._buffers.append(name)
            self.experts_forward = self.block.experts.forward
            self.override(self.block.experts, self.mix_per_slot)
        self.override(self.router, self.route)
        self.family.install(self)
        self.block.gradest_log_prob = None
        self.block._gradest_patch = self

    def restore(self) -> None:
        for module, had, old in reversed(self._saved):
            if had:
                module.forward = old
            else:
                del module.forward
        self._saved.clear()
        for name in self._buffers:
            del self.block._buffers[name]
        self._buffers.clear()
        for attribute in ("gradest_log_prob", "_gradest_patch"):
            self.block.__dict__.pop(attribute, None)
        self.routing = self.kept = self.routed = None

    def router_weight(self) -> Tensor:
        return self.family.router_weight(self.router)

    def state(self) -> dict[str, Tensor] | None:
        estimator = self.patch.estimator
        if not estimator.stateful:
            return None
        return {name[len("gradest_state_"):]: getattr(self.block, name) for name in self._buffers}

    # -- the replacement forwards
    def route(self, hidden: Tensor):
        """The router's forward: the model's logits, the estimator's routing, the model's output format."""
        estimator, patch = self.patch.estimator, self.patch
        logits = self.family.logits(self.router, hidden)
        z = logits.reshape(-1, self.n)
        z = z.to(routing_dtype(z.dtype))
        if patch.zeroed:  # f(0) for reinforce's zero baseline: no routing, no noise, the sampled log P kept
            self.routing = None
            index = z.detach().topk(self.k, -1).indices
            return self.family.output(self, hidden, logits, index, z.new_zeros(index.shape), None)
        training = self.router.training
        noise = patch.noise(self.name, z) if training and patch.noise is not None else None
        routing = estimator.route(z, kind=GATED, training=training, noise=noise, state=self.state())
        gates = routing.gates[:, 0]
        if routing.experts is None:  # dense: every expert, with the estimator's dense gates
            index = torch.arange(self.n, device=z.device).expand(z.shape[0], self.n)
        else:
            index = routing.experts[:, 0]
        self.routing = routing
        self.routed = (z.detach(), index.detach() if routing.experts is not None else
                       gates.detach().topk(self.k, -1).indices)
        self.block.gradest_log_prob = routing.log_prob
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
            experts = routing.experts[:, 0].T.reshape(-1)  # pair j * T + t: token t's j-th choice
            pair_outputs = torch.cat(outputs).detach()
            if self.kept is not None:
                keep = self.kept.T.reshape(-1)
                experts, pair_outputs = experts[keep], pair_outputs[keep]
            self.patch.estimator.update_state(self.state(), experts, pair_outputs)
        if routing.offset is not None:
            y = y + routing.offset[:, 0].to(y.dtype)
        return y


class Patched:
    """What `patch` did to a model: `blocks` (one `PatchedBlock` each: name, architecture, k, n), the
    `estimator`; `undo()` restores the model's own routing (also on leaving a `with` block)."""

    def __init__(self, model: nn.Module, estimator: Estimator):
        self.model, self.estimator = model, estimator
        self.blocks: list[PatchedBlock] = []
        self.noise: Callable[[str, Tensor], Tensor] | None = None
        self.zeroed = False
        self.active = True

    @property
    def modules(self) -> list[str]:
        return [b.name for b in self.blocks]

    def __repr__(self) -> str:
        rows = ", ".join(f"{b.name} ({b.architecture}, k={b.k}, n={b.n})" for b in self.blocks)
        state = "" if self.active else ", undone"
        return f"Patched(estimator={self.estimator.label}, {len(self.blocks)} blocks: {rows}{state})"

    def undo(self) -> None:
        """Restore every patched block's own routing, remove the state buffers; a second call does nothing."""
        for block in reversed(self.blocks):
            block.restore()
        self.active = False

    def __enter__(self) -> "Patched":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    @contextlib.contextmanager
    def zero_output(self):
        """Inside, every patched block's routed experts output 0 (its shared experts, if any, still run): the
        pass that gives f(0) for `reinforce:baseline=zero`. Routing draws nothing and keeps `gradest_log_prob`."""
        self.zeroed = True
        try:
            yield self
        finally:
            self.zeroed = False


# ---------------------------------------------------------------------------------------------------- patching
def _build(estimator: str | Estimator, k: int | None, native_k: int, native: Callable, where: str,
           hparams: dict) -> Estimator:
    if isinstance(estimator, Estimator):
        if hparams or k is not None:
            raise GradestError("hyper-parameters (and k) go with an estimator name, e.g. patch(model, 'topk', k=2) "
                               "or 'topk:renormalize=true'; an Estimator object is used as it is")
        built = estimator
    else:
        spec = parse_spec(estimator) if isinstance(estimator, str) else None
        if spec is None:
            raise GradestError(f"estimator must be a name or an Estimator, got {type(estimator).__name__}; "
                               f"valid: {', '.join(trainable(GATED, 1))}")
        cls = REGISTRY[spec.name]
        if cls.enumerates:
            raise _enumerates(cls.name, k or native_k)
        own = dict(spec.hparams)
        for key in hparams:
            if key not in cls.params or key == "k":
                valid = ", ".join(name for name in cls.params if name != "k") or "none"
                raise GradestError(f"estimator '{cls.name}' has no hyper-parameter '{key}' to pass by name; valid: "
                                   f"{valid} (and k=)")
            if key in own:
                raise GradestError(f"{key} given twice ({key}={own[key]} in '{estimator}' and {key}={hparams[key]}); "
                                   f"give it once")
        if "k" in own:
            if k is not None and own["k"] != k:
                raise GradestError(f"k given twice ({own['k']} and {k}); give it once")
            k = own.pop("k")
        k = native_k if k is None else k
        if k != 1 and not cls.supports_topk:
            why = f"this {where} routes num_experts_per_tok={k}" if k == native_k else f"k={k} was asked for"
            raise GradestError(f"estimator '{cls.name}' routes one expert per token but {why}; valid for k={k}: "
                               f"{', '.join(trainable(GATED, k))}; or pass k=1")
        built = EstimatorSpec(spec.name, tuple(own.items())).build(k, hparams, native(cls))
    if built.enumerates:
        raise _enumerates(built.name, built.k)
    if GATED not in built.applies_to:
        raise GradestError(f"estimator '{built.name}' does not apply to a gated MoE layer; valid: "
                           f"{', '.join(trainable(GATED, built.k))}")
    if built.stateful and built.dense:
        raise GradestError(f"estimator '{built.name}' is stateful and dense: gradest.hf cannot route it")
    return built


def _enumerates(name: str, k: int) -> GradestError:
    return GradestError(f"estimator '{name}' enumerates every expert tuple as a weighted branch (one downstream "
                        f"pass each) and cannot route a model's MoE block; valid: {', '.join(trainable(GATED, k))}")


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
    built = _build(estimator, k, native_ks.pop(), lambda cls: arch.family.native_hparams(router, cls), where,
                   hparams)

    patched = Patched(model, built)
    for name, module, a in found:
        router = a.router_of(module)
        n = a.family.experts(router)
        built.check(n, GATED)
        patched.blocks.append(PatchedBlock(name, a.model_type, built.k, n, module, a.family, patched, router))
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


# ---------------------------------------------------------------------------------------------- score function
def score_loss(model: nn.Module, loss_per_sequence: Tensor, *, loss_zero: Tensor | None = None,
               attention_mask: Tensor | None = None) -> Tensor:
    """The loss to back-propagate for a score-function estimator (reinforce): `estimator.with_score` of the loss
    of each sequence (batch,) with the log-probability of the routing sampled for its tokens, summed over every
    patched block. Its value is `loss_per_sequence`; for any other estimator it is `loss_per_sequence` itself.
    `attention_mask` (batch, seq): tokens with 0 add no log-probability (decoder-only models). `loss_zero`: the
    loss with the routed outputs zeroed (`Patched.zero_output()`), for `baseline=zero`."""
    blocks = [m._gradest_patch for m in model.modules() if "_gradest_patch" in m.__dict__]
    if not blocks:
        raise GradestError("score_loss needs a model patched by gradest.hf.patch; valid: call patch(model, "
                           "'reinforce') first")
    if loss_per_sequence.dim() != 1:
        raise GradestError(f"score_loss needs one loss per sequence, shape (batch,); got shape "
                           f"{tuple(loss_per_sequence.shape)}")
    total = routing_log_prob(model, loss_per_sequence.shape[0], attention_mask=attention_mask)
    if total is not None:
        total = total.to(loss_per_sequence.dtype)
    return blocks[0].patch.estimator.with_score(loss_per_sequence, total, loss_zero)


def routing_log_prob(model: nn.Module, batch: int, *, attention_mask: Tensor | None = None) -> Tensor | None:
    """log P of the routing sampled in the last forward, per sequence (batch,): summed over each sequence's tokens
    (those with `attention_mask` 1) and over every patched block; None when no block sampled a routing with a
    log-probability (any estimator but a score-function one)."""
    blocks = [m._gradest_patch for m in model.modules() if "_gradest_patch" in m.__dict__]
    total = None
    for block in blocks:
        log_prob = block.block.gradest_log_prob
        if log_prob is None:
            continue
        if log_prob.numel() % batch:
            raise GradestError(f"{block.name} routed {log_prob.numel()} tokens, not a multiple of the batch "
                               f"{batch}; valid: one loss per sequence of the last forward")
        log_prob = log_prob.reshape(batch, -1)
        if attention_mask is not None:
            if attention_mask.shape != log_prob.shape:
                raise GradestError(f"attention_mask has shape {tuple(attention_mask.shape)} but {block.name} "
                                   f"routed {tuple(log_prob.shape)} tokens; valid: the model input's mask")
            log_prob = log_prob * attention_mask.to(log_prob.dtype)
        total = log_prob.sum(-1) if total is None else total + log_prob.sum(-1)
    return total
