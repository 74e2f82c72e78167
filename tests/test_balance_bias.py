"""Auxiliary-loss-free balancing (DeepSeek-V3): the selection bias steers which experts are chosen, never the gates
or their gradient, and its update follows b_i += gamma * sign(mean(c) - c_i) on hand-computed loads."""

import math

import pytest
import torch
from scipy import stats

from gradest.errors import GradestError
from gradest.estimators import REGISTRY, get_estimator
from gradest.estimators.base import sparsity_mask
from gradest.moe import MoE
from gradest.train import Trainer, TrainConfig
from helpers import assert_one_line_error, cli

BIASED = sorted(name for name, cls in REGISTRY.items() if cls.selection_bias)
pytestmark = pytest.mark.usefixtures("one_thread")


def onehot_layer(estimator="topk", gamma=0.01, update="sign"):
    """4 experts whose router sends a token e_i (a row of the identity) to expert i: loads are what we feed."""
    layer = MoE(4, 8, 4, get_estimator(estimator), bias_rate=gamma, bias_update=update, balance_coef=0.0)
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(4))
    return layer


def tokens_with_loads(loads):
    return torch.cat([torch.eye(4)[i].expand(c, 4) for i, c in enumerate(loads)])


def test_the_estimators_that_take_a_selection_bias():
    assert BIASED == ["first-order", "sparsemixer", "sparsemixer-v2", "sparsemixer-v2*", "switch", "topk"]


@pytest.mark.parametrize("update, expected", [("sign", [-1, 1, 1, 0]), ("centered", [-1.25, 0.75, 0.75, -0.25])])
def test_update_rule_on_hand_computed_loads(update, expected):
    """Loads c = (4, 1, 1, 2), mean 2: sign(mean - c) = (-1, 1, 1, 0); centered: minus its mean 1/4."""
    layer = onehot_layer(gamma=0.01, update=update)
    layer(tokens_with_loads([4, 1, 1, 2]))
    assert layer.aux.stats["tokens_per_expert"] == [4, 1, 1, 2]
    layer.update_expert_bias()
    torch.testing.assert_close(layer.expert_bias, 0.01 * torch.tensor(expected), rtol=0, atol=1e-9)
    # a second step adds to it; with another rank's loads (0, 4, 0, 0) summed in: c = (4, 5, 1, 2), mean 3
    before = layer.expert_bias.clone()
    layer.update_expert_bias(lambda c: c + torch.tensor([0.0, 4, 0, 0], dtype=c.dtype))
    step = torch.tensor([-1.0, -1, 1, 1])  # mean of the update 0: centering changes nothing
    torch.testing.assert_close(layer.expert_bias, before + 0.01 * step, rtol=0, atol=1e-9)


def test_balanced_loads_leave_the_bias_and_no_rate_means_no_buffer():
    layer = onehot_layer()
    layer(tokens_with_loads([2, 2, 2, 2]))
    layer.update_expert_bias()
    assert layer.expert_bias.abs().max() == 0
    plain = MoE(4, 8, 4, get_estimator("topk"))
    assert plain.expert_bias is None and "expert_bias" not in plain.state_dict()
    assert "expert_bias" in layer.state_dict()  # saved with checkpoints, restored on resume


def test_the_bias_steers_selection():
    """Tokens all sent to expert 0 by their logits go to expert 1 once b_1 - b_0 exceeds the logit gap (10)."""
    layer = onehot_layer()
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.0, 10.5, 0, 0]))
    layer(tokens_with_loads([3, 0, 0, 0]))
    assert layer.aux.stats["tokens_per_expert"] == [0, 3, 0, 0]


@pytest.mark.parametrize("name", BIASED)
def test_zero_bias_routes_as_no_bias(name):
    estimator = get_estimator(name, k=2) if REGISTRY[name].supports_topk else get_estimator(name)
    z = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    noise = torch.rand(50, estimator.noise_dim(6), dtype=torch.float64)
    for training in (True, False):
        plain = estimator.route(z, noise=noise, training=training)
        biased = estimator.route(z, noise=noise, training=training, bias=torch.zeros(6, dtype=torch.float64))
        assert torch.equal(plain.experts, biased.experts)
        torch.testing.assert_close(biased.gates, plain.gates, rtol=0, atol=0)


def test_topk_chooses_by_z_plus_b_and_gates_by_z():
    """DeepSeek-V3's rule on a softmax router: S = top-k of z + b; g_i = softmax(z)_i on S, renormalised if asked;
    the gradient of sum_i w_i g_i is that of the unbiased softmax at S."""
    torch.manual_seed(0)
    z = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64)
    w = torch.randn(20, 2, dtype=torch.float64)
    for renormalize in (False, True):
        routing = get_estimator("topk", k=2, renormalize=renormalize).route(z, bias=b)
        chosen = (z + b).detach().topk(2, -1).indices
        assert torch.equal(routing.experts[:, 0], chosen)
        expected = torch.softmax(z, -1).gather(-1, chosen)
        if renormalize:
            expected = expected / expected.sum(-1, keepdim=True)
        torch.testing.assert_close(routing.gates[:, 0], expected, rtol=1e-12, atol=0)
        (grad,) = torch.autograd.grad((routing.gates[:, 0] * w).sum(), z)
        (want,) = torch.autograd.grad((expected * w).sum(), z)
        torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)


def test_switch_chooses_by_jittered_z_plus_b():
    torch.manual_seed(1)
    z = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3, -0.2, 0.0, 0.1], dtype=torch.float64)
    u = torch.rand(30, 4, dtype=torch.float64)
    routing = get_estimator("switch", jitter_eps=0.1).route(z, noise=u, bias=b)
    jittered = z * (0.9 + 0.2 * u)
    d = (jittered + b).detach().argmax(-1, keepdim=True)
    assert torch.equal(routing.experts[:, 0], d)
    torch.testing.assert_close(routing.gates[:, 0], torch.softmax(jittered, -1).gather(-1, d), rtol=1e-12, atol=0)


def test_sparsemixer_draws_from_the_masked_softmax_of_z_plus_b_and_gates_by_z():
    """With fixed uniforms: D = inverse CDF of the masked softmax of z + b (mask relative to z + b); forward gate
    c * p_D, p the softmax of z over the same kept experts, c = 1 on the arg-max of z + b or when U > 1/2, else
    1/2; gradient 2 * grad p_D (the mid-point estimator's gate path)."""
    torch.manual_seed(2)
    z = torch.randn(200, 5, dtype=torch.float64, requires_grad=True)
    b = 0.5 * torch.randn(5, dtype=torch.float64)
    noise = torch.rand(200, 2, dtype=torch.float64)
    estimator = get_estimator("sparsemixer")  # mask=reference, r = 0.1
    routing = estimator.route(z, noise=noise, bias=b)

    chooser = (z + b).detach()
    keep = sparsity_mask(chooser, chooser.amax(-1, keepdim=True), "reference", 0.1)
    q = torch.softmax(chooser.masked_fill(~keep, -math.inf), -1)
    d = torch.searchsorted(q.cumsum(-1), noise[:, :1].contiguous(), right=True).clamp_max(4)
    assert torch.equal(routing.experts[:, 0], d)
    p = torch.softmax(z.masked_fill(~keep, -math.inf), -1).gather(-1, d)
    c = torch.where((d == chooser.argmax(-1, keepdim=True)) | (noise[:, 1:] > 0.5), 1.0, 0.5).double()
    torch.testing.assert_close(routing.gates[:, 0], c * p, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(routing.gates.sum(), z)
    (want,) = torch.autograd.grad(2 * p.sum(), z)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)


def test_sampled_frequencies_follow_the_biased_distribution():
    """N = 20,000 draws for one token: the counts fit softmax(z + b) (no mask), chi-square p > 0.001."""
    z = torch.tensor([[0.5, 0.0, -0.5, 1.0]], dtype=torch.float64).expand(20_000, 4)
    b = torch.tensor([0.0, 1.0, 0.5, -1.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    noise = torch.rand(20_000, 2, dtype=torch.float64, generator=generator)
    routing = get_estimator("sparsemixer", mask="none").route(z, noise=noise, bias=b)
    counts = torch.bincount(routing.experts.reshape(-1), minlength=4).numpy()
    expected = torch.softmax(z[0] + b, -1).numpy() * 20_000
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    unbiased = torch.softmax(z[0], -1).numpy() * 20_000  # and measurably not the unbiased softmax
    assert stats.chisquare(counts, unbiased).pvalue < 1e-6


@pytest.mark.parametrize("name", ["st", "reinforce", "densemixer", "default-moe", "gumbel-st"])
def test_estimators_without_a_selection_rule_are_refused(name):
    with pytest.raises(GradestError, match="cannot route with a selection bias.*valid: first-order"):
        MoE(8, 16, 4, get_estimator(name), bias_rate=0.001)
    with pytest.raises(GradestError, match="cannot route with a selection bias"):
        get_estimator(name).route(torch.zeros(2, 4), bias=torch.zeros(4))


def test_cli_refuses_a_balance_bias_with_an_estimator_without_the_rule():
    result = cli("run", "--estimator", "st", "--model", "balance_bias_rate=0.001", "--steps", "1")
    assert_one_line_error(result, "selection bias", "valid:")
    result = cli("run", "--estimator", "switch", "--model", "balance_bias_update=mean", "--steps", "1")
    assert_one_line_error(result, "balance_bias_update", "sign, centered")


def test_trainer_updates_every_layer_after_each_step(tmp_path):
    """Three steps of a tiny LM with gamma = 0.001 and no balance loss: each layer's bias is a sum of three
    updates in {-gamma, 0, gamma}, not all zero, and it is in the checkpoint the run resumes from."""
    config = TrainConfig(steps=3, batch_size=4, block_size=16, experts=4, eval_interval=3, eval_batches=1,
                         checkpoint_interval=3, warmup=1, estimator="sparsemixer",
                         model={"n_layer": 2, "n_head": 2, "d_model": 16, "d_ff": 32, "balance_coef": 0.0,
                                "balance_bias_rate": 0.001})
    trainer = Trainer(config, tmp_path)
    trainer.run()
    layers = trainer.model.moe_layers()
    assert layers
    for layer in layers:
        steps = layer.expert_bias / 0.001
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
        assert steps.abs().max() <= 3 and steps.abs().max() >= 1
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert any(key.endswith("expert_bias") for key in saved["model"])
