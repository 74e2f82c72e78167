"""The model settings that reproduce microsoft/SparseMixer's fairseq transformer, each against the reference's
formula: activation, expert biases, dense activation dropout, sinusoidal positions and embedding scale, fairseq's
initialisation, Switch's balance loss on its jittered softmax; and every setting at its default is today's model."""

import math

import pytest
import torch
import torch.nn.functional as F

from gradest.errors import GradestError
from gradest.estimators import get_estimator
from gradest.model import FeedForward, SwitchConfig, SwitchLM, SwitchSeq2Seq, sinusoidal_positions
from gradest.moe import MoE

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=8, d_ff=12, experts=4)
NEW_SETTINGS_AT_DEFAULT = {"activation": "gelu", "expert_bias": False, "dense_activation_dropout": 0.0,
                           "positions": "learned", "embed_scale": False, "init": "gpt2", "balance_probs": "softmax"}


def lm(seed=0, **settings):
    torch.manual_seed(seed)
    return SwitchLM(SwitchConfig(**{**TINY, **settings}), get_estimator("switch", jitter_eps=0.1)).double()


# ------------------------------------------------------------------------------------------- today's model
def lm_training_loss(**settings):
    """The training-mode loss (mean cross-entropy plus aux) and the logits' sum of a tiny LM with dropout."""
    torch.manual_seed(0)
    config = SwitchConfig(**{**TINY, "dropout": 0.1, "expert_dropout": 0.1, "balance_coef": 0.01, **settings})
    model = SwitchLM(config, get_estimator("switch", jitter_eps=0.1)).double()
    idx = torch.randint(11, (3, 8))
    logits, ce = model(idx, idx.roll(-1, 1))
    return (ce.mean() + model.aux_loss()).item(), logits.sum().item()


def mt_training_loss(**settings):
    torch.manual_seed(1)
    config = SwitchConfig(**{**TINY, "n_encoder_layer": 2, "dropout": 0.1, "expert_dropout": 0.1,
                             "post_ln": True, **settings})
    model = SwitchSeq2Seq(config, get_estimator("sparsemixer"), pad_id=0).double()
    src = torch.randint(1, 11, (3, 6))
    src[0, 4:] = 0
    tgt = torch.randint(1, 11, (3, 5))
    logits, ce = model(src, tgt[:, :-1], tgt[:, 1:])
    return (ce.mean() + model.aux_loss()).item(), logits.sum().item()


def test_every_new_setting_at_its_default_is_todays_model():
    """Same seed, same draws: the loss and logits the model gave before these settings existed (computed with
    that code, float64, one thread), and bit-identical with the settings given explicitly at their defaults."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm_now, mt_now = lm_training_loss(), mt_training_loss()
        assert lm_training_loss(**NEW_SETTINGS_AT_DEFAULT) == lm_now
        assert mt_training_loss(**NEW_SETTINGS_AT_DEFAULT) == mt_now
    finally:
        torch.set_num_threads(threads)
    # the values before the change; 1e-12 allows another machine's float64 summation order, nothing more
    assert lm_now == pytest.approx((2.443487314960853, 1.580364698639681), rel=1e-12, abs=1e-12)
    assert mt_now == pytest.approx((2.410457947082632, 1.2174869590692972), rel=1e-12, abs=1e-12)
    a, b = lm(), lm(**NEW_SETTINGS_AT_DEFAULT)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[key], b.state_dict()[key]) for key in a.state_dict())


# --------------------------------------------------------------------------------------------- activation
def test_relu_when_asked_in_the_dense_ffn_and_the_experts():
    model = lm(activation="relu", expert_bias=True).eval()
    dense, moe = model.decoder.blocks[0].ffn, model.decoder.blocks[1].ffn
    assert isinstance(dense, FeedForward) and isinstance(moe, MoE)
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(dense(x), dense.down(F.relu(dense.up(x))), rtol=0, atol=0)
    w_in, b_in, w_out, b_out = moe.expert_weights()[0]
    torch.testing.assert_close(moe.expert_ffn(x, w_in, b_in, w_out, b_out), F.relu(x @ w_in + b_in) @ w_out + b_out,
                               rtol=0, atol=0)
    gelu = lm().decoder.blocks[0].ffn.eval()
    torch.testing.assert_close(gelu(x), gelu.down(F.gelu(gelu.up(x))), rtol=0, atol=0)
    with pytest.raises(GradestError, match="activation"):
        SwitchConfig(activation="swish")


# ------------------------------------------------------------------------------------------------- biases
def test_expert_biases_present_only_when_asked_and_they_move_the_output():
    """The reference's experts are nn.Linear layers (with biases), as is every dense FFN here and there."""
    plain, biased = lm().decoder.blocks[1].ffn, lm(expert_bias=True).decoder.blocks[1].ffn
    assert plain.b_in is None and plain.b_out is None
    assert biased.b_in.shape == (4, 12) and biased.b_out.shape == (4, 8)
    assert all(lm(expert_bias=flag).decoder.blocks[0].ffn.up.bias is not None for flag in (False, True))
    model = lm(expert_bias=True).eval()
    x = torch.randint(11, (2, 8))
    before = model(x)[0]
    with torch.no_grad():
        # not a constant: the final layer norm would take a constant shift out again
        model.decoder.blocks[1].ffn.b_out.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)))
    assert (model(x)[0] - before).abs().max() > 1e-3
    # a token's active parameters count its expert's biases: n - k experts' worth of 8*12 + 12 + 12*8 + 8 left out
    total, active = model.num_parameters(), model.num_parameters(active=True)
    assert total - active == 3 * (8 * 12 + 12 + 12 * 8 + 8)


# ------------------------------------------------------------------------------------- activation dropout
def test_dense_activation_dropout_in_training_only():
    """In training the dense FFN is down(dropout(act(up(x)))) on the same draws; in eval no dropout, and two
    passes agree."""
    dense = lm(dense_activation_dropout=0.5).decoder.blocks[0].ffn
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    trained = dense.train()(x)
    torch.manual_seed(4)
    torch.testing.assert_close(trained, dense.down(F.dropout(F.gelu(dense.up(x)), 0.5)), rtol=0, atol=0)
    assert not torch.equal(dense(x), dense(x))
    torch.testing.assert_close(dense.eval()(x), dense.down(F.gelu(dense.up(x))), rtol=0, atol=0)
    assert torch.equal(dense(x), dense(x))
    assert lm().decoder.blocks[0].ffn.activation_dropout == 0  # the default: no dropout, as before


def test_dense_activation_dropout_drops_its_fraction_of_hidden_units():
    """At p = 0.3 the zeroed fraction of 40,000 hidden units is 0.3 within 5 standard errors, the kept ones
    scaled by 1 / 0.7."""
    dense = lm(dense_activation_dropout=0.3).decoder.blocks[0].ffn.train()
    seen = {}
    dense.down.register_forward_hook(lambda module, inputs, output: seen.update(h=inputs[0]))
    x = torch.randn(10_000 // 3 + 1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    dense(x)
    clean = F.gelu(dense.up(x))
    dropped = (seen["h"] == 0) & (clean != 0)
    count = clean.numel()
    assert abs(dropped.double().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / count)
    kept = seen["h"] != 0
    torch.testing.assert_close(seen["h"][kept], clean[kept] / 0.7)


# -------------------------------------------------------------------------------------------- positions
def fairseq_sinusoid(position, d_model):
    """fairseq's SinusoidalPositionalEmbedding.get_embedding, one row, written out in Python floats: half sines,
    half cosines of position * 10000^(-j / (half - 1)), a zero last when d_model is odd."""
    half = d_model // 2
    frequencies = [math.exp(-j * math.log(10000) / (half - 1)) for j in range(half)]
    row = [math.sin(position * w) for w in frequencies] + [math.cos(position * w) for w in frequencies]
    return row + [0.0] * (d_model % 2)


@pytest.mark.parametrize("d_model", [8, 9])
def test_sinusoidal_positions_are_fairseqs_from_padding_idx_plus_one(d_model):
    """Sequence position t is fairseq's position padding_idx + 1 + t with its dictionary's padding_idx 1. The
    table is float32, as fairseq computes it: each angle p w is rounded to about p w 2^-24, which bounds the
    difference from the exact sinusoid."""
    table = sinusoidal_positions(8, d_model)
    exact = torch.tensor([fairseq_sinusoid(2 + t, d_model) for t in range(8)], dtype=torch.float64)
    assert table.dtype == torch.float32 and table.shape == (8, d_model)
    tolerance = 4 * (2 + 8) * 2 ** -24 + 2 ** -23
    torch.testing.assert_close(table.double(), exact, rtol=0, atol=tolerance)
    if d_model % 2:
        assert (table[:, -1] == 0).all()


def test_sinusoidal_positions_are_fairseqs_rows_bit_for_bit_in_a_right_padded_batch():
    """A transcription of fairseq's get_embedding (float32) indexed by its make_positions on a right-padded batch
    (pad id 1, as fairseq's dictionaries): every real token's row is ours at its sequence position, exactly."""
    padding_idx, d_model = 1, 10
    tokens = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 1]])
    half = d_model // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(16, dtype=torch.float).unsqueeze(1) * frequencies.unsqueeze(0)
    weights = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(16, -1)
    weights[padding_idx, :] = 0
    real = tokens.ne(padding_idx).int()
    positions = (torch.cumsum(real, dim=1).type_as(real) * real).long() + padding_idx
    theirs = weights.index_select(0, positions.view(-1)).view(2, 5, -1)
    ours = sinusoidal_positions(5, d_model).expand(2, 5, d_model)
    assert torch.equal(ours[real.bool()], theirs[real.bool()])


def test_sinusoidal_positions_and_embedding_scale_make_the_first_blocks_input():
    """x = sqrt(d) * token embedding + sinusoid (fairseq's forward_embedding); no position parameters."""
    model = lm(positions="sinusoidal", embed_scale=True).eval()
    idx = torch.randint(11, (2, 6))
    expected = math.sqrt(8) * model.decoder.tok(idx) + sinusoidal_positions(6, 8).double()
    torch.testing.assert_close(model.decoder.embed(idx), expected, rtol=0, atol=0)
    assert model.decoder.pos is None
    assert not any("sinusoid" in key for key in model.state_dict())  # fixed: not saved, not learned
    assert not any(name.startswith("decoder.pos") for name, _ in model.named_parameters())
    unscaled = lm(embed_scale=False).eval()
    torch.testing.assert_close(unscaled.decoder.embed(idx),
                               unscaled.decoder.tok(idx) + unscaled.decoder.pos.weight[:6], rtol=0, atol=0)
    with pytest.raises(GradestError, match="d_model >= 4"):
        SwitchConfig(**{**TINY, "d_model": 2, "n_head": 1, "positions": "sinusoidal"})


# ------------------------------------------------------------------------------------------ initialisation
def assert_uniform(values, bound, what):
    """Drawn from U(-bound, bound): the sample variance is bound^2 / 3 within 5 standard errors (the variance of a
    uniform's sample variance is 4 bound^4 / (45 N)), no value beyond the bound, and the largest within
    40 bound / N of it (P(max |x| < bound (1 - 40 / N)) = (1 - 40 / N)^N < e^-40)."""
    values = values.detach().double().flatten()
    count = len(values)
    assert abs(values.var().item() - bound ** 2 / 3) < 5 * math.sqrt(4 * bound ** 4 / (45 * count)), what
    assert values.abs().max() <= bound, what
    assert values.abs().max() > bound * (1 - 40 / count), what


def assert_normal(values, std, what):
    """Drawn from N(0, std^2): the sample variance is std^2 within 5 standard errors (std^2 sqrt(2 / N)), the mean
    0 within 5 std / sqrt(N)."""
    values = values.detach().double().flatten()
    count = len(values)
    assert abs(values.var().item() - std ** 2) < 5 * std ** 2 * math.sqrt(2 / count), what
    assert abs(values.mean().item()) < 5 * std / math.sqrt(count), what


def test_fairseq_initialisation_follows_each_reference_layer():
    """A model wide enough (d 64, d_ff 256, 8 experts) that every tensor's sample variance tells the
    initialisations apart, with a fixed seed."""
    d, d_ff, n = 64, 256, 8
    torch.manual_seed(0)
    config = SwitchConfig(vocab_size=300, block_size=16, n_layer=2, n_encoder_layer=2, n_head=4, d_model=d,
                          d_ff=d_ff, experts=n, router_bias=True, expert_bias=True, init="fairseq")
    model = SwitchSeq2Seq(config, get_estimator("sparsemixer"), pad_id=0)
    xavier_qkv = math.sqrt(6 / (d + d)) / math.sqrt(2)  # xavier_uniform, gain 1/sqrt(2), of a d x d map
    for name, attention in [("encoder self", model.encoder.blocks[0].attn), ("decoder cross",
                                                                            model.decoder.blocks[1].cross)]:
        for part, weight in zip("qkv", (attention.q.weight, *attention.kv.weight.chunk(2, 0))):
            assert_uniform(weight, xavier_qkv, f"{name} {part} weight")
        assert_uniform(torch.cat([attention.q.bias, attention.kv.bias]), 1 / math.sqrt(d), f"{name} q, k, v bias")
        assert_uniform(attention.proj.weight, math.sqrt(6 / (d + d)), f"{name} output weight")
        assert (attention.proj.bias == 0).all()
    dense, moe = model.decoder.blocks[0].ffn, model.decoder.blocks[1].ffn  # moe_every=2: MoE in layer 1
    assert isinstance(dense, FeedForward) and isinstance(moe, MoE)
    for weight, fan_in in ((dense.up.weight, d), (dense.up.bias, d), (dense.down.weight, d_ff),
                           (dense.down.bias, d_ff), (moe.router.weight, d), (moe.router.bias, d),
                           (moe.w_in, d), (moe.b_in, d), (moe.w_out, d_ff), (moe.b_out, d_ff)):
        assert_uniform(weight, 1 / math.sqrt(fan_in), f"nn.Linear default, fan_in {fan_in}, {tuple(weight.shape)}")
    assert (moe.omega == 1).all()
    embedding = model.encoder.tok.weight
    assert embedding is model.decoder.tok.weight is model.head.weight
    assert (embedding[0] == 0).all()  # the padding token's row
    assert_normal(embedding[1:], d ** -0.5, "token embedding")
    assert_normal(model.decoder.pos.weight, d ** -0.5, "learned positions")
    norm = model.decoder.blocks[0].norms[0]
    assert (norm.weight == 1).all() and (norm.bias == 0).all()


def test_gpt2_initialisation_stays_the_default():
    model = lm(init="gpt2")
    assert_normal(model.decoder.tok.weight, 0.02, "token embedding")
    assert (model.decoder.blocks[0].attn.q.bias == 0).all()


# ------------------------------------------------------------------------------ Switch's balance loss P_i
def reference_switch_balance(logits, jitter, eps):
    """The reference SwitchGate's balance term on given jitter uniforms: p = softmax(logits * u), f the fraction
    of tokens at argmax p, n * sum_i mean_t(p_ti) f_i (its +1e-6 in f's denominator left out)."""
    p = (logits * (1 - eps + 2 * eps * jitter)).softmax(-1)
    f = F.one_hot(p.argmax(-1), logits.shape[-1]).double().mean(0)
    return logits.shape[-1] * (p.mean(0) * f).sum()


def test_switch_routed_balance_loss_is_the_softmax_of_its_jittered_logits():
    """balance_probs="routed": Switch's P_i is the mean softmax of the jittered logits it routed with, on the same
    draws, value and gradient; "softmax" and "sampled" use the clean logits (for Switch its objective is the
    plain softmax); in eval (no jitter) all three agree."""
    eps, n, d = 0.5, 4, 6
    x = torch.randn(50, d, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    losses = {}
    for probs in ("softmax", "sampled", "routed"):
        torch.manual_seed(7)
        layer = MoE(d, 10, n, get_estimator("switch", jitter_eps=eps), balance_coef=1.0, balance_probs=probs)
        layer = layer.double()
        with torch.no_grad():
            layer.router.weight.mul_(100)  # logits of order 1, so the jitter changes p noticeably
        torch.manual_seed(8)
        jitter = torch.rand(50, n, dtype=torch.float64)  # the draw route() makes next, from the same state
        torch.manual_seed(8)
        layer(x)
        losses[probs] = layer.aux.balance_loss
        logits = layer.router_logits(x)
        if probs == "routed":
            expected = reference_switch_balance(logits, jitter, eps)
            torch.testing.assert_close(losses[probs], expected, rtol=1e-12, atol=0)
            (ours,) = torch.autograd.grad(losses[probs], layer.router.weight)
            (theirs,) = torch.autograd.grad(expected, layer.router.weight)
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
            layer.eval()
            layer(x)
            f = torch.tensor(layer.aux.stats["tokens_per_expert"], dtype=torch.float64) / 50
            torch.testing.assert_close(layer.aux.balance_loss, n * (f * logits.softmax(-1).mean(0)).sum())
        else:
            f = torch.tensor(layer.aux.stats["tokens_per_expert"], dtype=torch.float64) / 50
            torch.testing.assert_close(losses[probs], n * (f * logits.softmax(-1).mean(0)).sum())
    assert torch.equal(losses["softmax"], losses["sampled"])
    assert (losses["routed"] - losses["softmax"]).abs() > 1e-4


def test_routed_is_sampled_for_an_estimator_that_routes_from_its_objective():
    """SparseMixer draws from its masked softmax, its objective: "routed" and "sampled" are the same number."""
    x = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    losses = []
    for probs in ("sampled", "routed"):
        torch.manual_seed(10)
        layer = MoE(6, 10, 4, get_estimator("sparsemixer", jitter_eps=0.3), balance_coef=1.0,
                    balance_probs=probs).double()
        torch.manual_seed(11)
        layer(x)
        losses.append(layer.aux.balance_loss)
    assert torch.equal(*losses)
