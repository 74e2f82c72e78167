"""The Switch Transformer (Fedus et al. 2021, as in the SparseMixer experiments; docs/estimators.md §5), in one file.

A decoder-only causal language model (`SwitchLM`) and an encoder-decoder for translation (`SwitchSeq2Seq`). An MoE
feed-forward layer (gradest.moe.MoE, holding any routing estimator) replaces the dense FFN in every
`moe_every`-th layer; `moe_every = 0` gives the dense baseline, whose FFN has one expert's size and so the same
active parameters per token as a top-1 MoE model. Pre-LN by default, post-LN as an option. Settings from fairseq's
transformer, which the SparseMixer code builds on (ReLU, expert biases, dense activation dropout, sinusoidal
positions, scaled embeddings, fairseq's initialisation), reproduce the reference model; each default is gradest's own.
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
from gradest.estimators.base import (Constraint, boolean, check_settings, coefficient, integer_at_least, one_of,
                                     optional, positive_at_most, unit_interval)
from gradest.moe import ACTIVATIONS, BALANCE_PROBS, BIAS_UPDATES, MoE


@dataclass
class SwitchConfig:
    vocab_size: int = 65
    block_size: int = 128  # longest sequence
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
    # the balance loss's P_i: "softmax", "sampled" (the objective's: the SparseMixer code's masked P) or "routed"
    # (what the routing chose from: Switch's jittered softmax, as the SparseMixer code's SwitchGate); gradest.moe
    balance_probs: str = "softmax"
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    omega: bool | None = None  # None: the estimator's default
    post_ln: bool = False
    router_bias: bool = False  # the SparseMixer code's router is nn.Linear with a bias
    moe_first: bool = False  # MoE in the first layer of each moe_every (0, 2, 4: the SparseMixer code), not the last
    pad_id: int = -100  # target id the loss ignores
    # fairseq's transformer, which the SparseMixer code builds on (the README's "Reproducing the paper"); each
    # default is gradest's own choice
    activation: str = "gelu"  # of the dense FFN and the experts: "gelu" or "relu" (fairseq's activation_fn)
    expert_bias: bool = False  # the experts' two linear maps have biases (the dense FFN's always do: nn.Linear)
    dense_activation_dropout: float = 0.0  # dropout on the dense FFN's hidden activations (experts: expert_dropout)
    positions: str = "learned"  # "learned" or "sinusoidal" (fairseq's SinusoidalPositionalEmbedding)
    embed_scale: bool = False  # token embeddings times sqrt(d_model) (fairseq's embed_scale)
    init: str = "gpt2"  # "gpt2": N(0, 0.02) weights; "fairseq": the reference's layers' own initialisations
    # auxiliary-loss-free balancing (DeepSeek-V3): the rate gamma of each MoE layer's selection-bias update, 0 off;
    # "sign" (DeepSeek-V3) or "centered" (torchtitan: minus the update's mean); gradest.moe.MoE
    balance_bias_rate: float = 0.0
    balance_bias_update: str = "sign"

    def __post_init__(self):
        check_settings("model", dataclasses.asdict(self), MODEL_SETTINGS)
        if self.d_model % self.n_head:
            raise GradestError(f"invalid model setting n_head={self.n_head}: it must divide d_model={self.d_model}; "
                               f"valid: " + ", ".join(str(h) for h in range(1, self.d_model + 1)
                                                      if self.d_model % h == 0))
        stacks = (self.n_layer, self.n_encoder_layer)
        if self.moe_every > 0 and not any(self.is_moe(layer) for depth in stacks for layer in range(depth)):
            # a model with no MoE layer would train dense while its run says an estimator routes it
            raise GradestError(f"invalid model setting n_layer={self.n_layer}: with moe_every={self.moe_every} "
                               f"(layers {self.moe_every - 1}, {2 * self.moe_every - 1}, ... are MoE) the model has "
                               f"no MoE layer; valid: n_layer >= {self.moe_every}, moe_every=1 or moe_first=true "
                               f"(moe_every=0 is the dense baseline)")
        if self.positions == "sinusoidal" and self.d_model < 4:  # the frequencies divide by d_model // 2 - 1
            raise GradestError(f"invalid model setting d_model={self.d_model} for positions=sinusoidal; valid: "
                               f"d_model >= 4")

    def is_moe(self, layer: int) -> bool:
        return self.moe_every > 0 and layer % self.moe_every == (0 if self.moe_first else self.moe_every - 1)


MODEL_SETTINGS = {
    "vocab_size": integer_at_least(1), "block_size": integer_at_least(1), "n_layer": integer_at_least(1),
    "n_encoder_layer": integer_at_least(0), "n_head": integer_at_least(1), "d_model": integer_at_least(1),
    "d_ff": integer_at_least(1), "experts": integer_at_least(2), "moe_every": integer_at_least(0),
    "dropout": unit_interval, "expert_dropout": unit_interval, "balance_coef": coefficient,
    "z_loss_coef": coefficient, "capacity_factor": optional(positive_at_most(1e6), "no token dropping"),
    "omega": optional(boolean, "the estimator's default"), "post_ln": boolean, "router_bias": boolean,
    "moe_first": boolean, "balance_probs": one_of(*BALANCE_PROBS),
    "pad_id": Constraint(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "activation": one_of(*ACTIVATIONS), "expert_bias": boolean, "dense_activation_dropout": unit_interval,
    "positions": one_of("learned", "sinusoidal"), "embed_scale": boolean, "init": one_of("gpt2", "fairseq"),
    "balance_bias_rate": coefficient, "balance_bias_update": one_of(*BIAS_UPDATES),
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
    """The dense FFN: down(dropout(act(up(x)))), the dropout on the hidden activations in training only."""

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff)
        self.down = nn.Linear(config.d_ff, config.d_model)
        self.activation = ACTIVATIONS[config.activation]
        self.activation_dropout = config.dense_activation_dropout

    def forward(self, x):
        h = self.activation(self.up(x))
        if self.training and self.activation_dropout > 0:
            h = F.dropout(h, self.activation_dropout)
        return self.down(h)


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
                        expert_dropout=config.expert_dropout, router_bias=config.router_bias,
                        bias=config.expert_bias, activation=config.activation,
                        bias_rate=config.balance_bias_rate, bias_update=config.balance_bias_update)
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


# fairseq numbers the positions of a sequence from padding_idx + 1, and its dictionaries put <pad> at 1
FAIRSEQ_FIRST_POSITION = 2


def sinusoidal_positions(count: int, d_model: int, first: int = FAIRSEQ_FIRST_POSITION) -> Tensor:
    """fairseq's SinusoidalPositionalEmbedding (tensor2tensor's) of positions first, ..., first + count - 1, in
    float32 as it computes them: (count, d_model), row p = [sin(p w_0), ..., sin(p w_{h-1}), cos(p w_0), ...,
    cos(p w_{h-1})] with h = d_model // 2 and w_j = 10000^(-j / (h - 1)), a zero column last when d_model is odd.
    In a right-padded batch (gradest's) sequence position t is fairseq's position `first + t` for every real token;
    a padding token gets the next position where fairseq gives it a zero row, which changes no real token's
    output (padding keys are masked, and in the decoder it comes after them)."""
    half = d_model // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(first, first + count, dtype=torch.float32)[:, None] * frequencies[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if d_model % 2:
        table = torch.cat([table, torch.zeros(count, 1)], dim=1)
    return table


class Stack(nn.Module):
    """Embeddings, blocks and a final norm (pre-LN only)."""

    def __init__(self, config, estimator, n_layer, causal, cross, embedding=None):
        super().__init__()
        self.tok = embedding or nn.Embedding(config.vocab_size, config.d_model)
        # learned positions are a parameter `pos`; sinusoidal ones a fixed table, left out of the state_dict
        self.pos = nn.Embedding(config.block_size, config.d_model) if config.positions == "learned" else None
        if config.positions == "sinusoidal":
            self.register_buffer("sinusoids", sinusoidal_positions(config.block_size, config.d_model),
                                 persistent=False)
        self.embed_scale = math.sqrt(config.d_model) if config.embed_scale else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, estimator, causal, cross) for i in range(n_layer))
        self.norm = nn.Identity() if config.post_ln else nn.LayerNorm(config.d_model)

    def embed(self, idx: Tensor) -> Tensor:
        """Token plus position embeddings (B, T, d) of ids (B, T), the tokens' scaled by sqrt(d) with
        embed_scale (fairseq's x = embed_scale * embed_tokens(x) + positions): the first block's input."""
        tokens = self.tok(idx)
        if self.embed_scale is not None:
            tokens = tokens * self.embed_scale
        return self.drop(tokens + self.positions(idx.shape[1], idx.device))

    def positions(self, length: int, device) -> Tensor:
        """The position embeddings (length, d) of positions 0..length-1."""
        if self.pos is None:
            return self.sinusoids[:length]
        return self.pos(torch.arange(length, device=device))

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
        """The initialisation `config.init` names: GPT-2's or fairseq's."""
        if self.config.init == "fairseq":
            self.init_fairseq()
        else:
            self.init_gpt2()

    def init_gpt2(self):
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

    @torch.no_grad()
    def init_fairseq(self):
        """What the reference's layers do by themselves (fairseq 0.12, the SparseMixer code):
          attention (MultiheadAttention.reset_parameters): q, k, v weights xavier_uniform with gain 1/sqrt(2),
            each as its own d x d map (the fused kv here is two), their biases nn.Linear's U(+-1/sqrt(d)); the
            output projection xavier_uniform (gain 1) with bias 0;
          dense FFN, experts and router: nn.Linear's default, U(+-1/sqrt(fan_in)) for weights and biases
            (the SparseMixer layer builds them with nn.Linear: MoE.reset_parameters_as_linear);
          token embeddings (transformer_base.Embedding), and learned positions (LearnedPositionalEmbedding):
            normal(0, d^-0.5), the padding token's row 0 (the output head shares the token embedding);
          layer norms: ones and zeros."""
        d = self.config.d_model
        linear_bound = 1 / math.sqrt(d)  # nn.Linear's default for a map from d inputs
        for module in self.modules():
            if isinstance(module, Attention):
                for weight in (module.q.weight, *module.kv.weight.chunk(2, 0)):
                    nn.init.xavier_uniform_(weight, gain=1 / math.sqrt(2))
                for bias in (module.q.bias, module.kv.bias):
                    nn.init.uniform_(bias, -linear_bound, linear_bound)
                nn.init.xavier_uniform_(module.proj.weight)
                nn.init.zeros_(module.proj.bias)
            elif isinstance(module, FeedForward):
                module.up.reset_parameters()
                module.down.reset_parameters()
            elif isinstance(module, MoE):
                module.reset_parameters_as_linear()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, d ** -0.5)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        pad_id = getattr(self, "pad_id", None)  # the translation model's padding token; the LM has none
        if pad_id is not None and 0 <= pad_id < self.config.vocab_size:
            for stack in (self.encoder, self.decoder):
                stack.tok.weight[pad_id].zero_()

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

    def update_expert_bias(self, total=None) -> None:
        """Every MoE layer's auxiliary-loss-free balancing step (`MoE.update_expert_bias`), after an optimiser
        step; `total` sums a tensor over data-parallel ranks."""
        for m in self.moe_layers():
            m.update_expert_bias(total)

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
