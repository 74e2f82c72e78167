"""The router-gradient probe (gradest/probe.py, docs/estimators.md §4) on one MoE layer of a Hugging Face MoE model:
a causal LM, or SwitchTransformers' encoder-decoder. The model: `gradest.hf.models.load_model`.

For MoE layer L of a transformers model: every other MoE block keeps its NATIVE routing in eval mode
(deterministic: top-k of its own softmax; dropout off); block L alone is routed by gradest, through the
`gradest.hf.patch` mechanism restricted to that one block. L(D) is the mean over sequences of each sequence's mean
next-token cross-entropy (of the decoder's tokens, for an encoder-decoder), and the objective is J = E_D[L(D)] over block L's routing D, with D drawn from the
objective's softmax of the block's own router logits and the gates from the same softmax (`ForcedRouting`).

Why a `gradest.probe.Site`: probe.py's reference (exact enumeration, or the Rao-Blackwellised Monte-Carlo reference
with its standard error), its batched estimator samples and its bias/variance metrics only need a "site" that can
(1) run a batch of rows (copies of sequences) with whatever rule the layer holds, and (2) say what the layer's router
saw. `HFSite` implements that protocol, so the maths is probe.py's, unchanged:

- `site.layer` is a `_BlockSlot`: assigning its `estimator` (what `gradest.probe.installed` does) patches block L
  with that estimator (`gradest.hf.patch`, then every other block's patch undone); assigning None undoes it. The
  probe's routing rules (`ForcedRouting`, `_Sampled`) thus run inside the HF block, with the block's own logits,
  experts and output format.
- There is no prefix caching: each row re-runs the WHOLE model (the layers below L recompute the same values).
  Rows are batched (`chunk_rows`), so the cost is a few large forwards, not one per row.
- Router-weight gradients are sum_t grad z_t (outer) x_t with x_t the input the router module received (captured
  with a forward pre-hook, `gradest.probe.captured_input`); the logits are made a leaf inside the block, so one
  backward gives every row's.

Data: the bundled tiny-shakespeare validation split, as its character ids, modulo the model's vocabulary (a tiny
model built by `--hf NAME` has a vocabulary of at least the 65 characters, so they are unchanged); a user's text
(`doctor --text`) as its UTF-8 bytes modulo the vocabulary. A causal LM reads windows of seq_len tokens and predicts
each next token; an encoder-decoder reads a window of seq_len tokens and predicts the seq_len tokens that follow it
(teacher-forced, the decoder's input starting with its `decoder_start_token_id`). A pretrained model's own tokenizer is NOT used: the probe
measures gradients, for which any fixed token sequence is a valid batch, and this keeps it free of downloads.

SwitchTransformers' expert capacity is counted per sequence (gradest.hf), so the copies of a sequence in one
forward do not compete for it: each row's loss depends on its own routing only, as the probe needs.

Limits: stateful estimators (default-moe)
are not probed here (their state lives in buffers that a single patched block would have to seed); no padding,
so every token at layer L can change the loss (`relevant` is all true).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor, nn

from gradest.engines import BlockSlot, Patched
from gradest.errors import GradestError
from gradest.estimators import Estimator
from gradest.hf.families import routing_dtype
from gradest.hf.models import NAMED, load_model, moe_blocks
from gradest.hf.patching import patch
from gradest.probe import EngineSite, captured_input, check_probe_options, probe_estimators, probe_site, probing

IGNORE = -100  # no target is ignored (no padding); the value transformers uses


# -------------------------------------------------------------------------------------------------- the data
def text_tokens(vocab_size: int, text: str | None = None) -> Tensor:
    """Token ids: the bundled tiny-shakespeare validation split (character ids), or `text` as UTF-8 bytes; both
    modulo `vocab_size` (see the module docstring)."""
    if text is None:
        from gradest.datasets import load_shakespeare
        ids = load_shakespeare().val
    else:
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return ids % vocab_size


def text_batch(vocab_size: int, batch_size: int, seq_len: int, data_seed: int = 0,
               text: str | None = None) -> tuple[Tensor, Tensor]:
    """A fixed batch (idx, targets) of `batch_size` windows of `seq_len` tokens (`gradest.datasets.lm_batch`)."""
    from gradest.datasets import lm_batch
    tokens = text_tokens(vocab_size, text)
    if len(tokens) <= seq_len:
        raise GradestError(f"the text has {len(tokens)} tokens; seq_len={seq_len} needs more than {seq_len}")
    return lm_batch(tokens, batch_size, seq_len, torch.Generator().manual_seed(data_seed))


def model_batch(model: nn.Module, batch_size: int, seq_len: int, data_seed: int = 0,
                text: str | None = None) -> tuple[Tensor, ...]:
    """The fixed batch a model's probe reads (see the module docstring): (idx, targets) for a causal LM; for an
    encoder-decoder (src, tgt_in, tgt_out), a window of seq_len tokens and the seq_len tokens after it."""
    config = model.config
    if not config.is_encoder_decoder:
        return text_batch(config.vocab_size, batch_size, seq_len, data_seed, text)
    idx, _ = text_batch(config.vocab_size, batch_size, 2 * seq_len, data_seed, text)
    src, tgt_out = idx[:, :seq_len], idx[:, seq_len:]
    start = torch.full((batch_size, 1), config.decoder_start_token_id, dtype=idx.dtype)
    return src, torch.cat([start, tgt_out[:, :-1]], 1), tgt_out


# -------------------------------------------------------------------------------------------- the patched slot
class _BlockSlot(BlockSlot):
    """`engines.BlockSlot` for one HF block of `model`."""

    def __init__(self, model: nn.Module, block: nn.Module):
        super().__init__(block)
        self.model = model

    def install(self, estimator: Estimator) -> Patched:
        patched = patch(self.model, estimator)
        for b in patched.blocks:  # only this block is routed by gradest; the others keep their own rule
            if b.block is not self.block:
                b.restore()
        patched.blocks = [b for b in patched.blocks if b.block is self.block]
        return patched


# --------------------------------------------------------------------------------------------------- the site
class HFSite(EngineSite):
    """MoE layer `layer` (an index into the model's MoE blocks, in model order: an encoder-decoder's encoder blocks
    first) of a transformers model on a batch (`model_batch`: (idx, targets), or (src, tgt_in, tgt_out) for an
    encoder-decoder), for probe.py's reference and sample functions. Besides `Site`'s attributes (`z0` in the
    routing dtype, `relevant` all true, `layer` the `_BlockSlot`): `name`, `hf_block`, `arch`, `router` and
    `native_k` of block L, `where` encoder or decoder."""

    engine = "HF"

    def __init__(self, model: nn.Module, batch, layer: int = 0):
        found = moe_blocks(model)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -len(found) <= layer < len(found):
            raise GradestError(f"layer must be an MoE layer index in 0..{len(found) - 1}, got {layer!r}")
        self.model, self.index = model, layer % len(found)
        self.name, self.hf_block, self.arch = found[self.index]
        self.router = self.arch.router_of(self.hf_block)
        self.native_k = self.arch.family.native_k(self.router)
        self.problem = f"hf-{self.arch.model_type}"
        seq2seq = model.config.is_encoder_decoder
        self.where = "encoder" if seq2seq and self.name.startswith(("encoder.", "model.encoder.")) else "decoder"
        self.device = next(model.parameters()).device
        names = ("src", "tgt_in", "targets") if seq2seq else ("idx", "targets")
        if len(batch) != len(names):
            raise GradestError(f"this model's probe batch is ({', '.join(names)})")
        tensors = [t.to(self.device) for t in batch]
        vocab = model.config.vocab_size
        if len({t.shape for t in tensors[1:]}) != 1 or any(t.dim() != 2 for t in tensors):
            raise GradestError(f"{', '.join(names)} must be (batch, seq) alike, got "
                               f"{', '.join(str(tuple(t.shape)) for t in tensors)}")
        if any(int(t.max()) >= vocab or int(t.min()) < 0 for t in tensors):
            raise GradestError(f"token ids must lie in 0..{vocab - 1} (the model's vocabulary)")
        self.inputs, targets, self.ignore = dict(zip(names[:-1], tensors[:-1])), tensors[-1], IGNORE
        self.targets = targets
        self.counted = torch.ones_like(targets, dtype=torch.bool)
        self.counts = self.counted.sum(-1)
        self.layer = _BlockSlot(model, self.hf_block)
        B, T = tensors[0 if self.where == "encoder" else -1].shape
        with probing(model), torch.no_grad():
            # the router module's input as the block hands it over (native routing below block L)
            seen = captured_input(self.router, lambda: self.forward(torch.arange(B, device=self.device)))
            self.u = seen.reshape(B, T, -1)
            z = self.arch.family.logits(self.router, self.u.reshape(B * T, -1).clone())
            self.z0 = z.reshape(B, T, -1).to(routing_dtype(z.dtype))
        self.B, self.T, self.d, self.n = B, T, self.u.shape[-1], self.z0.shape[-1]
        self.relevant = torch.ones(B, T, dtype=torch.bool, device=self.device)

    def forward(self, rows: Tensor) -> Tensor:
        if "src" in self.inputs:
            return self.model(input_ids=self.inputs["src"][rows], decoder_input_ids=self.inputs["tgt_in"][rows],
                              use_cache=False).logits
        return self.model(input_ids=self.inputs["idx"][rows], use_cache=False).logits

    def chunk_rows(self, max_elements: int, dense: bool = True) -> int:
        """Rows per forward so that the activations kept for the backward hold about max_elements: the widest of
        the logits, every layer's hidden states, the experts' intermediate activations."""
        cfg = self.model.config
        hidden = getattr(cfg, "hidden_size", self.d)
        inner = (getattr(cfg, "moe_intermediate_size", None) or getattr(cfg, "intermediate_size", None)
                 or getattr(cfg, "d_ff", hidden))
        layers = getattr(cfg, "num_hidden_layers", 1) + (getattr(cfg, "num_decoder_layers", 0) or 0)
        width = max(cfg.vocab_size, 8 * hidden * layers, (self.n if dense else max(1, self.native_k)) * inner)
        tokens = sum(t.shape[-1] for t in self.inputs.values())  # an encoder-decoder's rows hold both sequences
        return max(1, max_elements // (tokens * width))


# ------------------------------------------------------------------------------------------------------ probe
def hf_probe(model: nn.Module, batch, layer: int = 0, estimators="all", samples: int = 256, *,
             wrt: str | tuple = "router", reference: str = "auto", draws: int = 64, seed: int = 0,
             top_k: int | None = None, settings: dict | None = None, score: str = "sequence",
             max_enumeration: int = 4096, max_elements: int = 2 ** 22, progress=None) -> pd.DataFrame:
    """`gradest.probe.probe` on MoE layer `layer` of a transformers model: one row per estimator and wrt in
    the format of `gradest.measure.compare` (plus the probe's reference columns); `problem` is `hf-<model_type>`.
    top_k: k of the estimators and the objective (default: the block's num_experts_per_tok). The model's modes
    and routing are restored afterwards."""
    wrts = check_probe_options(wrt, samples, score, reference)
    site = HFSite(model, batch, layer)
    chosen = probe_estimators(estimators, top_k or site.native_k, settings, site.B)
    if estimators == "all" or estimators == ["all"]:
        chosen = [e for e in chosen if not e.stateful]
    for estimator in chosen:
        site.estimator_state(estimator)  # refuses a stateful one before any work
    return probe_site(site, chosen, samples, wrts, reference=reference, draws=draws, seed=seed, score=score,
                      max_enumeration=max_enumeration, max_elements=max_elements, progress=progress)


def hf_probe_command(name: str | None = None, config_file=None, model_dir=None, *, layer: int = 0,
                     batch_size: int = 2, seq_len: int = 8, data_seed: int = 0, top_k: int | None = None,
                     model_settings: dict | None = None, **options) -> pd.DataFrame:
    """What `gradest compare --problem hf` runs: the model (`load_model`; a built one seeded by `seed`, with
    `model_settings` over its config), a fixed batch of the bundled text (`model_batch`), `hf_probe`."""
    seed = options.get("seed", 0)
    built = model_dir is None and name not in NAMED
    model = load_model(name, config_file, model_dir, k=top_k if built else None, seed=seed, settings=model_settings)
    from gradest.memory import check_probe, model_probe_peak
    check_probe(model_probe_peak(model, batch_size, seq_len, options.get("samples", 256)),
                f"the probe on {batch_size} sequences of {seq_len} tokens (K={options.get('samples', 256)})")
    batch = model_batch(model, batch_size, seq_len, data_seed)
    return hf_probe(model, batch, layer, top_k=None if built else top_k, **options)
