"""The Switch Transformer (Fedus et al. 2021, as in the SparseMixer experiments; docs/estimators.md §5), in one file.

A decoder-only causal language model (`SwitchLM`) and an encoder-decoder for translation (`SwitchSeq2Seq`). An MoE
feed-forward layer (gradest.moe.MoE, holding any routing estimator) replaces the dense FFN in every
`moe_every`-th layer; `moe_every = 0` gives the dense baseline, whose FFN has one expert's size and so the same
active parameters per token as a top-1 MoE model. Pre-LN by default, post-LN as an option.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gradest.errors import GradestError
from gradest.estimators import Estimator
from gradest.estimators.base import (Constraint, boolean, check_settings, integer_at_least, nonnegative, one_of,
                                     optional, positive, unit_interval)
from gradest.moe import MoE


@dataclass
class SwitchConfig:
    vocab_size: int = 65
    block_size: int = 128  # longest sequence (positions are learned)
    n_layer: int = 4  # decoder layers (the LM's only stack)
    n_encoder_layer: int = 0  # encoder layers; > 0 makes an encoder-decoder
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512  # hidden width of the dense FFN and of each expert
    experts: int = 8
    moe_every: int = 2  # layers 1, 3, 5, ... (0-based) are MoE when 2, as in Switch; 0: dense baseline
    dropout: float = 0.0
    expert_dropout: float = 0.0
    balance_coef: float = 0.01
    balance_probs: str = "softmax"  # the balance loss's P_i: "softmax" or "sampled" (the SparseMixer code's masked P)
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    omega: bool | None = None  # None: the estimator's default
    post_ln: bool = False
    router_bias: bool = False  # the SparseMixer code's router is nn.Linear with a bias
    moe_first: bool = False  # MoE in the first layer of each moe_every (0, 2, 4: the SparseMixer code), not the last
    pad_id: int = -100  # target id the loss ignores

    def __post_init__(self):
        check_settings("model", dataclasses.asdict(self), MODEL_SETTINGS)
        if self.d_model % self.n_head:
            raise GradestError(f"invalid model setting n_head={self.n_head}: it must divide d_model={self.d_model}; "
                               f"valid: " + ", ".join(str(h) for h in range(1, self.d_model + 1)
                                                      if self.d_model % h == 0))

    def is_moe(self, layer: int) -> bool:
        return self.moe_every > 0 and layer % self.moe_every == (0 if self.moe_first else self.moe_every - 1)


MODEL_SETTINGS = {
    "vocab_size": integer_at_least(1), "block_size": integer_at_least(1), "n_layer": integer_at_least(1),
    "n_encoder_layer": integer_at_least(0), "n_head": integer_at_least(1), "d_model": integer_at_least(1),
    "d_ff": integer_at_least(1), "experts": integer_at_least(2), "moe_every": integer_at_least(0),
    "dropout": unit_interval, "expert_dropout": unit_interval, "balance_coef": nonnegative,
    "z_loss_coef": nonnegative, "capacity_factor": optional(positive, "no token dropping"),
    "omega": optional(boolean, "the estimator's default"), "post_ln": boolean, "router_bias": boolean,
    "moe_first": boolean, "balance_probs": one_of("softmax", "sampled"),
    "pad_id": Constraint(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
}


class Attention(nn.Module):
    """Multi-head attention: causal self-attention, full self-attention, or cross-attention to `memory`."""

    def __init__(self, config: SwitchConfig, causal: bool):
        super().__init__()
        self.n_head, self.causal, self.dropout = config.n_head, causal, config.dropout
        self.q = nn.Linear(config.d_model, config.d_model)
        self.kv = nn.Linear(config.d_model, 2 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, memory: Tensor | None = None, key_padding: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        source = x if memory is None else memory
        q = self.q(x).view(B, T, self.n_head, -1).transpose(1, 2)
        k, v = (t.view(B, source.shape[1], self.n_head, -1).transpose(1, 2) for t in self.kv(source).chunk(2, -1))
        mask = None if key_padding is None else ~key_padding[:, None, None, :]  # True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff)
        self.down = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Self-attention, optional cross-attention, then the FFN (dense or MoE), each a residual branch."""

    def __init__(self, config: SwitchConfig, layer: int, estimator: Estimator, causal: bool, cross: bool):
        super().__init__()
        self.post_ln = config.post_ln
        self.attn = Attention(config, causal)
        self.cross = Attention(config, causal=False) if cross else None
        self.ffn = (MoE(config.d_model, config.d_ff, config.experts, estimator, omega=config.omega,
                        balance_coef=config.balance_coef, balance_probs=config.balance_probs,
                        z_loss_coef=config.z_loss_coef, capacity_factor=config.capacity_factor,
                        expert_dropout=config.expert_dropout, router_bias=config.router_bias)
                    if config.is_moe(layer) else FeedForward(config))
        self.norms = nn.ModuleList(nn.LayerNorm(config.d_model) for _ in range(3 if cross else 2))
        self.drop = nn.Dropout(config.dropout)

    def residual(self, x, norm, branch):
        if self.post_ln:
            return norm(x + self.drop(branch(x)))
        return x + self.drop(branch(norm(x)))

    def before_ffn(self, x, memory=None, memory_padding=None, self_padding=None):
        """The residual stream just before the FFN branch: the self-attention and cross-attention branches added
        (and normed, post-LN). The router-gradient probe computes it once and re-runs only `ffn_residual`."""
        x = self.residual(x, self.norms[0], lambda h: self.attn(h, key_padding=self_padding))
        if self.cross is not None:
            x = self.residual(x, self.norms[1], lambda h: self.cross(h, memory, memory_padding))
        return x

    def ffn_residual(self, x):
        """The FFN (dense or MoE) residual branch applied to the stream `before_ffn` returned."""
        return self.residual(x, self.norms[-1], self.ffn)

    def forward(self, x, memory=None, memory_padding=None, self_padding=None):
        return self.ffn_residual(self.before_ffn(x, memory, memory_padding, self_padding))


class Stack(nn.Module):
    """Embeddings, blocks and a final norm (pre-LN only)."""

    def __init__(self, config, estimator, n_layer, causal, cross, embedding=None):
        super().__init__()
        self.tok = embedding or nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, estimator, causal, cross) for i in range(n_layer))
        self.norm = nn.Identity() if config.post_ln else nn.LayerNorm(config.d_model)

    def embed(self, idx: Tensor) -> Tensor:
        """Token plus position embeddings (B, T, d) of ids (B, T): the first block's input."""
        return self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))

    def run(self, x: Tensor, start: int = 0, stop: int | None = None, memory=None, memory_padding=None,
            self_padding=None) -> Tensor:
        """Blocks start..stop-1 (Python slice bounds; all by default) on the residual stream x, without the final
        norm."""
        for block in self.blocks[start:stop]:
            x = block(x, memory, memory_padding, self_padding)
        return x

    def forward(self, idx, memory=None, memory_padding=None, self_padding=None):
        return self.norm(self.run(self.embed(idx), 0, None, memory, memory_padding, self_padding))


class SwitchModel(nn.Module):
    """What the LM and the encoder-decoder share: initialisation, the MoE layers' auxiliary outputs, and what the
    Trainer asks of a model (`gradest.train.TrainableModel`)."""

    config: SwitchConfig
    estimator: Estimator  # the routing rule of every MoE layer
    per_layer_metrics = False  # metrics.csv has the routing statistics averaged over the MoE layers only

    def init_weights(self):
        """GPT-2's: normal(0, 0.02) weights, zero biases, residual output projections scaled by 1/sqrt(2 L)."""
        layers = self.config.n_layer + self.config.n_encoder_layer
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("bias", "b_in", "b_out"):
                nn.init.zeros_(p)
            elif p.dim() >= 2 and leaf != "omega":
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "down.weight", "w_out")) \
                    else 0.02
                nn.init.normal_(p, 0.0, std)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def aux_loss(self) -> Tensor:
        """Load-balancing plus router z-loss of the last forward pass, summed over MoE layers."""
        return sum((m.aux.balance_loss + m.aux.z_loss for m in self.moe_layers()), torch.zeros(()))

    def routing_log_prob(self) -> Tensor | None:
        """log P of all the experts sampled in the last forward, per sequence (batch,): summed over each MoE
        layer's tokens (encoder and decoder layers have different lengths) and over the layers."""
        terms = [m.aux.log_prob.sum(-1) for m in self.moe_layers() if m.aux.log_prob is not None]
        return sum(terms) if terms else None

    def routing_stats(self) -> list[dict]:
        """Each MoE layer's routing in the last forward (`MoEAux.stats`)."""
        return [m.aux.stats for m in self.moe_layers()]

    def zero_moe(self, zero: bool):
        """Make every MoE layer output 0 (REINFORCE's zero-output baseline f(0) costs one such pass)."""
        for m in self.moe_layers():
            m.zero_output = zero

    def num_parameters(self, active: bool = False) -> int:
        """Parameters, or those a token uses (each MoE layer counts its router and k of its experts)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for m in self.moe_layers():
                per_expert = sum(p[0].numel() for name, p in m.named_parameters() if name.startswith(("w_", "b_")))
                total -= (m.experts - m.estimator.k) * per_expert
        return total


def token_cross_entropy(logits: Tensor, targets: Tensor, ignore: int, label_smoothing: float = 0.0) -> Tensor:
    """Per-token cross-entropy (B, T), 0 where the target is `ignore`, optionally label-smoothed; in float32 at
    least (bf16 logits under autocast are too coarse for a loss), float64 kept."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=ignore, reduction="none",
                           label_smoothing=label_smoothing)


class SwitchLM(SwitchModel):
    """Decoder-only causal language model with a weight-tied output head."""

    def __init__(self, config: SwitchConfig, estimator: Estimator):
        super().__init__()
        self.config, self.estimator = config, estimator
        self.decoder = Stack(config, estimator, config.n_layer, causal=True, cross=False)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()
        self.head.weight = self.decoder.tok.weight

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        """Logits (B, T, V) and, given targets, the per-token cross-entropy (B, T) (0 where ignored)."""
        logits = self.head(self.decoder(idx))
        if targets is None:
            return logits, None
        return logits, token_cross_entropy(logits, targets, self.config.pad_id)


class SwitchSeq2Seq(SwitchModel):
    """Encoder-decoder for translation: a bidirectional encoder, a causal decoder with cross-attention, one shared
    embedding for source, target and output (a joint vocabulary)."""

    def __init__(self, config: SwitchConfig, estimator: Estimator, pad_id: int):
        super().__init__()
        self.config, self.estimator, self.pad_id = config, estimator, pad_id
        embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, estimator, config.n_encoder_layer, causal=False, cross=False,
                             embedding=embedding)
        self.decoder = Stack(config, estimator, config.n_layer, causal=True, cross=True, embedding=embedding)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()
        self.head.weight = embedding.weight

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        padding = src == self.pad_id
        return self.encoder(src, self_padding=padding), padding

    def decode(self, tgt_in: Tensor, memory: Tensor, memory_padding: Tensor) -> Tensor:
        return self.head(self.decoder(tgt_in, memory, memory_padding))

    def forward(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor | None = None):
        """Logits (B, T, V) and, given tgt_out, the per-token cross-entropy (B, T) (0 on padding)."""
        logits = self.decode(tgt_in, *self.encode(src))
        if tgt_out is None:
            return logits, None
        return logits, token_cross_entropy(logits, tgt_out, self.pad_id)

    @torch.no_grad()
    def greedy(self, src: Tensor, bos_id: int, eos_id: int, max_len: int) -> list[list[int]]:
        """Greedy decoding (inference routing), one hypothesis per source sentence, without BOS/EOS."""
        memory, padding = self.encode(src)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            # the output projection of the last position only: over a joint vocabulary it is most of the work
            next_id = self.head(self.decoder(out, memory, padding)[:, -1]).argmax(-1)
            next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
            out = torch.cat([out, next_id[:, None]], 1)
            done |= next_id == eos_id
            if done.all():
                break
        return [row[:row.index(eos_id)] if eos_id in row else row for row in out[:, 1:].tolist()]
