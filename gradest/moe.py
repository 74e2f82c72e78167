"""The Switch Transformer's mixture-of-experts feed-forward layer, routed by any gradest estimator (estimators.md §5).

    y = omega ⊙ sum_j g_j E_{D_j}(x),   E_i(x) = W_out_i act(W_in_i x),   (D, g) = estimator.route(W_router x)

The estimator decides which experts each token uses and returns gates that carry its backward, so this layer only
computes experts and mixes; it never needs to know which estimator it holds. Sparse estimators (switch, topk,
the SparseMixer family, reinforce) run only the chosen experts: the (token, choice) pairs are sorted by expert and
each expert runs once on its contiguous block. Dense estimators (st, gumbel-st, reinmax) need every expert's
output on every token. `act` is GELU or ReLU (`activation`). Each forward pass leaves `self.aux` (`MoEAux`): the
load-balancing and z losses for the trainer to add, the log-probability of the sampled routing for score-function
estimators, and routing stats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradest.errors import GradestError
from gradest.estimators import GATED, REGISTRY, Estimator, Routing, trainable
from gradest.estimators.base import (check_settings, coefficient, integer_at_least, one_of, optional,
                                     positive_at_most, unit_interval)

# the experts' activation (the SparseMixer code's is fairseq's default, ReLU)
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}
# where the balance loss's P_i comes from: see `MoE.balance_distribution`
BALANCE_PROBS = ("softmax", "sampled", "routed")
# auxiliary-loss-free balancing's update of the selection bias: see `MoE.update_expert_bias`
BIAS_UPDATES = ("sign", "centered")
LAYER_SETTINGS = {"d_model": integer_at_least(1), "d_ff": integer_at_least(1), "experts": integer_at_least(2),
                  "balance_coef": coefficient, "balance_probs": one_of(*BALANCE_PROBS),
                  "z_loss_coef": coefficient, "capacity_factor": optional(positive_at_most(1e6), "no token dropping"),
                  "expert_dropout": unit_interval, "activation": one_of(*ACTIVATIONS),
                  "bias_rate": coefficient, "bias_update": one_of(*BIAS_UPDATES)}


@dataclass
class MoEAux:
    """What one forward pass leaves for the trainer."""

    balance_loss: Tensor  # scalar: balance_coef * n * sum_i f_i P_i (Switch Transformer)
    z_loss: Tensor  # scalar: z_loss_coef * mean_t logsumexp(z_t)^2 (ST-MoE); 0 when the coefficient is 0
    log_prob: Tensor | None  # x.shape[:-1]: log-probability of the sampled experts (score-function estimators)
    # Python numbers, for logging: tokens_per_expert (n ints: token-choices routed to each expert, before capacity;
    # for a dense estimator the expert its forward value uses, onehot(D)), argmax_fraction (fraction of the
    # token-choices that inference routing would make too: among the token's k largest logits), router_entropy
    # (mean over tokens of the entropy of softmax(logits)), dropped_fraction (token-choices beyond capacity)
    stats: dict


class MoE(nn.Module):
    """Switch MoE feed-forward layer: (..., d_model) -> (..., d_model); sets `self.aux` to an `MoEAux`.

    Parameters, by name (a model that scales residual-output projections at init, like GPT-2, scales `w_out`):
      router.weight (n, d_model)        the router, always evaluated in float32 or wider (router.bias (n) only
                                        with router_bias=True, as in the SparseMixer code);
      w_in (n, d_model, d_ff), b_in (n, d_ff)       experts' input projections (biases only with bias=True);
      w_out (n, d_ff, d_model), b_out (n, d_model)  experts' output projections;
      omega (d_model)                   learnable output scale, only when omega is on.

    `experts` is n; `k` is the estimator's experts per token. Options: `omega` (None: the estimator's default,
    `estimator.omega`); `balance_coef` alpha of the load-balancing loss; `balance_probs`, where its P_i comes from:
    "softmax" of the logits (Switch), "sampled", the distribution the estimator samples from (its objective's
    first-stage masked, tempered softmax: the SparseMixer code's masked P), or "routed", the distribution this
    pass's routing chose from (the SparseMixer code's SwitchGate: softmax of the jittered logits; "sampled" for
    an estimator that routes from its objective); `z_loss_coef` of the router z-loss;
    `capacity_factor` (None: no token dropping): each expert takes at most ceil(capacity_factor * tokens * k / n)
    token-choices, in token order, and the rest contribute 0 (the residual connection around the layer carries
    those tokens); `expert_dropout` on the experts' hidden activations in training; `activation` "gelu" or
    "relu"; `bias` gives the experts' linear maps biases. Attribute `zero_output`:
    while True the layer outputs 0 (for REINFORCE's f(0) baseline pass).

    Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024 "Auxiliary-Loss-Free Load Balancing"): with
    `bias_rate` gamma > 0 the layer keeps a per-expert selection bias b, the buffer `expert_bias` (saved in
    checkpoints, no gradient), and routes with `estimator.route(z, bias=b)`: the experts are chosen from z + b (a
    sampling estimator draws from the distribution of z + b), the gates and their gradient stay the unbiased z's
    (`Estimator.selection_bias`). The trainer calls `update_expert_bias` after each optimiser step:
    b_i += gamma * sign(mean(c) - c_i), c_i the token-choices routed to expert i in that step ("sign", DeepSeek-V3);
    "centered" then subtracts the mean of the update (torchtitan's). No balance loss is implied: set balance_coef.
    """

    def __init__(self, d_model: int, d_ff: int, experts: int, estimator: Estimator, *, omega: bool | None = None,
                 balance_coef: float = 0.01, balance_probs: str = "softmax", z_loss_coef: float = 0.0,
                 capacity_factor: float | None = None, expert_dropout: float = 0.0, bias: bool = False,
                 router_bias: bool = False, activation: str = "gelu", bias_rate: float = 0.0,
                 bias_update: str = "sign"):
        super().__init__()
        check_settings("MoE", {"d_model": d_model, "d_ff": d_ff, "experts": experts, "balance_coef": balance_coef,
                               "balance_probs": balance_probs, "z_loss_coef": z_loss_coef,
                               "capacity_factor": capacity_factor, "expert_dropout": expert_dropout,
                               "activation": activation, "bias_rate": bias_rate, "bias_update": bias_update},
                       LAYER_SETTINGS)
        estimator.check(experts, GATED)
        self.d_model, self.d_ff, self.experts = d_model, d_ff, experts
        self.balance_coef, self.balance_probs, self.z_loss_coef = balance_coef, balance_probs, z_loss_coef
        self.capacity_factor, self.expert_dropout = capacity_factor, expert_dropout
        self.activation = activation
        self.bias_rate, self.bias_update = bias_rate, bias_update

        self.router = nn.Linear(d_model, experts, bias=router_bias)
        # only a balancing layer has the buffer: other layers' checkpoints stay as they were
        if bias_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(experts))
        else:
            self.expert_bias = None
        self.hold(estimator)
        self.w_in = nn.Parameter(torch.empty(experts, d_model, d_ff))
        self.w_out = nn.Parameter(torch.empty(experts, d_ff, d_model))
        self.b_in = nn.Parameter(torch.empty(experts, d_ff)) if bias else None
        self.b_out = nn.Parameter(torch.empty(experts, d_model)) if bias else None
        use_omega = estimator.omega if omega is None else omega
        self.omega = nn.Parameter(torch.empty(d_model)) if use_omega else None
        self.reset_parameters()
        self.aux: MoEAux | None = None
        # REINFORCE's zero-output baseline f(0) is the loss of an extra pass with every MoE output set to 0: such a
        # pass routes nothing, draws no noise and leaves `aux` to the pass being trained
        self.zero_output = False

        # fail at construction, not at the first training step, if the estimator enumerates branches (exact)
        probe = torch.zeros(1, experts)
        self.check_routing(estimator.route(probe, noise=torch.full((1, estimator.noise_dim(experts)), 0.5),
                                           state=self.estimator_state(), bias=self.expert_bias))

    def hold(self, estimator: Estimator) -> None:
        """Route with `estimator` from now on. A stateful estimator's state becomes buffers of this layer
        (`state_<name>`): they move with it, are saved in its state_dict (checkpoints) and restored on resume."""
        estimator.check(self.experts, GATED)
        if self.bias_rate > 0 and not estimator.selection_bias:
            names = ", ".join(name for name in trainable(GATED, estimator.k)
                              if REGISTRY[name].selection_bias)
            raise GradestError(f"estimator '{estimator.name}' cannot route with a selection bias, which "
                               f"auxiliary-loss-free balancing (bias_rate={self.bias_rate:g}) needs; valid: {names}")
        self.estimator, self.k = estimator, estimator.k
        for key, value in estimator.init_state(self.experts, self.d_model).items():
            if not hasattr(self, f"state_{key}"):
                self.register_buffer(f"state_{key}", value.to(self.router.weight.device))

    def estimator_state(self) -> dict[str, Tensor] | None:
        """The buffers the held estimator keeps (None for a stateless one)."""
        if not self.estimator.stateful:
            return None
        return {key: getattr(self, f"state_{key}") for key in self.estimator.init_state(self.experts, self.d_model)}

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: weights N(0, 0.02), biases 0, omega 1."""
        for weight in (self.router.weight, self.w_in, self.w_out):
            nn.init.normal_(weight, std=0.02)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)
        if self.omega is not None:
            nn.init.ones_(self.omega)

    @torch.no_grad()
    def reset_parameters_as_linear(self) -> None:
        """The SparseMixer code's initialisation: its router and each expert's two maps are nn.Linear layers,
        whose default (kaiming_uniform with a = sqrt(5)) draws weight and bias from U(-1/sqrt(fan_in),
        1/sqrt(fan_in)); omega 1 (SparseMixer's torch.ones). fan_in is d_model for the router and w_in (with b_in),
        d_ff for w_out (with b_out)."""
        for param, fan_in in ((self.router.weight, self.d_model), (self.router.bias, self.d_model),
                              (self.w_in, self.d_model), (self.b_in, self.d_model),
                              (self.w_out, self.d_ff), (self.b_out, self.d_ff)):
            if param is not None:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(param, -bound, bound)
        if self.omega is not None:
            nn.init.ones_(self.omega)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, experts={self.experts}, k={self.k}, "
                f"estimator={self.estimator.label}, omega={self.omega is not None}, "
                f"capacity_factor={self.capacity_factor}"
                + (f", bias_rate={self.bias_rate:g} ({self.bias_update})" if self.bias_rate > 0 else ""))

    @torch.no_grad()
    def update_expert_bias(self, total=None) -> None:
        """Auxiliary-loss-free balancing's step, after each optimiser step: b_i += gamma * sign(mean(c) - c_i)
        ("centered": minus the update's mean), c the token-choices routed to each expert by the last training
        forward (before capacity), summed over data-parallel ranks by `total` (an all-reduce; None: one process).
        Does nothing when bias_rate is 0."""
        if self.expert_bias is None:
            return
        c = torch.tensor(self.aux.stats["tokens_per_expert"], dtype=torch.float64, device=self.expert_bias.device)
        if total is not None:
            c = total(c)
        delta = self.bias_rate * torch.sign(c.mean() - c)
        if self.bias_update == "centered":
            delta = delta - delta.mean()
        self.expert_bias += delta.to(self.expert_bias.dtype)

    def check_routing(self, routing: Routing) -> None:
        if routing.branch_prob is not None:
            names = ", ".join(trainable(GATED, self.k))
            raise GradestError(
                f"estimator '{self.estimator.name}' cannot be used inside an MoE layer: it enumerates every expert "
                f"tuple as a weighted branch and needs one downstream pass per branch; measure it on a synthetic "
                f"problem (gradest compare) and train the layer with one of: {names}")

    # ------------------------------------------------------------------------------------------------- pieces
    def router_logits(self, tokens: Tensor) -> Tensor:
        """z = W_router x in float32 (float64 stays float64), also under autocast: routing decisions and the
        router's softmax are sensitive to rounding (Switch Transformer §2.4, selective precision)."""
        dtype = torch.promote_types(tokens.dtype, torch.float32)
        with torch.autocast(tokens.device.type, enabled=False):
            bias = None if self.router.bias is None else self.router.bias.to(dtype)
            return F.linear(tokens.to(dtype), self.router.weight.to(dtype), bias)

    def expert_ffn(self, x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor,
                   b_out: Tensor | None) -> Tensor:
        """One expert on rows x (rows, d_model) -> (rows, d_model), given its weights; given every expert's
        weights (leading dim n), every expert on every row -> (n, rows, d_model)."""
        h = x @ w_in
        if b_in is not None:
            h = h + b_in.unsqueeze(-2).to(h.dtype)  # .to: under autocast h is bf16, and stays so
        h = ACTIVATIONS[self.activation](h)
        if self.training and self.expert_dropout > 0:
            h = F.dropout(h, self.expert_dropout)
        y = h @ w_out
        if b_out is not None:
            y = y + b_out.unsqueeze(-2).to(y.dtype)
        return y

    def expert_weights(self) -> list[tuple]:
        """(w_in, b_in, w_out, b_out) of each expert, split by one unbind per parameter. Indexing w_in[i] once
        per expert instead would make autograd zero-fill and add a full-size (n, ...) gradient per expert
        (select's backward): memory traffic quadratic in n, already 5% of the step at n = 8 on the CPU."""
        per_param = [[None] * self.experts if p is None else p.unbind(0)
                     for p in (self.w_in, self.b_in, self.w_out, self.b_out)]
        return list(zip(*per_param))

    def capacity(self, tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.k / self.experts)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.zero_output:
            return torch.zeros_like(x)
        tokens = x.reshape(-1, self.d_model)
        T = tokens.shape[0]
        logits = self.router_logits(tokens)
        state = self.estimator_state()
        routing = self.estimator.route(logits, training=self.training, state=state, bias=self.expert_bias)
        self.check_routing(routing)
        gates = routing.gates[:, 0]  # one branch per token: (T, k), or (T, n) for a dense estimator
        # the experts each token's forward value uses; a dense estimator's gates are onehot(D) * p_D in value
        choice = gates.detach().topk(self.k, -1).indices if routing.experts is None else routing.experts[:, 0]
        pair_expert = choice.reshape(-1)  # pair t * k + j: token t's j-th choice
        counts = torch.bincount(pair_expert, minlength=self.experts)

        # the log-softmax serves the balance loss (P_i), the z-loss (logsumexp) and the entropy stat
        lse = logits.logsumexp(-1, keepdim=True)
        log_p = logits - lse
        p = log_p.exp()
        with torch.no_grad():
            chooser = logits if self.expert_bias is None else logits + self.expert_bias.to(logits.dtype)
            top = chooser.topk(choice.shape[-1], dim=-1).indices
            argmax_hits = (choice.unsqueeze(-1) == top.unsqueeze(-2)).any(-1).sum()
            entropy = -(p * log_p).sum(-1).mean()
            # one host transfer for everything the dispatch and the stats need (a GPU sync costs the same for n+2)
            *loads, argmax_hits, entropy = torch.cat([counts.double(), argmax_hits.double().view(1),
                                                      entropy.double().view(1)]).tolist()
        tokens_per_expert = [int(c) for c in loads]

        capacity = self.capacity(T)
        rows_per_expert = tokens_per_expert if capacity is None else [min(c, capacity) for c in tokens_per_expert]
        if routing.experts is None:
            kept = None if capacity is None else self.dispatch_order(pair_expert, counts, capacity)
            y = self.dense_mix(tokens, gates, choice, kept)
        else:
            order = self.dispatch_order(pair_expert, counts, capacity)
            y, y_sorted = self.sparse_mix(tokens, gates, order, rows_per_expert)
            if state is not None and self.training:
                self.estimator.update_state(state, pair_expert[order], y_sorted.detach())
        if routing.offset is not None:
            y = y + routing.offset[:, 0].to(y.dtype)
        if self.omega is not None:
            y = y * self.omega.to(y.dtype)

        pairs = pair_expert.numel()
        balance = logits.new_zeros(())
        if self.balance_coef:
            probs = self.balance_distribution(logits, p, routing)
            balance = self.balance_coef * self.experts * (counts.to(p.dtype) / pairs * probs.mean(0)).sum()
        z_loss = self.z_loss_coef * lse.square().mean() if self.z_loss_coef else logits.new_zeros(())
        stats = {"tokens_per_expert": tokens_per_expert, "argmax_fraction": argmax_hits / pairs,
                 "router_entropy": entropy, "dropped_fraction": (pairs - sum(rows_per_expert)) / pairs}
        log_prob = routing.log_prob.reshape(x.shape[:-1]) if routing.log_prob is not None else None
        self.aux = MoEAux(balance, z_loss, log_prob, stats)
        return y.reshape(x.shape)

    def balance_distribution(self, logits: Tensor, p: Tensor, routing: Routing) -> Tensor:
        """Each token's distribution (T, n) whose mean over tokens is the balance loss's P_i, by `balance_probs`:
        "softmax": p = softmax(z) (Switch Transformer); "sampled": the estimator's objective's first stage;
        "routed": the distribution this pass's routing chose from, where the estimator reports one (Switch: the
        softmax of its jittered logits in training), else the objective's."""
        if self.balance_probs == "softmax":
            return p
        if self.balance_probs == "routed" and routing.probs is not None:
            return routing.probs[:, 0]
        return self.estimator.objective().probabilities(logits)

    @staticmethod
    def dispatch_order(pair_expert: Tensor, counts: Tensor, capacity: int | None) -> Tensor:
        """The pairs grouped by expert, in token order within each (a stable sort), without those beyond an
        expert's capacity."""
        order = torch.argsort(pair_expert, stable=True)
        if capacity is not None:
            first_of_expert = counts.cumsum(0) - counts
            rank = torch.arange(len(order), device=order.device) - first_of_expert[pair_expert[order]]
            order = order[rank < capacity]
        return order

    def sparse_mix(self, tokens: Tensor, gates: Tensor, order: Tensor,
                   rows_per_expert: list[int]) -> tuple[Tensor, Tensor]:
        """sum_j g_j E_{D_j}(x), and the experts' outputs on the pairs in `order` (ungated), running each expert
        once on the block of pairs routed to it. A Python loop over
        the n experts rather than one padded batched matmul: on the CPU it is as fast when loads are even and
        several times faster when they are not (padding computes the busiest expert's load n times)."""
        token = torch.div(order, self.k, rounding_mode="floor")
        blocks = tokens[token].split(rows_per_expert)
        outputs = [self.expert_ffn(block, *weights) for block, weights in zip(blocks, self.expert_weights())
                   if len(block)]
        if not outputs:  # no tokens, or none within capacity
            return tokens.new_zeros(tokens.shape), tokens.new_zeros(0, self.d_model)
        y_sorted = torch.cat(outputs)
        weighted = y_sorted * gates.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
        return y_sorted.new_zeros(tokens.shape).index_add(0, token, weighted), y_sorted

    def dense_mix(self, tokens: Tensor, gates: Tensor, choice: Tensor, kept: Tensor | None) -> Tensor:
        """sum_i g_i E_i(x) over every expert (gradest.problems.mix, dense case), in one batched matmul.
        `kept`: the (token, choice) pairs within capacity, `choice` (T, k) the experts the forward value uses: a
        pair beyond capacity gets gate 0, and a token with none left gets 0 from every expert."""
        if kept is not None:
            pair_kept = gates.new_zeros(choice.numel()).index_fill(0, kept, 1).view(choice.shape)
            mask = pair_kept.amax(-1, keepdim=True).expand(gates.shape).scatter(-1, choice, pair_kept)
            gates = gates * mask
        y_all = self.expert_ffn(tokens, self.w_in, self.b_in, self.w_out, self.b_out)  # (n, T, d_model)
        return torch.einsum("tn,ntd->td", gates.to(y_all.dtype), y_all)
