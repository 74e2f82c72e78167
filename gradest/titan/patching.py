"""Route a torchtitan mixture-of-experts model with a gradest estimator.

    import gradest.titan

    patched = gradest.titan.patch(model, "sparsemixer")   # or an Estimator object
    print(patched)                      # what was patched: module names, k, n
    ... train as usual ...
    patched.undo()                      # torchtitan's own routing again (also: `with gradest.titan.patch(...):`)

In torchtitan's trainer the same patch is applied by a model converter (gradest/titan/converter.py): from the
command line `--override.imports 'gradest.titan.converter.gradest_routing={"estimator": "sparsemixer"}'`, or in a
config function `model_registry(flavor, converters=[GradestRouting.Config(estimator="sparsemixer")])`.

`patch` replaces the routing RULE of every torchtitan MoE block (`torchtitan.models.common.moe.MoE`) and nothing
else: the router's gate (its weights, computed in float32 as torchtitan computes it), the token dispatcher (local,
or all-to-all under expert parallelism), the grouped experts, the shared experts, the token counts that feed
auxiliary-loss-free balancing (`tokens_per_expert_E`) all stay torchtitan's. gradest.titan is the only part of
gradest that imports torchtitan (`pip install 'gradest[titan]'`: torchtitan 0.3.x, tested with 0.3.0, and triton,
which `torchtitan.models` imports); the engine-neutral half (the estimator, the `Patched` handle, state buffers,
`score_loss`) is gradest/engines.py, shared with gradest.hf. The block layout below is torchtitan 0.3's; another
layout is refused in one line naming what is missing.

Native rule (TokenChoiceTopKRouter): z = gate(x) in float32; s = softmax(z) (or sigmoid(z)); the top-k of
s + `expert_bias_E` (within the `num_limited_groups` best expert groups, when grouped); gates s_i over the chosen,
renormalised when `route_norm`, times `route_scale`. Replaced: the estimator's routing of the same float32 logits z
(float64 in a float64 model); KEPT: `route_scale` multiplies the estimator's gates, and `renormalize` (topk,
densemixer, default-moe) defaults to `route_norm`. `topk` with those defaults reproduces the native softmax block
exactly when the expert bias is zero (tests/test_titan.py). `k` is the router's `top_k`: torchtitan's dispatcher
is built for that many choices per token, so another k is refused.

Estimators, by capability (the flags of docs/adding-an-estimator.md):
  sparse (topk, switch, first-order, sparsemixer, sparsemixer-v2, sparsemixer-v2*, default-moe, reinforce): the
      router returns the estimator's experts and gates in torchtitan's format, and torchtitan's own MoE forward
      dispatches them (all-to-all under expert parallelism) to its grouped experts; expert parallelism works
      unchanged.
  dense (st, gumbel-st, reinmax, rb-gumbel, gapped-st, densemixer): every expert runs on every token. Without
      expert parallelism the block's forward is replaced: the grouped experts run on n copies of the tokens (one
      group per expert, torchtitan's GroupedExperts, no dispatch) and the outputs are mixed with the estimator's
      dense gates. Under expert parallelism a rank holds only its experts, so a dense estimator would need every
      token sent to every rank: refused, in one line, at `patch` or when torchtitan parallelizes the block.
  stateful (default-moe): its state is buffers of the block, `gradest_state_<key>` (persistent: saved in the
      model's state_dict and torchtitan's checkpoints while patched; replicated, not sharded, by FSDP), registered
      by `patch` and re-initialised by the block's `init_states` (torchtitan builds on `meta`). The block's forward
      is replaced: torchtitan's routed experts (dispatch, experts, combine) run once per choice slot with unit
      scores (the dispatcher told one choice per token meanwhile), which gives each (token, choice) pair's expert
      output at the cost of the native call plus k - 1 dispatches; the estimator's `update_state` gets them after
      each training forward. Each rank updates its copy from its own tokens (as gradest's trainer does per rank).
  score function (reinforce): each block keeps the log-probability of the routing it sampled in
      `block.gradest_log_prob` (tokens,). torchtitan's loss is a token sum over the global token count with no
      score term; gradest's loss (`gradest.titan.converter.ScoreFunctionLoss`, on the command line
      `--override.imports gradest.titan.converter.gradest_score_loss`) computes each sequence's summed token
      cross-entropy f_b / N (N: torchtitan's global count of valid tokens), adds `estimator.with_score` over every
      block this process patched (`live_blocks`), and returns the same value: the routing of token t of sequence b
      affects only sequence b's loss, so log P(routing of b) pairs with f_b. From Python: `score_loss(model,
      loss_per_sequence)`. `baseline=mean` is the leave-one-out mean over the sequences of the local batch;
      `baseline=zero` (f(0), one extra forward) is not wired into torchtitan's trainer: use `none` or `mean` there.
  enumerating (exact): refused; it needs one downstream pass per expert tuple.

Auxiliary-loss-free balancing (`expert_bias_E`, DeepSeek-V3's bias, updated by torchtitan's optimizer hook from
`tokens_per_expert_E`): kept working. torchtitan adds the bias to the SCORES for selection only; gradest's
estimators are defined on a softmax of logits, so the bias enters the LOGITS. An estimator with the capability
`selection_bias` (topk, switch, first-order, sparsemixer, sparsemixer-v2, sparsemixer-v2*) gets it as its selection
bias, gradest's own rule for auxiliary-loss-free balancing (docs/estimators.md §5.1): the experts are chosen from
z + b (a sampling estimator DRAWS from the (masked) softmax of z + b, so expert i's odds are multiplied by e^{b_i}),
while the gates, and their gradient, stay those of the unbiased z at the chosen experts: the bias steers selection,
not gates. For `topk` this is the top-k of z + b, not torchtitan's top-k of softmax(z) + b (both favour experts
with a larger b and the counts drive the same sign update; with b = 0 the two agree exactly). The other sparse
estimators (default-moe, reinforce) have no selection rule: for them the bias is a logit offset, routing z + b,
so it moves their gates too (their gradient with respect to z keeps its form: b has none). With b = 0 (the initial
value, and `load_balance_coeff` None) every rule is the plain one.

Sigmoid-scored routers (torchtitan's DeepSeek-V3): the estimators are defined on a softmax, so `patch` refuses
them in one line unless `sigmoid="softmax"` is given, which converts with the rule gradest.hf uses for DeepSeek-V3
in transformers: the estimator's softmax routing of the same float32 logits over ALL experts (expert groups and
`num_limited_groups` dropped), `route_scale` kept on the gates, `renormalize` defaulting to `route_norm`, the
expert bias a logit offset as above. No estimator reproduces the native sigmoid rule.

Patch before torchtitan parallelizes the model (`parallelize_fn`: TP/EP's `Module.parallelize` wraps the router's
forward, FSDP's `fully_shard` hooks around it): the converter does so, since it acts on the config before the model
is built. A block already wrapped by `parallelize` is refused.

Routing noise: an estimator draws its uniforms with torch.rand (per rank: torchtitan seeds ranks alike or not by
its `debug.seed` settings); `Patched.noise`, a callable (module name, logits (tokens, n)) -> noise (tokens,
noise_dim), supplies them instead (reproducibility, cross-implementation checks).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradest import engines
from gradest.engines import Patched, routing_log_prob, score_loss  # noqa: F401  (gradest.titan's API)
from gradest.errors import GradestError
from gradest.estimators import GATED, REGISTRY, Estimator, trainable
from gradest.titan.models import moe_blocks

SIGMOID_RULES = ("refuse", "softmax")
_LIVE: "weakref.WeakSet[TitanBlock]" = weakref.WeakSet()  # every block patched in this process (for the loss)


def live_blocks() -> list["TitanBlock"]:
    """Every torchtitan block patched in this process and not undone (what `ScoreFunctionLoss` sums over)."""
    return [b for b in _LIVE if "_gradest_patch" in b.block.__dict__]


def expert_parallel(block: nn.Module) -> bool:
    """Whether the block's dispatcher has an expert-parallel mesh wired (torchtitan's EP, after parallelize)."""
    mesh = getattr(block.routed_experts.token_dispatcher, "ep_mesh", None)
    return mesh is not None and mesh.size() > 1


def dense_under_ep(estimator: Estimator, name: str) -> GradestError:
    return GradestError(f"estimator '{estimator.name}' is dense (every expert on every token) but {name or 'the block'} "
                        f"runs under expert parallelism, where a rank holds only its own experts; valid: a sparse "
                        f"estimator ({', '.join(n for n in trainable(GATED, estimator.k) if not REGISTRY[n].dense)}) "
                        f"or expert_parallel_degree 1")


@dataclass(eq=False)
class TitanBlock(engines.PatchedBlock):
    """One patched torchtitan MoE block (`gradest.engines.PatchedBlock`)."""

    def install(self) -> None:
        estimator, block = self.patch.estimator, self.block
        if estimator.dense and expert_parallel(block):
            raise dense_under_ep(estimator, self.name)
        if estimator.stateful:
            self.register_state(self.router.gate.weight.shape[-1], self.router.gate.weight.device)
            native_init = block._init_self_buffers

            def init_buffers(*, buffer_device=None):
                native_init(buffer_device=buffer_device)
                self.reset_state(buffer_device or block.tokens_per_expert_E.device)

            self.override(block, init_buffers, "_init_self_buffers")
        self.override(self.router, self.route)
        if estimator.dense:
            self.override(block, self.forward_dense)
        elif estimator.stateful:
            self.override(block, self.forward_per_slot)
        native_parallelize = block.parallelize

        def parallelize(parallel_dims):
            if estimator.dense and getattr(parallel_dims, "ep_enabled", False):
                raise dense_under_ep(estimator, self.name)
            return native_parallelize(parallel_dims)

        self.override(block, parallelize, "parallelize")
        self.mark()
        _LIVE.add(self)

    # -- the replacement forwards
    def route(self, x_BLD: Tensor, expert_bias_E: Tensor | None = None):
        """The router's forward: torchtitan's float32 logits, the estimator's routing (the balancing bias a logit
        offset), torchtitan's output format (gates (B, L, m), experts (B, L, m), softmax scores (B, L, n))."""
        router = self.router
        with torch.autocast(device_type=x_BLD.device.type, dtype=torch.float32):  # as torchtitan computes them
            logits = router.gate(x_BLD)
        z = logits.reshape(-1, self.n)
        z = z.to(engines.routing_dtype(z.dtype))
        bias = None
        if expert_bias_E is not None:
            if self.patch.estimator.selection_bias:  # selection only: the gates and their gradient stay z's
                bias = expert_bias_E.to(z.dtype)
            else:  # a logit offset: selection and gates both of z + b
                z = z + expert_bias_E.to(z.dtype)
        _, index, gates = self.decide(z, router.training, bias)
        if router.route_scale != 1:
            gates = gates * router.route_scale
        lead = x_BLD.shape[:-1]
        return gates.reshape(*lead, -1), index.reshape(*lead, -1), F.softmax(logits, dim=-1)

    def count(self, experts: Tensor) -> None:
        """torchtitan's expert usage count (it drives the balancing bias): the experts each token's forward value
        uses."""
        if self.block.training:
            with torch.no_grad():
                self.block.tokens_per_expert_E.add_(torch.bincount(experts.reshape(-1), minlength=self.n)
                                                    .to(self.block.tokens_per_expert_E.dtype))

    def shared(self, x_BLD: Tensor, out_BLD: Tensor) -> Tensor:
        experts = self.block.shared_experts
        return out_BLD if experts is None else out_BLD + experts(x_BLD)

    def forward_dense(self, x_BLD: Tensor) -> Tensor:
        """The block's forward for a dense estimator: every expert on every token through torchtitan's grouped
        experts (n groups of all T tokens), mixed with the estimator's dense gates (in inference, which routes the
        arg-max experts, torchtitan's dispatch)."""
        block = self.block
        if expert_parallel(block):
            raise dense_under_ep(self.patch.estimator, self.name)
        gates_BLM, experts_BLM, _ = block.router(x_BLD, block.expert_bias_E)
        B, L, D = x_BLD.shape
        T = B * L
        if self.routing is None:  # zero-output pass
            return self.shared(x_BLD, torch.zeros_like(x_BLD))
        if self.routing.experts is not None:  # inference routes the arg-max experts: torchtitan's dispatch
            counts = torch.bincount(experts_BLM.reshape(-1), minlength=self.n)
            self.count(experts_BLM)
            return self.shared(x_BLD, block.routed_experts(x_BLD, gates_BLM, experts_BLM, counts))
        x_TD = x_BLD.reshape(T, D)
        counts = torch.full((self.n,), T, dtype=torch.long, device=x_BLD.device)
        out = block.routed_experts.inner_experts(x_TD.repeat(self.n, 1), counts).reshape(self.n, T, D)
        gates_TN = gates_BLM.reshape(T, self.n)
        y = torch.einsum("ntd,tn->td", out.to(gates_TN.dtype), gates_TN).to(x_BLD.dtype)
        self.count(self.routed[1])
        return self.shared(x_BLD, y.reshape(B, L, D))

    @contextlib.contextmanager
    def one_choice(self):
        """torchtitan's dispatcher told one choice per token (it maps routed rows back to tokens by top_k)."""
        dispatcher = self.block.routed_experts.token_dispatcher
        top_k = dispatcher.top_k
        dispatcher.top_k = 1
        try:
            yield
        finally:
            dispatcher.top_k = top_k

    def forward_per_slot(self, x_BLD: Tensor) -> Tensor:
        """The block's forward for a stateful estimator: torchtitan's routed experts once per choice slot with unit
        scores (each pair's expert output), mixed with the gates; then the state update and the offset."""
        block = self.block
        gates_BLK, experts_BLK, _ = block.router(x_BLD, block.expert_bias_E)
        B, L, D = x_BLD.shape
        routing = self.routing
        if routing is None:
            return self.shared(x_BLD, torch.zeros_like(x_BLD))
        ones = gates_BLK.new_ones(B, L, 1)
        outputs = []
        with self.one_choice():
            for j in range(self.k):
                chosen = experts_BLK[..., j:j + 1]
                counts = torch.bincount(chosen.reshape(-1), minlength=self.n)
                outputs.append(block.routed_experts(x_BLD, ones, chosen, counts).reshape(B * L, D))
        gates_TK = gates_BLK.reshape(B * L, self.k)
        y = sum(out.to(gates_TK.dtype) * gates_TK[:, j:j + 1] for j, out in enumerate(outputs))
        if block.training:
            self.record_pairs(outputs)
        if routing.offset is not None:
            y = y + routing.offset[:, 0].to(y.dtype)
        self.count(experts_BLK)
        return self.shared(x_BLD, y.to(x_BLD.dtype).reshape(B, L, D))


def native_hparams(router, cls: type[Estimator]) -> dict:
    """Hyper-parameters of estimator class `cls` that a torchtitan router (or its config) fixes: `renormalize` =
    `route_norm`."""
    return {"renormalize": bool(router.route_norm)} if "renormalize" in cls.params else {}


def router_estimator(estimator: str | Estimator, routers: list, *, k: int | None = None, sigmoid: str = "refuse",
                     expert_parallel: bool = False, **hparams) -> Estimator:
    """The estimator that routes these torchtitan routers ((name, router) pairs; a router module or its config:
    both have top_k, num_experts, score_func and route_norm), or a one-line GradestError: a sigmoid-scored router
    without a rule, routers of different top_k, an estimator that cannot route them (`exact`, another k than
    top_k, too few experts), a dense estimator under expert parallelism. `patch` and the trainer launcher's
    pre-check (`gradest.titan.train`) both use it."""
    if sigmoid not in SIGMOID_RULES:
        raise GradestError(f"sigmoid must be one of {', '.join(SIGMOID_RULES)}, got {sigmoid!r}")
    for name, router in routers:
        if router.score_func != "softmax" and sigmoid == "refuse":
            raise GradestError(f"{name or 'the block'} scores experts with {router.score_func} (DeepSeek-V3 "
                               f"style); gradest's estimators are defined on a softmax; valid: sigmoid='softmax' "
                               f"(route the same logits by softmax over all experts, groups dropped) or a "
                               f"softmax-scored model such as Qwen3-MoE")
    native_ks = {int(router.top_k) for _, router in routers}
    if len(native_ks) > 1:
        raise GradestError(f"the MoE blocks route different numbers of experts ({sorted(native_ks)}); gradest.titan "
                           f"routes one k")
    native_k = native_ks.pop()
    first = routers[0][1]
    built = engines.build_estimator(estimator, k, native_k, lambda cls: native_hparams(first, cls),
                                    "torchtitan model", hparams, "gradest.titan", "top_k", other_k=False)
    if built.k != native_k:
        raise GradestError(f"k={built.k} but the torchtitan routers route top_k={native_k} and its token dispatcher "
                           f"is built for that; valid: k={native_k} (change the model's top_k for another)")
    for name, router in routers:
        built.check(int(router.num_experts), GATED)
        if built.dense and expert_parallel:
            raise dense_under_ep(built, name)
    return built


def patch(model: nn.Module, estimator: str | Estimator, *, k: int | None = None, sigmoid: str = "refuse",
          **hparams) -> Patched:
    """Route every torchtitan MoE block of `model` (or `model` itself, if it is one) with `estimator` (a name or
    spec such as "sparsemixer:jitter_eps=0.2", or an Estimator); returns the `Patched` handle (`undo()`, context
    manager). `k` is the router's `top_k` (another is refused: torchtitan's dispatcher is built for it);
    `sigmoid`: "refuse" (default) or "softmax" for sigmoid-scored routers (module docstring); `hparams` are the
    estimator's hyper-parameters. Raises a one-line GradestError for a model without a torchtitan MoE block, a
    torchtitan whose layout differs, an estimator that cannot route a block (`exact`; dense under expert
    parallelism; sigmoid scores without a rule)."""
    found = moe_blocks(model)
    for name, block in found:
        if "_gradest_patch" in block.__dict__:
            raise GradestError(f"{name or 'the block'} is already patched by gradest; undo() that patch first")
        if "forward" in block.router.__dict__:
            raise GradestError(f"{name or 'the block'}'s router forward is already wrapped (torchtitan's "
                               f"parallelize, or another patch); valid: patch before parallelizing the model")
    built = router_estimator(estimator, [(name, block.router) for name, block in found], k=k, sigmoid=sigmoid,
                             **hparams)
    patched = Patched(model, built)
    for name, block in found:
        patched.blocks.append(TitanBlock(name, f"torchtitan-{block.router.score_func}", built.k,
                                         int(block.router.num_experts), block, patched, block.router))
    for block in patched.blocks:
        block.install()
    return patched
