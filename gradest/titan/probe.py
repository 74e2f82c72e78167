"""The router-gradient probe (gradest/probe.py, docs/estimators.md §4) on one MoE layer of a torchtitan model: the
small Qwen3-MoE that gradest.titan builds (`gradest.titan.models.qwen3_moe_config`, torchtitan's `debugmodel_moe`
blocks, shrunk), at random initialisation. `gradest compare --problem titan` runs it.

It is gradest.hf.probe's `HFSite` for torchtitan: block L is routed by gradest (`gradest.titan.patch` on that one
block, so its router returns the probe's routing in torchtitan's format and torchtitan's own dispatch, grouped
experts and combine run it); every other block keeps torchtitan's native routing in eval mode (top-k of its
softmax). L(D) is the mean over sequences of each sequence's mean next-token cross-entropy, and J = E_D[L(D)] over
block L's routing D, drawn from the objective's softmax of block L's router logits, with the gates from the same
softmax (`gradest.probe.ForcedRouting`). The reference (exact enumeration, or the Rao-Blackwellised one), the
batched samples and the metrics are probe.py's, unchanged.

- `site.layer` is a `_TitanSlot`: assigning its `estimator` patches block L with it (`gradest.titan.patch` of the
  block alone); a dense estimator's samples get the block's dense forward (every expert on every token, as
  `patch` installs for a dense estimator); assigning None undoes the patch.
- No prefix caching: each row re-runs the whole model (rows are batched, `chunk_rows`). Sequences do not interact
  (causal attention within a sequence; torchtitan's dispatch has no capacity limit), so each row's loss depends on
  its own routing only.
- Router-weight gradients are sum_t grad z_t (outer) x_t with x_t the input torchtitan's router received (a forward
  pre-hook, `gradest.probe.captured_input`); the router's gate has no bias.

Precision: torchtitan's grouped experts compute in bfloat16 whatever the model's dtype, and its combine multiplies
the gates in float32. J is the objective of THAT computation: its gradient with respect to block L's logits runs
through the gates and the probabilities (float64 in a float64 model, up to the float32 combine), not through the
experts, which get the same inputs for every routing. So the reference is exact for the model as torchtitan computes
it, to float32 rounding of the gates.

Data: a fixed batch of the bundled tiny-shakespeare validation split (`gradest.probe.lm_probe_batch`), whose 65
characters are the model's vocabulary.

Limits: stateful estimators (default-moe) are not probed (their state lives in the block's buffers, which the probe
would have to seed); a block with a nonzero `expert_bias_E` (auxiliary-loss-free balancing selects with it) is
another objective and is refused, as the Switch probe refuses one.
"""

from __future__ import annotations

import warnings

import pandas as pd
import torch
from torch import Tensor, nn

from gradest.engines import BlockSlot, Patched, routing_dtype
from gradest.errors import GradestError
from gradest.estimators import Estimator
from gradest.probe import EngineSite, captured_input, check_probe_options, probe_estimators, probe_site, probing
from gradest.titan.models import build_model, forward, moe_blocks, qwen3_moe_config
from gradest.titan.patching import patch

IGNORE = -100  # no target is ignored (no padding)
VOCAB = 65  # tiny-shakespeare's characters: the probe model's vocabulary
PROBE_MODEL = dict(dim=32, layers=2, heads=4, kv_heads=2, head_dim=8, hidden=48, experts=4)  # qwen3_moe_config's


class _TitanSlot(BlockSlot):
    """`engines.BlockSlot` for one torchtitan block, patched alone (`gradest.titan.patch` of the block)."""

    def __init__(self, block: nn.Module, name: str):
        super().__init__(block)
        self.name = name

    def install(self, estimator: Estimator) -> Patched:
        patched = patch(self.block, estimator)
        (routed,) = patched.blocks
        routed.name = self.name
        # the probe's sampled rule wraps the estimator: a dense one needs every expert on every token
        if getattr(estimator, "estimator", estimator).dense and not estimator.dense:
            routed.override(self.block, routed.forward_dense)
        return patched


class TitanSite(EngineSite):
    """MoE layer `layer` (an index into the model's torchtitan MoE blocks, in model order) of a torchtitan language
    model on a batch (idx, targets), for probe.py's reference and sample functions. Besides `Site`'s attributes:
    `name`, `titan_block`, `router` and `native_k` (the router's top_k) of block L."""

    engine = "torchtitan"

    def __init__(self, model: nn.Module, batch, layer: int = 0):
        found = moe_blocks(model)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -len(found) <= layer < len(found):
            raise GradestError(f"layer must be an MoE layer index in 0..{len(found) - 1}, got {layer!r}")
        self.model, self.index = model, layer % len(found)
        self.name, self.titan_block = found[self.index]
        self.router = self.titan_block.router
        self.native_k = int(self.router.top_k)
        self.problem = "titan-qwen3-moe"
        bias = self.titan_block.expert_bias_E
        if bias is not None and bool(bias.detach().ne(0).any()):
            raise GradestError(f"{self.name} selects experts with a nonzero expert_bias_E (auxiliary-loss-free "
                               f"balancing), another objective than its router's softmax; valid: a block whose "
                               f"expert_bias_E is zero (a model at initialisation)")
        if self.router.score_func != "softmax":
            raise GradestError(f"{self.name} scores experts with {self.router.score_func}; the probe's objective is "
                               f"a softmax; valid: a softmax-scored model such as Qwen3-MoE")
        self.device = self.router.gate.weight.device
        if len(batch) != 2:
            raise GradestError("a torchtitan language model's probe batch is (idx, targets)")
        idx, targets = (t.to(self.device) for t in batch)
        vocab = model.config.vocab_size
        if idx.dim() != 2 or idx.shape != targets.shape:
            raise GradestError(f"idx and targets must be (batch, seq) alike, got {tuple(idx.shape)} and "
                               f"{tuple(targets.shape)}")
        if any(int(t.max()) >= vocab or int(t.min()) < 0 for t in (idx, targets)):
            raise GradestError(f"token ids must lie in 0..{vocab - 1} (the model's vocabulary)")
        self.idx, self.targets, self.ignore = idx, targets, IGNORE
        self.counts = torch.ones_like(targets, dtype=torch.bool).sum(-1)
        self.layer = _TitanSlot(self.titan_block, self.name)
        B, T = idx.shape
        with probing(model), torch.no_grad():
            seen = captured_input(self.router, lambda: forward(model, idx))
            self.u = seen.reshape(B, T, -1)
            z = self.router.gate(self.u.reshape(B * T, -1))
            self.z0 = z.reshape(B, T, -1).to(routing_dtype(z.dtype))
        self.B, self.T, self.d, self.n = B, T, self.u.shape[-1], self.z0.shape[-1]
        self.relevant = torch.ones(B, T, dtype=torch.bool, device=self.device)

    def forward(self, rows: Tensor) -> Tensor:
        return forward(self.model, self.idx[rows])

    def chunk_rows(self, max_elements: int, dense: bool = True) -> int:
        """Rows per forward so that the activations kept for the backward hold about max_elements: the widest of
        the logits, every layer's hidden states, the experts' intermediate activations."""
        config = self.model.config
        layers = len(self.model.layers)
        hidden = self.titan_block.routed_experts.inner_experts.w1_EFD.shape[1]
        width = max(config.vocab_size, 8 * self.d * layers, (self.n if dense else max(1, self.native_k)) * hidden)
        return max(1, max_elements // (self.T * width))


def titan_probe(model: nn.Module, batch, layer: int = 0, estimators="all", samples: int = 256, *,
                wrt: str | tuple = "router", reference: str = "auto", draws: int = 64, seed: int = 0,
                settings: dict | None = None, score: str = "sequence", max_enumeration: int = 4096,
                max_elements: int = 2 ** 22, progress=None) -> pd.DataFrame:
    """`gradest.probe.probe` on MoE layer `layer` of a torchtitan language model: one row per estimator and wrt in
    the format of `gradest.measure.compare` (plus the probe's reference columns). k is the router's top_k
    (torchtitan's dispatcher is built for it). The model's modes and routing are restored afterwards."""
    wrts = check_probe_options(wrt, samples, score, reference)
    site = TitanSite(model, batch, layer)
    chosen = probe_estimators(estimators, site.native_k, settings, site.B)
    if estimators == "all" or estimators == ["all"]:
        chosen = [e for e in chosen if not e.stateful]
    for estimator in chosen:
        site.estimator_state(estimator)  # refuses a stateful one before any work
        if estimator.k != site.native_k:
            raise GradestError(f"estimator '{estimator.label}' routes k={estimator.k} but {site.name}'s router "
                               f"routes top_k={site.native_k}; valid: k={site.native_k} (set the model's with "
                               f"--top-k)")
    return probe_site(site, chosen, samples, wrts, reference=reference, draws=draws, seed=seed, score=score,
                      max_enumeration=max_enumeration, max_elements=max_elements, progress=progress)


def probe_model(top_k: int = 2, seq_len: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The probe's model: gradest.titan's small Qwen3-MoE (`PROBE_MODEL`, top_k experts per token, tiny-shakespeare's
    65 characters) at random initialisation seeded by `seed`, in `dtype` (torchtitan's experts stay bfloat16)."""
    experts = PROBE_MODEL["experts"]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise GradestError(f"--top-k {top_k!r} does not fit the model's {experts} experts; valid: 1 <= k <= {experts}")
    with torch.random.fork_rng():
        return build_model(qwen3_moe_config(top_k=top_k, vocab=VOCAB, max_seq_len=max(seq_len, 8), **PROBE_MODEL),
                           seed=seed, dtype=dtype)


def titan_probe_command(*, layer: int = 0, batch_size: int = 2, seq_len: int = 8, data_seed: int = 0,
                        top_k: int | None = None, dtype: torch.dtype = torch.float32, **options) -> pd.DataFrame:
    """What `gradest compare --problem titan` runs: the model (`probe_model`, seeded by `seed`; top_k default 2),
    a fixed batch of the bundled text (`gradest.probe.lm_probe_batch`), `titan_probe`."""
    from gradest.datasets import load_shakespeare
    from gradest.probe import lm_probe_batch
    model = probe_model(2 if top_k is None else top_k, seq_len, options.get("seed", 0), dtype)
    n_layers = len(moe_blocks(model))
    if not 0 <= layer < n_layers:  # before the batch and the site
        raise GradestError(f"layer must be an MoE layer index in 0..{n_layers - 1}, got {layer!r}")
    batch = lm_probe_batch(load_shakespeare(), batch_size, seq_len, data_seed)
    with warnings.catch_warnings():  # torchtitan's router asks the CPU for float32 autocast, which declines
        warnings.filterwarnings("ignore", message="In CPU autocast")
        return titan_probe(model, batch, layer, **options)
