"""What every engine adapter shares: route a model's MoE blocks with a gradest estimator, whatever built the model.

gradest has two adapters, one concept: `gradest.hf.patch` (Hugging Face transformers) and `gradest.titan.patch`
(torchtitan). Each finds the MoE blocks of its engine, replaces their routing RULE (nothing else: the router's
weights, the experts, the engine's dispatch stay the engine's), reports what it patched and can undo it. The
engine-specific part is how a block computes its router logits and how a routing is handed back to the engine's
experts; the rest is here, engine-neutral (this module imports neither transformers nor torchtitan):

- `build_estimator`: the estimator from a name, spec ("sparsemixer-v2:jitter_eps=0.01") or Estimator object,
  with the defaults the model fixes (k, `renormalize`, ...), refused in one line where it cannot route a block
  (`exact` enumerates; a one-expert estimator where k > 1; a stateful dense one);
- `PatchedBlock`: one patched block. Installing and undoing overrides of its modules' methods, its state
  buffers (a stateful estimator's, `gradest_state_<key>`, registered on the block so that they move with the
  model and are saved in its state_dict while patched), `decide` (the estimator's routing of a block's logits,
  with the noise hook, the zero-output pass, the log-probability for score-function estimators and the detached
  record of the last routing) and `record_pairs` (a stateful estimator's update from each (token, choice) pair's
  expert output);
- `Patched`: the handle `patch` returns (`blocks`, `estimator`, `undo()`, a context manager, `zero_output()`,
  the `noise` hook);
- `score_loss` / `routing_log_prob`: a score-function estimator's term over every block carrying a patch, from
  the loss of each sequence.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from gradest.errors import GradestError
from gradest.estimators import GATED, REGISTRY, Estimator, EstimatorSpec, Routing, parse_spec, trainable

STATE_PREFIX = "gradest_state_"


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the model's dtype when wider (gradest's routing precision)."""
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------------------ the estimator
def build_estimator(estimator: str | Estimator, k: int | None, native_k: int, native: Callable, where: str,
                    hparams: dict, engine: str, k_name: str = "num_experts_per_tok",
                    other_k: bool = True) -> Estimator:
    """The estimator that will route a model's blocks: `estimator` (a name, a spec or an Estimator object, used
    as it is), `k` (default `native_k`, what the model routes), `hparams` by name; `native(cls)` gives the
    hyper-parameters of class `cls` that the model fixes (defaults unless given). `where` names the model in
    messages ("qwen3_moe model"), `engine` the adapter ("gradest.hf"), `k_name` the model's name for k; `other_k`:
    whether the engine can route another k than the model's."""
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
            raise enumerates_error(cls.name, k or native_k)
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
            why = f"this {where} routes {k_name}={k}" if k == native_k else f"k={k} was asked for"
            alternative = "; or pass k=1" if other_k else f" (or a model with {k_name}=1)"
            raise GradestError(f"estimator '{cls.name}' routes one expert per token but {why}; valid for k={k}: "
                               f"{', '.join(trainable(GATED, k))}{alternative}")
        built = EstimatorSpec(spec.name, tuple(own.items())).build(k, hparams, native(cls))
    if built.enumerates:
        raise enumerates_error(built.name, built.k)
    if GATED not in built.applies_to:
        raise GradestError(f"estimator '{built.name}' does not apply to a gated MoE layer; valid: "
                           f"{', '.join(trainable(GATED, built.k))}")
    if built.stateful and built.dense:
        raise GradestError(f"estimator '{built.name}' is stateful and dense: {engine} cannot route it")
    return built


def enumerates_error(name: str, k: int) -> GradestError:
    return GradestError(f"estimator '{name}' enumerates every expert tuple as a weighted branch (one downstream "
                        f"pass each) and cannot route a model's MoE block; valid: {', '.join(trainable(GATED, k))}")


# ---------------------------------------------------------------------------------------------- patched blocks
@dataclass(eq=False)
class PatchedBlock:
    """One patched MoE block: its module name, architecture, k, n. An engine's adapter subclasses it with the
    replacement forwards; what is shared (overrides and their undoing, state buffers, the routing decision, the
    stateful update) is here."""

    name: str
    architecture: str
    k: int
    n: int
    block: nn.Module = field(repr=False)
    patch: "Patched" = field(repr=False)
    router: nn.Module = field(repr=False)
    routing: Routing | None = field(default=None, init=False, repr=False)  # this forward's, for the experts
    # the last routing, detached, for statistics: logits z (T, n) and the experts (T, k) each token's forward value
    # uses (a dense estimator's: the top k of its gates); a zero-output pass leaves it
    routed: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False)
    kept: Tensor | None = field(default=None, init=False, repr=False)  # (T, k) pairs within capacity (Switch)
    _saved: list = field(default_factory=list, init=False, repr=False)  # (module, attribute, had it, old value)
    _buffers: list = field(default_factory=list, init=False, repr=False)

    # -- installing and undoing
    def override(self, module: nn.Module, function: Callable, attribute: str = "forward") -> None:
        """Replace `module`'s method `attribute` (its forward by default) by an instance attribute (hooks still
        run); undone by `restore`."""
        self._saved.append((module, attribute, attribute in module.__dict__, module.__dict__.get(attribute)))
        setattr(module, attribute, function)

    def register_state(self, d: int, device) -> None:
        """A stateful estimator's buffers on the block, `gradest_state_<key>` (n experts, output width d)."""
        for key, value in self.patch.estimator.init_state(self.n, d, device=device).items():
            name = STATE_PREFIX + key
            self.block.register_buffer(name, value)
            self._buffers.append(name)

    def reset_state(self, device=None) -> None:
        """The state buffers at their initial values again (on `device`, default where they are)."""
        for name in self._buffers:
            old = self.block._buffers[name]
            fresh = self.patch.estimator.init_state(self.n, old.shape[-1], device=device or old.device)
            self.block._buffers[name] = fresh[name[len(STATE_PREFIX):]]

    def mark(self) -> None:
        """Attributes every patched block carries: the log-probability of its last sampled routing, the patch."""
        self.block.gradest_log_prob = None
        self.block._gradest_patch = self

    def restore(self) -> None:
        for module, attribute, had, old in reversed(self._saved):
            if had:
                setattr(module, attribute, old)
            else:
                delattr(module, attribute)
        self._saved.clear()
        for name in self._buffers:
            del self.block._buffers[name]
        self._buffers.clear()
        for attribute in ("gradest_log_prob", "_gradest_patch"):
            self.block.__dict__.pop(attribute, None)
        self.routing = self.kept = self.routed = None

    def state(self) -> dict[str, Tensor] | None:
        if not self.patch.estimator.stateful:
            return None
        return {name[len(STATE_PREFIX):]: getattr(self.block, name) for name in self._buffers}

    # -- routing
    def decide(self, z: Tensor, training: bool, bias: Tensor | None = None) -> tuple[Routing | None, Tensor, Tensor]:
        """The estimator's routing of the block's logits z (T, n), in the routing dtype: (routing, index, gates)
        with `index` (T, m) the experts each token's gates weigh (all n for a dense estimator) and `gates` (T, m).
        `bias` (n,): a selection bias (auxiliary-loss-free balancing) for an estimator with `selection_bias`.
        In the zero-output pass (`Patched.zero_output`) nothing is drawn: routing None, each token's arg-max
        experts with gates 0, and the sampled log-probability is kept."""
        estimator, patch = self.patch.estimator, self.patch
        if patch.zeroed:
            self.routing = None
            index = z.detach().topk(self.k, -1).indices
            return None, index, z.new_zeros(index.shape)
        noise = patch.noise(self.name, z) if training and patch.noise is not None else None
        routing = estimator.route(z, kind=GATED, training=training, noise=noise, state=self.state(), bias=bias)
        gates = routing.gates[:, 0]
        if routing.experts is None:  # dense: every expert, with the estimator's dense gates
            index = torch.arange(self.n, device=z.device).expand(z.shape[0], self.n)
        else:
            index = routing.experts[:, 0]
        self.routing = routing
        self.routed = (z.detach(), index.detach() if routing.experts is not None else
                       gates.detach().topk(self.k, -1).indices)
        self.block.gradest_log_prob = routing.log_prob
        return routing, index, gates

    def record_pairs(self, outputs: list[Tensor]) -> None:
        """A stateful estimator's update after a training forward: `outputs[j]` (T, d) is each token's j-th chosen
        expert's output (its pairs outside capacity, `kept`, left out)."""
        experts = self.routing.experts[:, 0].T.reshape(-1)  # pair j * T + t: token t's j-th choice
        pair_outputs = torch.cat(outputs).detach()
        if self.kept is not None:
            keep = self.kept.T.reshape(-1)
            experts, pair_outputs = experts[keep], pair_outputs[keep]
        self.patch.estimator.update_state(self.state(), experts, pair_outputs)


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


def patched_blocks(model: nn.Module) -> list[PatchedBlock]:
    """Every block of `model` that carries a gradest patch, in module order."""
    return [m._gradest_patch for m in model.modules() if "_gradest_patch" in m.__dict__]


# ---------------------------------------------------------------------------------------------- score function
def score_loss(model: nn.Module, loss_per_sequence: Tensor, *, loss_zero: Tensor | None = None,
               attention_mask: Tensor | None = None) -> Tensor:
    """The loss to back-propagate for a score-function estimator (reinforce): `estimator.with_score` of the loss
    of each sequence (batch,) with the log-probability of the routing sampled for its tokens, summed over every
    patched block. Its value is `loss_per_sequence`; for any other estimator it is `loss_per_sequence` itself.
    `attention_mask` (batch, seq): tokens with 0 add no log-probability (decoder-only models). `loss_zero`: the
    loss with the routed outputs zeroed (`Patched.zero_output()`), for `baseline=zero`."""
    blocks = patched_blocks(model)
    if not blocks:
        raise GradestError("score_loss needs a model patched by gradest (gradest.hf.patch or gradest.titan.patch); "
                           "valid: call patch(model, 'reinforce') first")
    return blocks_score_loss(blocks, loss_per_sequence, loss_zero=loss_zero, attention_mask=attention_mask)


def blocks_score_loss(blocks: list[PatchedBlock], loss_per_sequence: Tensor, *, loss_zero: Tensor | None = None,
                      attention_mask: Tensor | None = None) -> Tensor:
    """`score_loss` over the given patched blocks (an engine whose loss does not hold the model finds them
    otherwise)."""
    if loss_per_sequence.dim() != 1:
        raise GradestError(f"score_loss needs one loss per sequence, shape (batch,); got shape "
                           f"{tuple(loss_per_sequence.shape)}")
    total = blocks_log_prob(blocks, loss_per_sequence.shape[0], attention_mask=attention_mask)
    if total is not None:
        total = total.to(loss_per_sequence.dtype)
    return blocks[0].patch.estimator.with_score(loss_per_sequence, total, loss_zero)


def routing_log_prob(model: nn.Module, batch: int, *, attention_mask: Tensor | None = None) -> Tensor | None:
    """log P of the routing sampled in the last forward, per sequence (batch,): summed over each sequence's tokens
    (those with `attention_mask` 1) and over every patched block; None when no block sampled a routing with a
    log-probability (any estimator but a score-function one)."""
    return blocks_log_prob(patched_blocks(model), batch, attention_mask=attention_mask)


def blocks_log_prob(blocks: list[PatchedBlock], batch: int, *,
                    attention_mask: Tensor | None = None) -> Tensor | None:
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


# ----------------------------------------------------------------------------------------- the probe's site
class BlockSlot:
    """Stands in for gradest's `MoE` layer in gradest.probe's functions, for one engine block: assigning
    `estimator` patches that block alone with it (`install`, the adapter's), assigning None restores the engine's
    own routing. `k` is kept for `installed`, which saves and restores it; `aux.log_prob` is what a
    score-function estimator left on the block."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.k = None
        self.patched: Patched | None = None
        self.aux = self  # `aux.log_prob`, as an MoE layer's aux has it

    @property
    def log_prob(self) -> Tensor | None:
        return getattr(self.block, "gradest_log_prob", None)

    @property
    def estimator(self) -> Estimator | None:
        return None if self.patched is None else self.patched.estimator

    @estimator.setter
    def estimator(self, value: Estimator | None) -> None:
        if self.patched is not None:
            self.patched.undo()
            self.patched = None
        if value is not None:
            self.patched = self.install(value)

    def install(self, estimator: Estimator) -> Patched:
        """Override: patch this block, and no other, with `estimator`."""
        raise NotImplementedError


@contextmanager
def frozen(model: nn.Module):
    """The model's parameters need no gradient inside (the probe differentiates w.r.t. leaf logits only, so the
    graph through the weights is dead weight); restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
