"""The Switch MoE layer: same outputs and gradients as a naive per-token MoE, sparse dispatch, aux losses, options."""

import math

import pytest
import torch
import torch.nn.functional as F

from gradest.errors import GradestError
from gradest.estimators import REGISTRY, Routing, get_estimator
from gradest.moe import MoE
from gradest.problems import mix

D_MODEL, D_FF, N = 6, 10, 4
LAYER_NAMES = [name for name in REGISTRY if not REGISTRY[name].enumerates]
NAME_K = [(name, k) for name in LAYER_NAMES for k in (1, 2) if k == 1 or REGISTRY[name].supports_topk]


def make_layer(name, k=1, *, seed=0, omega=True, **options):
    """A float64 layer with biases, random omega and a router sharp enough that routing varies across tokens."""
    estimator = get_estimator(name, k=k) if REGISTRY[name].supports_topk else get_estimator(name)
    layer = MoE(D_MODEL, D_FF, N, estimator, omega=omega, bias=True, **options).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64) * 0.5)
        if layer.omega is not None:
            layer.omega.add_(1.0)
        for buffer in layer.buffers():  # a stateful estimator's state, as training would leave it
            buffer.copy_(torch.randn(buffer.shape, generator=g, dtype=buffer.dtype))
    return layer


def tokens(*shape, seed=1):
    return torch.randn(*shape, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def expert(layer, i, x):
    """Expert i written out on its own: W_out GELU(W_in x + b_in) + b_out."""
    return F.gelu(x @ layer.w_in[i] + layer.b_in[i]) @ layer.w_out[i] + layer.b_out[i]


def reference_routing(layer, x, seed, training=True):
    """The routing the layer draws from the same RNG state: the estimator called on the same logits."""
    torch.manual_seed(seed)
    return layer.estimator.route(x.reshape(-1, D_MODEL) @ layer.router.weight.T, training=training,
                                 state=layer.estimator_state())


def naive_moe(layer, x, routing):
    """The MoE by its definition, one token at a time: y_t = omega * sum_j g_tj E_{D_tj}(x_t)."""
    flat = x.reshape(-1, D_MODEL)
    rows = []
    for t in range(len(flat)):
        gates = routing.gates[t, 0]
        experts = range(N) if routing.experts is None else routing.experts[t, 0].tolist()
        offset = 0 if routing.offset is None else routing.offset[t, 0]
        rows.append(sum(g * expert(layer, int(i), flat[t]) for g, i in zip(gates, experts)) + offset)
    y = torch.stack(rows)
    return (y if layer.omega is None else y * layer.omega).reshape(x.shape)


def forward(layer, x, seed):
    torch.manual_seed(seed)
    return layer(x)


# --------------------------------------------------------------------------------------- equals the definition
@pytest.mark.parametrize("name,k", NAME_K)
def test_output_equals_naive_moe_and_mix(name, k):
    """For every estimator that applies (k = 1, 2): the layer's output equals a per-token loop over the same
    routing, and equals gradest.problems.mix of all experts' outputs; log_prob is the routing's."""
    layer = make_layer(name, k)
    x = tokens(2, 5)
    routing = reference_routing(layer, x, seed=3)  # before the forward, which updates a stateful one's state
    y = forward(layer, x, seed=3)
    torch.testing.assert_close(y, naive_moe(layer, x, routing), rtol=1e-12, atol=1e-12)
    every_expert = torch.stack([expert(layer, i, x.reshape(-1, D_MODEL)) for i in range(N)], dim=-2)  # (T, n, d)
    torch.testing.assert_close(y, (mix(every_expert, routing)[:, 0] * layer.omega).reshape(x.shape),
                               rtol=1e-12, atol=1e-12)
    if routing.log_prob is None:
        assert layer.aux.log_prob is None
    else:
        torch.testing.assert_close(layer.aux.log_prob, routing.log_prob.reshape(2, 5))


@pytest.mark.parametrize("name,k", [("switch", 1), ("sparsemixer", 1), ("reinmax", 1), ("topk", 2)])
def test_gradients_equal_naive_moe(name, k):
    """Router, expert, bias, omega and input gradients equal autograd through the naive per-token MoE with the
    same routing (so the estimator's backward reaches the router unchanged through the dispatch)."""
    layer = make_layer(name, k)
    x = tokens(7).requires_grad_()
    weight = torch.randn(7, D_MODEL, dtype=torch.float64)
    names, params = zip(*layer.named_parameters())
    assert set(names) == {"router.weight", "w_in", "b_in", "w_out", "b_out", "omega"}
    fast = torch.autograd.grad((forward(layer, x, seed=5) * weight).sum(), [x, *params])
    slow = torch.autograd.grad((naive_moe(layer, x, reference_routing(layer, x, seed=5)) * weight).sum(),
                               [x, *params])
    for name, a, b in zip(("x", *names), fast, slow):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------------------ dispatch
@pytest.mark.parametrize("name,k", NAME_K)
def test_sparse_estimators_run_only_the_chosen_experts(name, k, monkeypatch):
    """A sparse estimator runs each expert once, on exactly the tokens routed to it (in token order), tokens * k
    rows in all; a dense one runs every expert on every token in one batched call."""
    layer = make_layer(name, k)
    calls = []
    run = layer.expert_ffn

    def counting(x, w_in, *weights):
        calls.append((x, w_in))
        return run(x, w_in, *weights)

    monkeypatch.setattr(layer, "expert_ffn", counting)
    x = tokens(9)
    forward(layer, x, seed=2)
    routing = reference_routing(layer, x, seed=2)
    stats = layer.aux.stats
    if routing.experts is None:
        assert len(calls) == 1 and calls[0][1].shape == (N, D_MODEL, D_FF) and torch.equal(calls[0][0], x)
        return
    experts = routing.experts[:, 0]
    assert sum(stats["tokens_per_expert"]) == 9 * k
    assert stats["tokens_per_expert"] == torch.bincount(experts.reshape(-1), minlength=N).tolist()
    assert len(calls) == sum(c > 0 for c in stats["tokens_per_expert"])
    for block, w_in in calls:
        i = next(i for i in range(N) if torch.equal(w_in, layer.w_in[i]))
        routed_to_i = (experts == i).any(-1)
        assert torch.equal(block, x[routed_to_i])


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_inference_is_deterministic_argmax(name):
    """In eval mode two forwards are equal whatever the RNG, every token goes to its arg-max expert(s), and the
    output is the naive MoE under the estimator's inference routing."""
    layer = make_layer(name, 2 if REGISTRY[name].supports_topk else 1).eval()
    x = tokens(8)
    first = forward(layer, x, seed=1)
    second = forward(layer, x, seed=2)
    assert torch.equal(first, second) and layer.aux.stats["argmax_fraction"] == 1.0
    torch.testing.assert_close(first, naive_moe(layer, x, reference_routing(layer, x, 0, training=False)),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------- aux losses and stats
def hand_made(k):
    """Router = identity on 4 dimensions and tokens whose largest (top-2: two largest) coordinates are known."""
    layer = make_layer("topk", k, omega=False)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(N, D_MODEL, dtype=torch.float64))
    x = torch.zeros(8, D_MODEL, dtype=torch.float64)
    first, second = [3, 0, 1, 0, 3, 0, 2, 1], [0, 2, 0, 1, 2, 3, 3, 0]
    for t, (a, b) in enumerate(zip(first, second)):
        x[t, a], x[t, b] = 2.0, 1.0
    return layer, x, first, second


@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_is_alpha_n_sum_f_p(k):
    """balance_loss = alpha * n * sum_i f_i P_i, f_i the fraction of token-choices sent to i (over all k choices),
    P_i the mean of softmax(logits)_i; its gradient flows through P only."""
    layer, x, first, second = hand_made(k)
    layer.balance_coef = 0.03
    layer(x)
    chosen = first + (second if k == 2 else [])
    f = torch.tensor([chosen.count(i) / (8 * k) for i in range(N)], dtype=torch.float64)
    weight = layer.router.weight.detach().clone().requires_grad_()
    expected = 0.03 * N * (f * torch.softmax(x @ weight.T, -1).mean(0)).sum()
    torch.testing.assert_close(layer.aux.balance_loss, expected, rtol=1e-12, atol=0)
    layer.aux.balance_loss.backward()
    expected.backward()
    torch.testing.assert_close(layer.router.weight.grad, weight.grad, rtol=1e-12, atol=1e-15)


def test_z_loss_is_its_formula():
    """z_loss = z_loss_coef * mean_t logsumexp(z_t)^2, and exactly 0 when the coefficient is 0."""
    layer = make_layer("switch", z_loss_coef=1e-3)
    x = tokens(2, 5)
    layer(x)
    logits = x.reshape(-1, D_MODEL) @ layer.router.weight.T
    torch.testing.assert_close(layer.aux.z_loss, 1e-3 * torch.logsumexp(logits, -1).pow(2).mean(), rtol=1e-12,
                               atol=0)
    layer.z_loss_coef = 0.0
    layer(x)
    assert layer.aux.z_loss.item() == 0.0


def test_stats_on_a_hand_made_routing(monkeypatch):
    """tokens_per_expert counts the choices, argmax_fraction the choices that are among the token's k largest
    logits, router_entropy is the mean entropy of softmax(logits), dropped_fraction 0 without capacity."""
    layer, x, first, second = hand_made(2)
    experts = torch.tensor([[first[t], second[t]] for t in range(8)])
    experts[1, 1] = 1  # token 1: its second choice is not among its two largest logits (0 and 2)
    experts[6, 0] = 0  # token 6: nor is its first (2 and 3 are)
    routing = Routing(experts.unsqueeze(-2), torch.full((8, 1, 2), 0.5, dtype=torch.float64))
    monkeypatch.setattr(layer.estimator, "route", lambda logits, **kw: routing)
    layer(x)
    stats = layer.aux.stats
    assert stats["tokens_per_expert"] == torch.bincount(experts.reshape(-1), minlength=N).tolist()
    assert stats["argmax_fraction"] == 14 / 16 and stats["dropped_fraction"] == 0.0
    p = torch.softmax(x[:, :N], -1)
    assert math.isclose(stats["router_entropy"], -(p * p.log()).sum(-1).mean().item(), rel_tol=1e-12)


# -------------------------------------------------------------------------------------------------- capacity
def test_capacity_drops_exactly_the_tokens_beyond_it():
    """capacity = ceil(0.5 * 8 * 1 / 4) = 1 token per expert: the later tokens sent to a full expert (in token
    order) get zero output, the others their usual output; dropped_fraction = 4/8."""
    layer, x, first, _ = hand_made(1)  # experts 3, 0, 1, 0, 3, 0, 2, 1 for tokens 0..7
    full = layer(x)
    layer.capacity_factor = 0.5
    y = layer(x)
    dropped = [3, 4, 5, 7]
    kept = [t for t in range(8) if t not in dropped]
    assert torch.equal(y[dropped], torch.zeros(4, D_MODEL, dtype=torch.float64))
    torch.testing.assert_close(y[kept], full[kept], rtol=1e-12, atol=1e-12)
    assert layer.aux.stats["dropped_fraction"] == 0.5 and layer.aux.stats["tokens_per_expert"] == [3, 2, 1, 2]


@pytest.mark.parametrize("name,k", [("topk", 2), ("sparsemixer-v2", 2), ("st", 1)])
def test_capacity_matches_a_token_order_reference(name, k):
    """With capacity, each expert keeps its first ceil(cf * T * k / n) token-choices in token order (pairs
    (t, j) in that order) and the rest contribute 0; sparse and dense estimators alike."""
    layer = make_layer(name, k, capacity_factor=0.6)
    x = tokens(12)
    y = forward(layer, x, seed=4)
    routing = reference_routing(layer, x, seed=4)
    capacity = math.ceil(0.6 * 12 * k / N)
    experts = routing.gates[:, 0].argmax(-1, keepdim=True) if routing.experts is None else routing.experts[:, 0]
    load, keep = [0] * N, torch.ones(12, experts.shape[1], dtype=torch.bool)
    for t in range(12):
        for j, i in enumerate(experts[t].tolist()):
            load[i] += 1
            keep[t, j] = load[i] <= capacity
    assert not keep.all()
    gates = routing.gates.clone()
    gates[:, 0] *= keep
    torch.testing.assert_close(y, naive_moe(layer, x, Routing(routing.experts, gates)), rtol=1e-12, atol=1e-12)
    assert layer.aux.stats["dropped_fraction"] == (~keep).sum().item() / keep.numel()


# ----------------------------------------------------------------------------------------------------- omega
def test_omega_scales_the_output_and_learns():
    """The output is omega ⊙ (the MoE sum): changing omega rescales it per feature; omega gets that gradient."""
    layer = make_layer("topk").eval()
    x = tokens(5)
    y = layer(x)
    scale = torch.linspace(0.5, 2.0, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        layer.omega.mul_(scale)
    torch.testing.assert_close(layer(x), y * scale, rtol=1e-12, atol=1e-12)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.omega.grad, (y / (layer.omega / scale)).sum(0).detach(), rtol=1e-10, atol=0)


def test_omega_default_follows_the_estimator():
    """omega=None takes the estimator's default (SparseMixer on, Switch off); True/False override it."""
    def has_omega(name, **options):
        return MoE(D_MODEL, D_FF, N, get_estimator(name), **options).omega is not None

    assert has_omega("sparsemixer") and not has_omega("switch")
    assert has_omega("switch", omega=True) and not has_omega("sparsemixer", omega=False)
    assert all(has_omega(name) == REGISTRY[name].omega for name in LAYER_NAMES)


# ------------------------------------------------------------------------------------------ precision, errors
@pytest.mark.parametrize("name", ["sparsemixer", "reinmax"])
def test_router_stays_float32_under_bf16_autocast(name, monkeypatch):
    """Under bf16 autocast the router's logits are float32 (the same routing as in float32) while the experts
    run in bf16; the layer's output is close to the float32 one and backward reaches every parameter."""
    layer = make_layer(name).float()
    x = tokens(16).float()
    route, seen = layer.estimator.route, []
    monkeypatch.setattr(layer.estimator, "route", lambda logits, **kw: seen.append(logits.dtype) or
                        route(logits, **kw))
    y32 = forward(layer, x, seed=6)
    load32 = layer.aux.stats["tokens_per_expert"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = forward(layer, x, seed=6)
        (y16.float().square().sum() + layer.aux.balance_loss).backward()
    assert seen == [torch.float32, torch.float32] and layer.aux.stats["tokens_per_expert"] == load32
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)
    for param in layer.parameters():
        assert param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


def test_exact_cannot_route_a_layer():
    """exact needs one downstream pass per branch: the layer refuses it, at construction and in forward, with a
    GradestError that says why and names the estimators that apply."""
    with pytest.raises(GradestError, match=r"'exact' cannot be used inside an MoE layer.*one of: .*sparsemixer"):
        MoE(D_MODEL, D_FF, N, get_estimator("exact"))
    layer = make_layer("switch")
    layer.estimator = get_estimator("exact")
    with pytest.raises(GradestError, match="downstream pass per branch"):
        layer(tokens(3))


@pytest.mark.parametrize("options,words", [(dict(capacity_factor=0.0), "capacity_factor"),
                                           (dict(expert_dropout=1.0), "expert_dropout"),
                                           (dict(balance_coef=-1.0), "balance_coef")])
def test_bad_options_are_refused(options, words):
    """Invalid options give a GradestError naming the option and its valid values."""
    with pytest.raises(GradestError, match=words):
        MoE(D_MODEL, D_FF, N, get_estimator("switch"), **options)
    with pytest.raises(GradestError, match="larger than the number of experts"):
        MoE(D_MODEL, D_FF, N, get_estimator("topk", k=5))


def test_expert_dropout_only_in_training():
    """expert_dropout drops hidden activations in training (two forwards differ) and does nothing in eval."""
    layer = make_layer("topk", expert_dropout=0.5)
    plain = make_layer("topk").eval()
    x = tokens(6)
    assert not torch.equal(layer(x), layer(x))
    torch.testing.assert_close(layer.eval()(x), plain(x), rtol=0, atol=0)


def test_zero_output_pass_routes_nothing():
    """With zero_output (REINFORCE's f(0) pass) the layer outputs 0, draws no routing noise and keeps the aux of
    the pass being trained; afterwards it routes as before."""
    layer = make_layer("reinforce", 2)
    x = tokens(2, 5)
    y = forward(layer, x, seed=8)
    aux = layer.aux
    layer.zero_output = True
    state = torch.random.get_rng_state()
    assert torch.equal(layer(x), torch.zeros_like(x)) and layer.aux is aux
    assert torch.equal(torch.random.get_rng_state(), state)
    layer.zero_output = False
    torch.testing.assert_close(forward(layer, x, seed=8), y, rtol=0, atol=0)
    assert layer.experts == N and layer.k == 2


# ---------------------------------------------------------------------------------------------- estimator state
def test_stateful_estimator_state_is_a_buffer_updated_only_in_training():
    """default-moe's default outputs are a buffer of the layer (in its state_dict, so in checkpoints): zero at
    first, e^_i <- beta e^_i + (1 - beta) mean of e_i over the tokens routed to i after a training forward, left
    alone for an expert no token chose and in eval mode; a layer loaded from the state_dict continues identically."""
    layer = make_layer("default-moe", 1)
    with torch.no_grad():
        layer.state_default.zero_()
    assert "state_default" in layer.state_dict() and layer.state_default.shape == (N, D_MODEL)
    x = tokens(12)
    x = x[(x @ layer.router.weight.T).argmax(-1) != N - 1]  # no token for the last expert
    chosen = (x @ layer.router.weight.T).argmax(-1)
    assert len(x) >= 3 and len(set(chosen.tolist())) >= 2
    forward(layer, x, seed=0)
    outputs = torch.stack([expert(layer, i, x) for i in range(N)], 1)  # (T, n, d)
    beta = layer.estimator.beta
    for i in range(N):
        routed = chosen == i
        expected = (1 - beta) * outputs[routed, i].mean(0) if routed.any() else torch.zeros(D_MODEL)
        torch.testing.assert_close(layer.state_default[i], expected.to(layer.state_default.dtype))
    before = layer.state_default.clone()
    layer.eval()
    forward(layer, tokens(5, seed=3), seed=1)
    assert torch.equal(layer.state_default, before)  # inference reads the state, never writes it
    layer.train()
    copy = make_layer("default-moe", 1, seed=9)
    copy.load_state_dict(layer.state_dict())
    x2 = tokens(6, seed=4)
    torch.testing.assert_close(forward(copy, x2, seed=2), forward(layer, x2, seed=2), rtol=0, atol=0)
    assert torch.equal(copy.state_default, layer.state_default)


def test_default_outputs_enter_the_forward_value_unless_backward_only():
    """With forward=substitute the layer's output includes sum_{i not in S} p_i e^_i; with backward-only the value
    is the top-k MoE's and only the router's gradient changes."""
    x = tokens(7)
    outputs = {}
    for mode in ("substitute", "backward-only"):
        layer = MoE(D_MODEL, D_FF, N, get_estimator("default-moe", forward=mode), omega=False, bias=True).double()
        torch.manual_seed(0)
        layer.load_state_dict(make_layer("default-moe", 1, omega=False).state_dict())
        outputs[mode] = layer.eval()(x)
    plain = make_layer("topk", 1, omega=False).eval()(x)
    torch.testing.assert_close(outputs["backward-only"], plain, rtol=1e-12, atol=1e-12)
    assert (outputs["substitute"] - plain).abs().max() > 1e-3


# -------------------------------------------------------------------------- the SparseMixer code's settings
def test_balance_loss_from_the_sampled_distribution_is_the_reference_codes():
    """balance_probs="sampled": P_i is the mean of the distribution the estimator samples from, for sparsemixer
    the masked softmax (as in microsoft/SparseMixer: n * sum_i f_i mean_t masked_p_ti); "softmax" keeps Switch's
    P_i = mean of softmax(z). They differ when the mask removes experts."""
    x = tokens(40)
    losses = {}
    for probs in ("softmax", "sampled"):
        layer = MoE(D_MODEL, D_FF, N, get_estimator("sparsemixer", jitter_eps=0.3), balance_coef=1.0,
                    balance_probs=probs).double()
        torch.manual_seed(0)
        with torch.no_grad():
            layer.router.weight.copy_(torch.randn(N, D_MODEL, generator=torch.Generator().manual_seed(5)))
        torch.manual_seed(1)
        layer(x)
        losses[probs] = layer.aux.balance_loss
        z = x @ layer.router.weight.T
        keep = (z.max(-1, keepdim=True).values - z) <= 2 * 0.3 * torch.maximum(z.abs(), z.max(-1, keepdim=True).values)
        p = z.masked_fill(~keep, float("-inf")).softmax(-1) if probs == "sampled" else z.softmax(-1)
        f = torch.tensor(layer.aux.stats["tokens_per_expert"], dtype=p.dtype) / len(x)
        torch.testing.assert_close(losses[probs], N * (f * p.mean(0)).sum())
    assert (losses["softmax"] - losses["sampled"]).abs() > 1e-3


def test_router_bias_and_moe_in_the_first_layer_of_each_group():
    """router_bias adds router.bias to the logits; moe_first puts the MoE layers at 0, 2, 4 (the SparseMixer
    code's `layer_idx % 2 == 0`) instead of Switch's 1, 3, 5."""
    from gradest.model import SwitchConfig
    layer = MoE(D_MODEL, D_FF, N, get_estimator("switch"), router_bias=True).double()
    with torch.no_grad():
        layer.router.bias.copy_(torch.arange(N, dtype=torch.float64))
    x = tokens(3)
    torch.testing.assert_close(layer.router_logits(x), x @ layer.router.weight.T + layer.router.bias)
    assert [SwitchConfig(n_layer=6).is_moe(i) for i in range(6)] == [False, True] * 3
    assert [SwitchConfig(n_layer=6, moe_first=True).is_moe(i) for i in range(6)] == [True, False] * 3
