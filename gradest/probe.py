"""The router-gradient probe (docs/estimators.md §4.5 "The exact reference on a transformer"), and its site on a
gradest Switch Transformer (`SwitchSite`); gradest.hf.probe's `HFSite` is the same on a Hugging Face model.

For one MoE layer l of a model, every other MoE layer routes deterministically (inference routing) and dropout is
off (the model is put in eval mode); layer l alone routes with an estimator in training mode. L is the loss of a
fixed batch of sequences: the mean over sequences of each sequence's mean token cross-entropy (the loss the Trainer
minimises, without the auxiliary losses). The exact objective is

    J = E_{D ~ p}[ L(D) ],   D = every token's expert tuple at layer l, tokens independent,

with p the (masked) softmax of the objective each estimator samples from (its `objective()`: k, mask, temperature),
the gates from the same softmax (estimators.md §2). The probe measures each estimator's gradient of J with respect to
layer l's router weights (or its logits) against a reference:

- exact enumeration, when the expert assignments are few;
- otherwise a Rao-Blackwellised Monte-Carlo reference: draw D; for each token t, the conditional gradient
  grad_{z_t} E_{D_t}[L | D_{-t}] = sum_a grad_{z_t}[P_t(a) L(D_{-t}, D_t = a)] exactly, by re-running the layers
  above l once per alternative a of t (all variants batched); averaged over S draws, with its standard error.

How the work is organised:
- The activations below layer l do not depend on its routing: they are computed once (`Site`), and every
  evaluation re-runs only the layers above, on a batch of "rows" (copies of sequences of the batch).
- Sequences of a batch never interact (attention is within a sequence, and capacity limits, the one thing that
  would couple them, are refused), so L = mean_b L_b and J = mean_b E[L_b]: enumeration runs over each
  sequence's assignments separately (sum_b A^{T_b} rows, not A^T), and a Rao-Blackwell variant of token t
  re-runs only t's sequence. Tokens whose routing cannot reach the loss (padding; decoder positions after the
  last counted target) are routed to their arg-max and left out of the enumeration (their exact gradient is 0).
- Zero-probability experts (masked by a sparsity mask) are skipped: their terms vanish with their gradient.
- Router-weight gradients are sum_t grad z_t (outer) x_t with x_t layer l's input: one backward gives the
  logits' gradients of every row (the logits are made a leaf inside the layer, so autograd stops there).
- Estimator samples: the batch is replicated K times in one forward and one backward (chunked to bound
  memory); sample k's routing noise is `torch.rand(tokens, noise_dim)` from a generator seeded with
  `sample_seeds(seed, K)[k]`, exactly what the layer would draw itself after `torch.manual_seed` of that seed.

- Score-function estimators (REINFORCE) get f and log P per sequence, its surrogate averaged over the batch, as
  the Trainer computes them (score="sequence"; unbiased because sequences do not interact), or f = L and log P
  over the whole batch's tokens at layer l (score="batch"). Its f(0) baseline zeroes layer l's output only.
  Tokens that cannot reach the loss are routed by the estimator like any other (as in training).
- A Monte-Carlo reference is noisy itself: `gradest.measure.bias_variance_mc` removes its noise from the squared
  bias (an unbiased two-sample U-statistic) and widens the intervals by a jackknife over its draws.

`probe(model, batch, layer, estimators, samples, ...)` returns rows in the format of `gradest.measure.compare`
plus `reference` ("enumeration" or "rao-blackwell"), `reference_se` (its standard error's norm over its norm, 0
for enumeration), `reference_draws` (S, 0 for enumeration), `reference_rows` (sequences the layers above l ran
to compute it), `reference_seconds`, `layer`, `batch_size`, `seq_len` and `relevant_tokens`; `tokens` counts
every token at layer l and `sharpness` is the RMS of layer l's router logits on the batch (the scale the
synthetic problems' `sharpness` sets; the report groups rows by it). `switch_probe(task)` builds a tiny Switch
Transformer and a fixed batch and probes it.
"""

from __future__ import annotations

import itertools
import math
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import Tensor, nn

from gradest.engines import frozen
from gradest.errors import GradestError
from gradest.estimators import GATED, Estimator, Objective, Routing
from gradest.estimators import expand_estimators
from gradest.measure import bias_variance, bias_variance_mc
from gradest.model import SwitchConfig, SwitchLM, SwitchModel, SwitchSeq2Seq, token_cross_entropy
from gradest.moe import MoE
from gradest.progress import Pace

REFERENCES = ("auto", "enumeration", "rao-blackwell")
PROBE_WRT = ("router", "logits")
SCORES = ("sequence", "batch")
MAX_ENUMERATION = 2 ** 22  # sequences an explicitly requested enumeration may run
TASK_PROBLEM = {"lm": "switch-lm", "mt": "switch-mt"}


# ------------------------------------------------------------------------------------------ routing at layer l
class _ProbeRouting(Estimator):
    """Base of the probe's routing rules: they stand in for layer l's estimator (the layer never knows), route
    the same way in training and inference, and make the logits they receive a leaf (`self.logits`), so that one
    backward yields every row's logit gradients and stops there."""

    family = "probe"
    reference = "docs/estimators.md §4: exact reference on a transformer"
    supports_topk = True

    def __init__(self, leaf: bool = True):
        super().__init__()
        self.leaf = leaf
        self.logits: Tensor | None = None

    def capture(self, logits: Tensor) -> Tensor:
        self.logits = logits.detach().requires_grad_() if self.leaf else logits
        return self.logits

    def noise_dim(self, n):
        return 0


def unbiased(bias) -> None:
    """The probe measures the router's own objective: a layer that selects with an auxiliary-loss-free balancing
    bias is another objective, which it does not enumerate."""
    if bias is not None:
        raise GradestError("the router probe measures MoE layers without a selection bias; this model was trained "
                           "with auxiliary-loss-free balancing (balance_bias_rate > 0); valid: a model trained "
                           "without it")


class ForcedRouting(_ProbeRouting):
    """Routes token t to the given experts `experts[t]` (tokens, k), with gates p^(j)_{D_j} from the objective's
    sequential (masked) softmax, with autograd (docs/estimators.md §2): the layer then computes L(D) for a chosen
    assignment D, and `gates.prod(-1)` is each token's probability P_t(D_t) under the objective."""

    name = "forced"

    def __init__(self, objective: Objective, experts: Tensor, leaf: bool = True):
        super().__init__(leaf)
        self.obj, self.experts = objective, experts
        self.gates: Tensor | None = None

    @property
    def k(self) -> int:
        return self.obj.k

    def objective(self) -> Objective:
        return self.obj

    def route(self, logits, *, kind=GATED, training=True, noise=None, state=None, bias=None) -> Routing:
        unbiased(bias)
        self.check(logits.shape[-1], kind)
        if self.experts.shape != (*logits.shape[:-1], self.k):
            raise GradestError(f"forced routing got experts of shape {tuple(self.experts.shape)} for logits of "
                               f"shape {tuple(logits.shape)}")
        z = self.capture(logits)
        experts, self.gates, _ = self.obj.route(z, experts=self.experts)
        return Routing(experts.unsqueeze(-2), self.gates.unsqueeze(-2))


class _Sampled(_ProbeRouting):
    """An estimator routing in training mode with given noise (tokens, noise_dim), whatever the layer's mode, and
    a stateful estimator with the given state (`Site.estimator_state`; itself stateless, so the layer keeps and
    updates no buffers for it)."""

    name = "sampled"

    def __init__(self, estimator: Estimator, noise: Tensor, leaf: bool = True,
                 state: dict[str, Tensor] | None = None):
        super().__init__(leaf)
        self.estimator, self.noise, self.state = estimator, noise, state

    @property
    def k(self) -> int:
        return self.estimator.k

    def route(self, logits, *, kind=GATED, training=True, noise=None, state=None, bias=None) -> Routing:
        unbiased(bias)
        z = self.capture(logits)
        return self.estimator.route(z, kind=kind, training=True, noise=self.noise.to(z.dtype), state=self.state)


@contextmanager
def installed(layer: MoE, estimator: Estimator):
    """Layer l holds `estimator` (and routes its k experts per token) inside the block, its own outside."""
    saved = layer.estimator, layer.k
    layer.estimator, layer.k = estimator, estimator.k
    try:
        yield estimator
    finally:
        layer.estimator, layer.k = saved


@contextmanager
def probing(model: SwitchModel):
    """The model in eval mode (dropout off, every MoE layer on inference routing) for the block; every module's
    mode restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


# --------------------------------------------------------------------------------------------------- the site
class Site(ABC):
    """Layer l of a model on a batch, as the probe's functions (`probe_site`, the references,
    `layer_gradient_samples`, `surrogate_loss`) use it. Implementations: `SwitchSite` (a gradest Switch
    Transformer), and the `EngineSite`s `gradest.hf.probe.HFSite` (a transformers model) and
    `gradest.titan.probe.TitanSite` (a torchtitan model); each is built as `Site(model, batch, layer)`.

    Attributes: `model` (the functions put it in `probing` mode), `problem` (the rows' problem name), `index`
    (layer l among the model's MoE layers), `layer` (what holds layer l's routing rule: `installed` sets its
    `estimator` and `k`, and `layer.aux.log_prob` is the log-probability a score-function estimator left), `device`,
    `u` the input of layer l's router (B, T, d), `z0` its router logits (B, T, n), `relevant` (B, T) the tokens whose
    routing can change L, and the sizes `B`, `T`, `d`, `n`. The objective's maths on the logits is shared here; what
    runs the model is each implementation's.
    """

    model: nn.Module
    problem: str
    index: int
    layer: object
    device: torch.device
    u: Tensor
    z0: Tensor
    relevant: Tensor
    B: int
    T: int
    d: int
    n: int

    @abstractmethod
    def losses(self, rows: Tensor) -> Tensor:
        """Each row's sequence loss L_b (R,), rows (R,) being sequence indices of the batch: layer l routed by
        whatever rule `layer` holds. Expects the model in `probing` mode."""

    @abstractmethod
    def zero_losses(self) -> Tensor:
        """Each sequence's loss with layer l's routed output set to 0 (REINFORCE's f(0) baseline), (B,)."""

    @abstractmethod
    def estimator_state(self, estimator: Estimator) -> dict[str, Tensor] | None:
        """A stateful estimator's state at layer l (None for the others), or a one-line refusal."""

    @abstractmethod
    def chunk_rows(self, max_elements: int, dense: bool = True) -> int:
        """Rows (sequences) per forward pass so that the widest activation holds about max_elements."""

    # the objective at layer l
    def tuples(self, k: int) -> Tensor:
        """Every ordered k-tuple of distinct experts (A, k)."""
        return torch.tensor(list(itertools.permutations(range(self.n), k)), dtype=torch.long, device=self.device)

    def tuple_probs(self, objective: Objective) -> Tensor:
        """P_t(a) (B, T, A): each token's probability of each tuple under the objective (no gradient)."""
        tuples = self.tuples(objective.k)
        z = self.z0.detach().unsqueeze(-2)  # (B, T, 1, n) against (B, T, A, k)
        _, gates, _ = objective.route(z, experts=tuples.expand(self.B, self.T, *tuples.shape))
        return gates.prod(-1)

    def argmax_experts(self, k: int) -> Tensor:
        """Inference routing's experts (B, T, k): where the tokens that cannot change L are sent."""
        return Objective(k).route(self.z0.detach())[0]

    def router_gradient(self, grad_z: Tensor) -> Tensor:
        """Router-weight gradients (..., n * d) from logit gradients (..., B, T, n): sum_t grad z_t (outer) x_t."""
        return torch.einsum("...btn,btd->...nd", grad_z.double(), self.u.double()).flatten(-2)


class _Captured(Exception):
    """Stops a forward pass at the module whose input `captured_input` wants."""


def captured_input(module: nn.Module, run: Callable[[], object]) -> Tensor:
    """The first input `module` receives while `run()` runs a forward pass (detached, a copy); the pass stops there,
    so nothing after the module is computed."""
    seen = {}

    def hook(module, args):
        seen["x"] = args[0].detach().clone()
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["x"]


class EngineSite(Site):
    """A `Site` whose layer l is an engine's MoE block patched through `gradest.engines.BlockSlot`
    (`gradest.hf.probe.HFSite`, `gradest.titan.probe.TitanSite`): each implementation gives `forward(rows)`, the
    model's logits on copies of those sequences, and `targets`, `ignore`, `counts`; the losses are shared. `engine`
    names it in messages."""

    engine: str
    targets: Tensor
    ignore: int
    counts: Tensor
    _zero_losses: Tensor | None = None

    @abstractmethod
    def forward(self, rows: Tensor) -> Tensor:
        """The model's logits on copies of the sequences `rows`."""

    def losses(self, rows: Tensor) -> Tensor:
        """Each row's sequence loss (R,): the whole model on copies of those sequences, block l routed by what
        the slot holds, the other blocks natively (their parameters frozen: only layer l's gradient is wanted)."""
        with frozen(self.model):
            logits = self.forward(rows)
        return token_cross_entropy(logits, self.targets[rows], self.ignore).sum(-1) / self.counts[rows]

    def zero_losses(self) -> Tensor:
        """Each sequence's loss with block l's routed output zeroed (REINFORCE's f(0) baseline), (B,). Called while
        the slot holds an estimator (inside `installed`)."""
        if self._zero_losses is None:
            if self.layer.patched is None:
                raise GradestError("zero_losses needs block L patched")
            with self.layer.patched.zero_output(), probing(self.model), torch.no_grad():
                self._zero_losses = self.losses(torch.arange(self.B, device=self.device))
        return self._zero_losses

    def estimator_state(self, estimator: Estimator) -> None:
        if estimator.stateful:
            raise GradestError(f"estimator '{estimator.name}' is stateful: the {self.engine} probe does not seed "
                               f"its state; probe it on --problem switch-lm")
        return None


class SwitchSite(Site):
    """Layer l of a gradest Switch Transformer on a batch: the activations below it computed once, the layers above
    re-run on rows.

    batch: (idx, targets) for a SwitchLM, (src, tgt_in, tgt_out) for a SwitchSeq2Seq. `layer` is the MoE layer
    itself; `relevant` leaves out padding and the decoder positions after the last counted target.
    """

    def __init__(self, model: SwitchModel, batch, layer: int = 0):
        if not isinstance(model, (SwitchLM, SwitchSeq2Seq)):
            raise GradestError(f"the probe needs a SwitchLM or SwitchSeq2Seq, got {type(model).__name__}")
        layers = model.moe_layers()
        if not layers:
            raise GradestError("the model has no MoE layer to probe (moe_every=0 is the dense baseline)")
        if not isinstance(layer, int) or not -len(layers) <= layer < len(layers):
            raise GradestError(f"layer must be an MoE layer index in 0..{len(layers) - 1}, got {layer!r}")
        for m in layers:
            if m.capacity_factor is not None:
                raise GradestError("the probe replicates the batch in one forward pass, which a capacity limit "
                                   "would couple (tokens beyond capacity depend on the other copies); use a model "
                                   "with capacity_factor=None")
        self.model, self.index, self.layer = model, layer % len(layers), layers[layer]
        stacks = [("decoder", model.decoder)] if isinstance(model, SwitchLM) else \
            [("encoder", model.encoder), ("decoder", model.decoder)]
        self.where, self.stack, self.block_index = next(
            (where, stack, i) for where, stack in stacks for i, block in enumerate(stack.blocks)
            if block.ffn is self.layer)
        self.block = self.stack.blocks[self.block_index]
        self.device = self.layer.router.weight.device
        if isinstance(model, SwitchLM):
            self.problem = "switch-lm"
            if len(batch) != 2:
                raise GradestError("a SwitchLM batch is (idx, targets)")
            idx, targets = (t.to(self.device) for t in batch)
            self.ignore = model.config.pad_id
            self.inputs = {"idx": idx}
        else:
            self.problem = "switch-mt"
            if len(batch) != 3:
                raise GradestError("a SwitchSeq2Seq batch is (src, tgt_in, tgt_out)")
            src, tgt_in, targets = (t.to(self.device) for t in batch)
            self.ignore = model.pad_id
            self.inputs = {"src": src, "src_pad": src == model.pad_id, "tgt_in": tgt_in}
        self.targets = targets
        self.counted = targets != self.ignore
        self.counts = self.counted.sum(-1).clamp_min(1)
        with probing(model), torch.no_grad():
            self.h, self.memory = self.prefix()
            self.u = captured_input(self.layer, lambda: self.block.ffn_residual(self.h))
            B, T, d = self.u.shape
            self.z0 = self.layer.router_logits(self.u.reshape(B * T, d)).reshape(B, T, -1)
        self.B, self.T, self.d, self.n = B, T, d, self.z0.shape[-1]
        if self.where == "encoder":  # padding is never attended to (self- and cross-attention masks)
            self.relevant = ~self.inputs["src_pad"] & self.counted.any(-1, keepdim=True)
        else:  # causal: position p reaches the outputs at positions >= p
            self.relevant = self.counted.flip(-1).cumsum(-1).flip(-1) > 0
        self._zero_losses = None

    # the layers below l, once
    def context(self, rows: Tensor | None = None) -> tuple:
        """(memory, memory_padding, self_padding) that the blocks of the stack holding layer l take."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        if self.where == "encoder":
            return None, None, pick(self.inputs["src_pad"])
        if self.memory is None:
            return None, None, None
        return pick(self.memory), pick(self.inputs["src_pad"]), None

    def prefix(self):
        memory = None
        if self.where == "encoder":
            ids = self.inputs["src"]
        elif self.problem == "switch-mt":
            ids = self.inputs["tgt_in"]
            memory = self.model.encode(self.inputs["src"])[0]
        else:
            ids = self.inputs["idx"]
        self.memory = memory
        ctx = self.context()
        # the blocks below l, then block l up to its feed-forward branch
        x = self.stack.run(self.stack.embed(ids), 0, self.block_index, *ctx)
        return self.block.before_ffn(x, *ctx), memory

    # the layers above l, per row
    def losses(self, rows: Tensor) -> Tensor:
        """Each row's sequence loss L_b (R,), rows (R,) being sequence indices of the batch: layer l and the
        layers above run on copies of those sequences, layer l routed by whatever estimator it holds."""
        x = self.block.ffn_residual(self.h[rows])
        x = self.stack.norm(self.stack.run(x, self.block_index + 1, None, *self.context(rows)))
        if self.where == "encoder":
            logits = self.model.decode(self.inputs["tgt_in"][rows], x, self.inputs["src_pad"][rows])
        else:
            logits = self.model.head(x)
        # the model's own per-token loss (float32 or wider: a float64 model keeps float64)
        return token_cross_entropy(logits, self.targets[rows], self.ignore).sum(-1) / self.counts[rows]

    def zero_losses(self) -> Tensor:
        """Each sequence's loss with layer l's output set to 0 (REINFORCE's f(0) baseline), (B,)."""
        if self._zero_losses is None:
            self.layer.zero_output = True
            try:
                with probing(self.model), torch.no_grad():
                    self._zero_losses = self.losses(torch.arange(self.B, device=self.device))
            finally:
                self.layer.zero_output = False
        return self._zero_losses

    def estimator_state(self, estimator: Estimator) -> dict[str, Tensor] | None:
        """A stateful estimator's state at layer l (None for the others): a copy of the layer's buffers when the
        layer holds an estimator of that kind (the state its training left), else the state training would
        converge to with the parameters held fixed (`steady_state` of every expert's output on the batch's tokens
        and their logits), as the synthetic problems take it."""
        if not estimator.stateful:
            return None
        if type(self.layer.estimator) is type(estimator):
            return {key: value.clone() for key, value in self.layer.estimator_state().items()}
        with probing(self.model), torch.no_grad():
            outputs = self.layer.expert_ffn(self.u.reshape(-1, self.d), self.layer.w_in, self.layer.b_in,
                                            self.layer.w_out, self.layer.b_out)  # (n, tokens, d)
            return estimator.steady_state(outputs.transpose(0, 1), self.z0.reshape(-1, self.n))

    def chunk_rows(self, max_elements: int, dense: bool = True) -> int:
        """Rows (sequences) per forward pass so that the widest activation holds about max_elements."""
        cfg = self.model.config
        width = max(cfg.vocab_size, 4 * cfg.d_model, (self.n if dense else 1) * cfg.d_ff)
        if self.memory is not None or self.where == "encoder":
            width *= 2  # an encoder-decoder holds both sides' activations
        return max(1, max_elements // (self.T * width))


def forced_gradients(site: Site, objective: Objective, rows: Tensor, experts: Tensor, weight_mask: Tensor,
                     grad_mask: Tensor) -> Tensor:
    """grad_z of sum_rows w_row L_row / B, each row's weight w the product of P_t(D_t) over its tokens in
    weight_mask: rows (R,) sequence indices, experts (R, T, k), masks (R, T). Returns the logit gradients
    (R, T, n) where grad_mask is set, 0 elsewhere, in float64."""
    R, T = experts.shape[:2]
    forced = ForcedRouting(objective, experts.reshape(R * T, -1))
    with probing(site.model), installed(site.layer, forced), torch.enable_grad():
        losses = site.losses(rows)
        p = forced.gates.prod(-1).reshape(R, T)
        weight = torch.where(weight_mask, p, torch.ones_like(p)).prod(-1)
        (grad,) = torch.autograd.grad((weight * losses).sum() / site.B, forced.logits)
    return grad.reshape(R, T, -1).double() * grad_mask.unsqueeze(-1)


# ------------------------------------------------------------------------------------------------- references
@dataclass
class Reference:
    """The reference gradient of one objective: `kind` enumeration (exact) or rao-blackwell (Monte-Carlo), the
    per-token logit gradient (B, T, n) and, for rao-blackwell, one such gradient per draw (S, B, T, n)."""

    kind: str
    objective: Objective
    grad_z: Tensor
    draws: Tensor | None
    rows: int  # sequences the layers above l were run on
    seconds: float

    def values(self, site: Site, wrt: str) -> Tensor:
        """The reference (P,), or its draws (S, P) when Monte-Carlo."""
        g = self.grad_z if self.draws is None else self.draws
        return site.router_gradient(g) if wrt == "router" else g.flatten(-3)

    def relative_se(self, site: Site, wrt: str) -> float:
        """||standard error|| / ||reference||: 0 for enumeration."""
        if self.draws is None:
            return 0.0
        draws = self.values(site, wrt)
        mean = draws.mean(0)
        se = math.sqrt(float(draws.var(0).sum()) / draws.shape[0])
        return se / max(float(mean.norm()), 1e-300)


def enumeration_rows(site: Site, objective: Objective) -> int:
    """Sequences enumeration runs: sum over the batch of the product over relevant tokens of allowed tuples."""
    allowed = (site.tuple_probs(objective) > 0).sum(-1)
    return sum(math.prod(int(a) for a, r in zip(row, rel) if r) for row, rel in
               zip(allowed.tolist(), site.relevant.tolist()) if any(rel))


def enumerate_reference(site: Site, objective: Objective, max_elements: int = 2 ** 22) -> Reference:
    """grad_z J exactly: for each sequence, every assignment of tuples with positive probability to its relevant
    tokens (the others at their arg-max), as rows weighted by prod_t P_t(D_t); autograd of sum_rows w L / B."""
    start = time.perf_counter()
    k = objective.k
    tuples = site.tuples(k)
    allowed = site.tuple_probs(objective) > 0
    base = site.argmax_experts(k)
    grad = torch.zeros(site.B, site.T, site.n, dtype=torch.float64, device=site.device)
    pieces = []  # (sequence, experts (C, T, k), relevant positions)
    for b in range(site.B):
        positions = site.relevant[b].nonzero().flatten()
        if len(positions) == 0:
            continue
        choices = [allowed[b, p].nonzero().flatten() for p in positions.tolist()]
        combos = torch.cartesian_prod(*choices) if len(choices) > 1 else choices[0][:, None]
        experts = base[b].expand(len(combos), -1, -1).clone()
        experts[:, positions] = tuples[combos]
        pieces.append((b, experts))
    chunk = site.chunk_rows(max_elements)
    rows, what = 0, f"exact reference for {objective.label} (enumeration)"
    pace = Pace(sum(len(experts) for _, experts in pieces), f"sequences of {site.T} tokens")
    for b, experts in pieces:
        mask = site.relevant[b].expand(chunk, -1)
        for part in experts.split(chunk):
            sequences = torch.full((len(part),), b, dtype=torch.long, device=site.device)
            grad[b] += forced_gradients(site, objective, sequences, part, mask[:len(part)],
                                        mask[:len(part)]).sum(0)
            rows += len(part)
            pace.tick(rows, what)
    return Reference("enumeration", objective, grad, None, rows, time.perf_counter() - start)


def rao_blackwell_reference(site: Site, objective: Objective, draws: int = 64, seed: int = 0,
                            max_elements: int = 2 ** 22) -> Reference:
    """An unbiased Monte-Carlo reference with a standard error. Draw S assignments D ~ p (all tokens); for draw
    s and each relevant token t, grad_{z_t} E_{D_t}[L | D_{-t}] = sum_a grad_{z_t}[P_t(a) L(D_{-t}, a)] exactly,
    from one row per alternative a with P_t(a) > 0 (t's sequence only: the others' losses do not change). The
    S per-draw gradients are independent and unbiased for grad_z J."""
    if not isinstance(draws, int) or draws < 3:
        raise GradestError(f"draws must be an integer >= 3 (the reference's standard error needs them), "
                           f"got {draws!r}")
    start = time.perf_counter()
    k, B, T, n = objective.k, site.B, site.T, site.n
    tuples = site.tuples(k)
    generator = torch.Generator().manual_seed(2 * seed + 1)  # a stream apart from the samples' (2 * seed)
    u = torch.rand(draws, B * T, k, generator=generator, dtype=torch.float64).to(site.device, site.z0.dtype)
    z = site.z0.detach().reshape(1, B * T, n).expand(draws, -1, -1)
    drawn = objective.route(z, u=u)[0].reshape(draws, B, T, k)
    drawn = torch.where(site.relevant[..., None], drawn, site.argmax_experts(k))
    variants = ((site.tuple_probs(objective) > 0) & site.relevant[..., None]).nonzero()  # (V, 3): b, t, a
    V = len(variants)
    out = torch.zeros(draws * B, T, n, dtype=torch.float64, device=site.device)
    chunk = site.chunk_rows(max_elements)
    positions = torch.arange(T, device=site.device)
    what = f"exact reference for {objective.label} (Rao-Blackwell, {draws} draws)"
    pace = Pace(draws * V, f"sequences of {T} tokens")
    for first in range(0, draws * V, chunk):
        flat = torch.arange(first, min(first + chunk, draws * V), device=site.device)
        s, v = flat // V, flat % V
        b, t, a = variants[v].unbind(-1)
        experts = drawn[s, b].clone()
        experts[torch.arange(len(flat), device=site.device), t] = tuples[a]
        only_t = positions == t[:, None]
        out.index_add_(0, s * B + b, forced_gradients(site, objective, b, experts, only_t, only_t))
        pace.tick(first + len(flat), what)
    per_draw = out.reshape(draws, B, T, n)
    return Reference("rao-blackwell", objective, per_draw.mean(0), per_draw, draws * V,
                     time.perf_counter() - start)


def reference_gradient(site: Site, objective: Objective, method: str = "auto", draws: int = 64, seed: int = 0,
                       max_enumeration: int = 4096, max_elements: int = 2 ** 22) -> Reference:
    """Enumeration when it runs at most `max_enumeration` sequences (auto), else Rao-Blackwell."""
    if method not in REFERENCES:
        raise GradestError(f"unknown reference '{method}'; valid: {', '.join(REFERENCES)}")
    if method == "auto":
        method = "enumeration" if enumeration_rows(site, objective) <= max_enumeration else "rao-blackwell"
    elif method == "enumeration" and enumeration_rows(site, objective) > MAX_ENUMERATION:
        raise GradestError(f"enumeration would run {enumeration_rows(site, objective):,} sequences (more than "
                           f"{MAX_ENUMERATION:,}); use reference='rao-blackwell' or 'auto'")
    if method == "enumeration":
        return enumerate_reference(site, objective, max_elements)
    return rao_blackwell_reference(site, objective, draws, seed, max_elements)


# -------------------------------------------------------------------------------------------- estimator samples
def sample_seeds(seed: int, samples: int) -> list[int]:
    """The seed of each gradient sample's routing noise: sample k's noise is what layer l draws itself
    (`torch.rand(tokens, noise_dim)`) after `torch.manual_seed(sample_seeds(seed, K)[k])`."""
    generator = torch.Generator().manual_seed(2 * seed)  # the Rao-Blackwell draws use 2 * seed + 1
    return torch.randint(2 ** 62, (samples,), generator=generator).tolist()


def sample_noise(site: Site, estimator: Estimator, seeds: list[int]) -> Tensor:
    """The routing noise of the samples with these seeds, (len(seeds) * B * T, noise_dim)."""
    m = estimator.noise_dim(site.n)
    dtype = site.z0.dtype
    return torch.cat([torch.rand(site.B * site.T, m, generator=torch.Generator().manual_seed(s), dtype=dtype)
                      for s in seeds]).to(site.device)


def surrogate_loss(site: Site, estimator: Estimator, losses: Tensor, score: str = "sequence") -> Tensor:
    """The loss to back-propagate for K replicas of the batch, given their sequences' losses (K, B); its
    gradient is the sum of the K samples. A score-function estimator (layer l left a log-probability) adds its
    term as the Trainer does: with score="sequence", f is each sequence's loss and log P sums over its tokens
    (valid because sequences do not interact), its surrogate averaged over the batch; with score="batch", f is
    the replica's loss L and log P sums over all the replica's tokens at layer l."""
    K, B = losses.shape
    log_prob = site.layer.aux.log_prob
    if log_prob is None:
        return losses.mean(-1).sum()
    log_prob = log_prob.reshape(K, B, -1).sum(-1)
    zero = site.zero_losses().to(losses.dtype) if estimator.needs_zero_output else None
    if score == "sequence":
        f_zero = None if zero is None else zero.expand(K, B)
        return estimator.with_score(losses, log_prob, f_zero).mean(-1).sum()
    f_zero = None if zero is None else zero.mean().expand(K, 1)
    try:
        return estimator.with_score(losses.mean(-1, keepdim=True), log_prob.sum(-1, keepdim=True), f_zero).sum()
    except GradestError as err:
        raise GradestError(f"{err} (with score='batch' each replica of the batch is one item; use "
                           f"score='sequence')") from err


def layer_gradient_samples(site: Site, estimator: Estimator, samples: int, seed: int = 0,
                           score: str = "sequence", max_elements: int = 2 ** 22) -> Tensor:
    """K gradient samples of the estimator w.r.t. layer l's logits (K, B, T, n), float64: the batch replicated
    K times (chunked), one forward and one backward per chunk. Deterministic estimators (no noise) are computed
    once and repeated."""
    if not isinstance(samples, int) or samples < 1:
        raise GradestError(f"samples must be an integer >= 1, got {samples!r}")
    if score not in SCORES:
        raise GradestError(f"unknown score '{score}'; valid: {', '.join(SCORES)}")
    estimator.check(site.n, GATED)
    deterministic = estimator.noise_dim(site.n) == 0
    seeds = sample_seeds(seed, 1 if deterministic else samples)
    per_chunk = max(1, site.chunk_rows(max_elements, dense=estimator.dense) // site.B)
    state = site.estimator_state(estimator)
    out, pace = [], Pace(len(seeds), "samples")
    for first in range(0, len(seeds), per_chunk):
        part = seeds[first:first + per_chunk]
        K = len(part)
        sampled = _Sampled(estimator, sample_noise(site, estimator, part), state=state)
        rows = torch.arange(site.B, device=site.device).repeat(K)
        with probing(site.model), installed(site.layer, sampled), torch.enable_grad():
            losses = site.losses(rows).reshape(K, site.B)
            (grad,) = torch.autograd.grad(surrogate_loss(site, estimator, losses, score), sampled.logits)
        out.append(grad.reshape(K, site.B, site.T, site.n).double())
        pace.tick(first + K, estimator.label)
    out = torch.cat(out)
    return out.expand(samples, -1, -1, -1) if deterministic else out


# ------------------------------------------------------------------------------------------------------ probe
def probe_estimators(names, k: int, settings: dict | None = None,
                     batch_size: int | None = None) -> list[Estimator]:
    """The estimators to probe: `all` is every estimator that applies to top-k (with its variants) except
    `exact`, which cannot route an MoE layer (the reference is the exact gradient), and those that need more
    sequences than `batch_size` (reinforce's leave-one-out mean); one of those named is refused."""
    if isinstance(names, str) and names != "all":
        names = [name for name in names.split(",") if name.strip()]
    every = names == "all" or names == ["all"]
    estimators = [e for e in names if isinstance(e, Estimator)] if isinstance(names, (list, tuple)) else []
    named = names if every else [e for e in names if not isinstance(e, Estimator)]
    if named:
        estimators += expand_estimators(named, GATED, k, settings)
    if every:
        estimators = [e for e in estimators if not e.enumerates
                      and (batch_size is None or e.min_batch <= batch_size)]
    for e in estimators:
        if e.enumerates:
            raise GradestError(f"estimator '{e.name}' cannot route an MoE layer (it enumerates expert tuples: one "
                               "pass of the layers above per tuple); the probe's reference column is the exact "
                               "gradient")
        if batch_size is not None and e.min_batch > batch_size:
            raise GradestError(f"estimator '{e.label}' needs a batch of at least {e.min_batch} sequences, got "
                               f"batch_size={batch_size}; valid: a larger batch, or another estimator")
    if not estimators:
        raise GradestError("no estimator to probe")
    return estimators


def probe(model: SwitchModel, batch, layer: int = 0, estimators="all", samples: int = 256, *,
          wrt: str | tuple = "router", reference: str = "auto", draws: int = 64, seed: int = 0,
          top_k: int | None = None, settings: dict | None = None, score: str = "sequence",
          max_enumeration: int = 4096, max_elements: int = 2 ** 22, progress=None) -> pd.DataFrame:
    """Every estimator's gradient of E_D[L] w.r.t. MoE layer `layer`'s router weights (wrt="router") or logits
    ("logits"; a tuple gives both) against the exact reference of estimators.md §4; one row per estimator and wrt, in
    the format of `gradest.measure.compare`, plus `reference`, `reference_se` (the reference's standard error
    norm over its norm; 0 for enumeration) and `reference_draws`.

    model: a SwitchLM or SwitchSeq2Seq (any state: at initialisation or trained); batch: (idx, targets) or
    (src, tgt_in, tgt_out); estimators: "all", names or specs ("reinforce:baseline=mean") or Estimator objects;
    top_k: k for "all" (default: layer's k); reference: "auto" (enumeration when at most `max_enumeration`
    sequences, else Rao-Blackwell with `draws` draws), "enumeration" or "rao-blackwell"; score: how REINFORCE's
    f and log P are grouped ("sequence": as the Trainer; "batch": the whole batch is one item). Numbers are a
    function of the model, batch and seed. The model's modes and layer l's estimator are restored afterwards.
    """
    wrts = check_probe_options(wrt, samples, score, reference)
    site = SwitchSite(model, batch, layer)
    chosen = probe_estimators(estimators, top_k or site.layer.k, settings, site.B)
    return probe_site(site, chosen, samples, wrts, reference=reference, draws=draws, seed=seed, score=score,
                      max_enumeration=max_enumeration, max_elements=max_elements, progress=progress)


def check_probe_options(wrt, samples, score: str, reference: str) -> tuple:
    """The probe's options checked before any work (one line each); returns the gradient targets as a tuple."""
    wrts = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    for w in wrts:
        if w not in PROBE_WRT:
            raise GradestError(f"unknown gradient target '{w}' for the probe; valid: {', '.join(PROBE_WRT)}")
    if not isinstance(samples, int) or samples < 3:
        raise GradestError(f"samples must be an integer >= 3 (bias and variance need them), got {samples!r}")
    if score not in SCORES:
        raise GradestError(f"unknown score '{score}'; valid: {', '.join(SCORES)}")
    if reference not in REFERENCES:
        raise GradestError(f"unknown reference '{reference}'; valid: {', '.join(REFERENCES)}")
    return wrts


def probe_site(site, chosen: list[Estimator], samples: int, wrts: tuple, *, reference: str, draws: int, seed: int,
               score: str, max_enumeration: int, max_elements: int, progress=None) -> pd.DataFrame:
    """The probe's rows for the estimators `chosen` at a `Site` (`SwitchSite`, `gradest.hf.probe.HFSite`), the
    model in `probing` mode throughout."""
    for estimator in chosen:
        estimator.check(site.n, GATED)
    config = {"experts": site.n, "tokens": site.B * site.T, "dim": site.d, "top_k": None,
              "sharpness": round(float(site.z0.pow(2).mean().sqrt()), 4), "layer": site.index,
              "batch_size": site.B, "seq_len": site.T, "relevant_tokens": int(site.relevant.sum())}
    rows, references = [], {}
    with probing(site.model):
        for estimator in (progress(chosen) if progress else chosen):
            objective = estimator.objective()
            key = objective.label
            if key not in references:
                references[key] = reference_gradient(site, objective, reference, draws, seed, max_enumeration,
                                                     max_elements)
            ref = references[key]
            start = time.perf_counter()
            grads = layer_gradient_samples(site, estimator, samples, seed, score, max_elements)
            computed = 1 if estimator.noise_dim(site.n) == 0 else samples
            seconds = time.perf_counter() - start
            for w in wrts:
                values = site.router_gradient(grads) if w == "router" else grads.flatten(1)
                target = ref.values(site, w)
                metrics = bias_variance(values, target) if ref.draws is None else bias_variance_mc(values, target)
                rows.append({"problem": site.problem, "estimator": estimator.label, "target": key, "wrt": w,
                             "samples": samples, **config, "top_k": objective.k, "seed": seed, **metrics,
                             "sec_per_sample": seconds / computed,
                             "experts_per_token": estimator.k if estimator.sparse else site.n,
                             "downstream_per_token": 1 + (1 if estimator.needs_zero_output else 0),
                             "reference": ref.kind, "reference_se": ref.relative_se(site, w),
                             "reference_draws": 0 if ref.draws is None else ref.draws.shape[0],
                             "reference_rows": ref.rows, "reference_seconds": ref.seconds})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------- a tiny Switch model
TINY = {"lm": dict(n_layer=4, n_head=2, d_model=32, d_ff=64, moe_every=2),
        "mt": dict(n_encoder_layer=2, n_layer=2, n_head=2, d_model=32, d_ff=64, moe_every=2)}


def lm_probe_batch(corpus, batch_size: int, seq_len: int, data_seed: int = 0):
    """A fixed batch of `batch_size` windows of `seq_len` characters of tiny-shakespeare's validation split."""
    from gradest.datasets import lm_batch
    return lm_batch(corpus.val, batch_size, seq_len, torch.Generator().manual_seed(data_seed))


def mt_probe_batch(data, batch_size: int, seq_len: int):
    """The first `batch_size` Multi30k validation pairs whose source and decoder input are at most `seq_len`
    tokens, padded: (src, tgt_in, tgt_out)."""
    from gradest.datasets import translation_batches
    pairs = [(s, t) for s, t in data.val if len(s) <= seq_len and len(t) - 1 <= seq_len][:batch_size]
    if len(pairs) < batch_size:
        raise GradestError(f"only {len(pairs)} Multi30k validation pairs are at most seq_len={seq_len} tokens; "
                           f"use a larger seq_len or a smaller batch_size")
    return next(translation_batches(pairs, batch_size, None, data.pad_id))


def switch_probe(task: str = "lm", *, estimators="all", samples: int = 256, seed: int = 0,
                 checkpoint: str | Path | None = None, trainer=None, layer: int = 0, batch_size: int = 2,
                 seq_len: int = 8,
                 experts: int | None = None, top_k: int = 1, config: dict | None = None, reference: str = "auto",
                 draws: int = 64, wrt: str | tuple = "router", settings: dict | None = None,
                 score: str = "sequence", data_seed: int = 0, progress=None) -> pd.DataFrame:
    """The probe on a Switch Transformer: "lm" (tiny-shakespeare, a fixed validation batch of `batch_size`
    windows of `seq_len` characters) or "mt" (the first `batch_size` Multi30k validation pairs of at most
    `seq_len` tokens). The model is a tiny one at initialisation, seeded by `seed` (`TINY[task]`: d_model 32,
    `experts` = 4 experts, updated by `config`, any SwitchConfig field), the model of a Trainer `checkpoint`
    (its run folder or checkpoint.pt), or a `trainer`'s model as it is. Layer `layer` (an index into the MoE
    layers) is probed; see `probe`."""
    if task not in TASK_PROBLEM:
        raise GradestError(f"unknown task '{task}'; valid: {', '.join(TASK_PROBLEM)}")
    from gradest.datasets import load_multi30k, load_shakespeare
    from gradest.estimators import get_estimator
    if checkpoint is not None or trainer is not None:
        if config:
            raise GradestError("config overrides do not apply to a checkpoint's model")
        if trainer is None:
            from gradest.train import Trainer, load_checkpoint
            path = Path(checkpoint)
            run = path.parent if path.is_file() else path
            state = load_checkpoint(run)
            hf = [f"{key}={state['config'][key]}" for key in ("hf", "hf_config", "hf_model")
                  if state["config"].get(key) is not None]
            if hf:
                raise GradestError(f"--checkpoint {checkpoint} is a Hugging Face run ({hf[0]}); the switch-{task} "
                                   f"probe reads a Switch Transformer run; valid: a `gradest run` directory trained "
                                   f"without --hf, --hf-config or --hf-model")
            with torch.random.fork_rng():  # a trainer seeds and restores the global RNG
                trainer = Trainer.resume(run, state=state)
        if trainer.config.task != task:
            raise GradestError(f"the checkpoint is a '{trainer.config.task}' run, not '{task}'")
        model = trainer.model
        if experts is not None and experts != model.config.experts:
            raise GradestError(f"the checkpoint's model has {model.config.experts} experts, not {experts}")
        source = trainer.task.corpus if task == "lm" else trainer.task.data
    else:
        source = load_shakespeare() if task == "lm" else load_multi30k()
        settings_ = {**TINY[task], "experts": experts or 4, "block_size": seq_len, **(config or {})}
        unknown = set(settings_) - set(SwitchConfig.__dataclass_fields__)
        if unknown:
            raise GradestError(f"unknown model setting '{sorted(unknown)[0]}'; valid: "
                               + ", ".join(SwitchConfig.__dataclass_fields__))
        base = get_estimator("switch") if top_k == 1 else get_estimator("topk", k=top_k)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if task == "lm":
                model = SwitchLM(SwitchConfig(vocab_size=source.vocab_size, **settings_), base)
            else:
                model = SwitchSeq2Seq(SwitchConfig(vocab_size=source.vocab_size, pad_id=source.pad_id, **settings_),
                                      base, source.pad_id)
    if seq_len > model.config.block_size:
        raise GradestError(f"seq_len={seq_len} is longer than the model's block_size={model.config.block_size}")
    from gradest.memory import check_probe, model_probe_peak
    check_probe(model_probe_peak(model, batch_size, seq_len, samples),
                f"the probe on {batch_size} sequences of {seq_len} tokens (K={samples})")
    batch = lm_probe_batch(source, batch_size, seq_len, data_seed) if task == "lm" else \
        mt_probe_batch(source, batch_size, seq_len)
    return probe(model, batch, layer, estimators, samples, wrt=wrt, reference=reference, draws=draws, seed=seed,
                 top_k=top_k, settings=settings, score=score, progress=progress)
