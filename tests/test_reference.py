"""Cross-implementation checks: gradest's estimators against the authors' own code, on identical inputs.

- `densemixer` against the `densemixer` package (1.0.1): the package only ships replacement `forward` methods for
  Hugging Face MoE blocks, so its OLMoE block's forward is called on a stand-in block whose router returns given
  logits and whose experts return given outputs (it touches nothing else of the block). It computes its softmax in
  float32, so the comparison is in float32.
- `sparsemixer` (v1, with omega) and `switch` against transcriptions of microsoft/SparseMixer's routers
  (`SparseMixer`, `SwitchGate`), written from its source with their random draws as arguments: the same expert
  draws, coin flips and jitter are fed to both sides.
- `sparsemixer-v2` (mask "reference") against the `sparsemixer` routing function of transformers' PhiMoE
  (modeling_phimoe), k = 1, 2, r = 0.01, 0.1, training and eval, float64: its torch draws (Gumbel exponentials,
  coin uniforms) are replaced by ones that make its Gumbel-max pick gradest's inverse-CDF expert and its coin
  (r > 0.75) agree with gradest's (c < 0.25); chosen experts, gate multipliers and logit gradients agree. Its
  rounded 1/3 (0.3333 in float32) is patched to 1/3, the as-shipped difference bounded (1.0e-4 relative).
"""

from __future__ import annotations

import types

import pytest
import torch

from gradest.estimators import get_estimator
from gradest.problems import mix
from helpers import Drawn


def densemixer_package(logits, outputs, k, renormalize):
    """The package's OLMoE/Qwen3-MoE block forward on logits (T, n) and every expert's outputs (T, n, d)."""
    from densemixer.models.olmoe_custom import CustomOlmoeSparseMoeBlock  # does not patch transformers

    T, n, d = outputs.shape
    block = types.SimpleNamespace(gate=lambda hidden: logits, top_k=k, num_experts=n, norm_topk_prob=renormalize,
                                  experts=[(lambda hidden, i=i: outputs[:, i]) for i in range(n)])
    y, _ = CustomOlmoeSparseMoeBlock.forward(block, torch.zeros(1, T, d))
    return y.reshape(T, d)


@pytest.mark.parametrize("k,renormalize", [(1, False), (1, True), (2, False), (2, True), (3, True)])
def test_densemixer_equals_the_package(k, renormalize):
    """Forward value, router-logit gradient and every expert output's gradient equal the package's."""
    g = torch.Generator().manual_seed(k + 10 * renormalize)
    T, n, d = 11, 5, 4
    logits = torch.randn(T, n, generator=g) * 2
    outputs = torch.randn(T, n, d, generator=g)
    weight = torch.randn(T, d, generator=g)  # a linear downstream loss with a different weight per token

    def run(forward):
        z, e = logits.clone().requires_grad_(), outputs.clone().requires_grad_()
        y = forward(z, e)
        (y * weight).sum().backward()
        return y.detach(), z.grad, e.grad

    theirs = run(lambda z, e: densemixer_package(z, e, k, renormalize))
    estimator = get_estimator("densemixer", k=k, renormalize=renormalize)
    ours = run(lambda z, e: mix(e, estimator.route(z))[:, 0])
    for name, a, b in zip(("output", "logit gradient", "expert gradient"), ours, theirs):
        assert b.abs().max() > 1e-3, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------- microsoft/SparseMixer, transcribed
# Transcriptions of the reference repository's routers (sparsemixer/sparsemixer.py, sparsemixer/switchgate.py),
# written from reading its source, with its random draws made arguments: `exponential` (tokens, n) is the
# Exp(1) noise of its Gumbel-max sampling, `coin` (tokens, 1) its torch.rand_like, `jitter` (tokens, n) Switch's.
class ReferenceSparseMixerCore(torch.autograd.Function):
    """Forward multiplier * (0.5 + 0.5 mask); backward the incoming gradient doubled (the mask ignored)."""

    @staticmethod
    def forward(ctx, multiplier, firstorder_mask):
        return multiplier * torch.add(0.5, firstorder_mask, alpha=0.5).type_as(multiplier)

    @staticmethod
    def backward(ctx, grad):
        return grad * 2, None


def reference_sparsemixer(logits, omega, jitter_eps, exponential=None, coin=None, training=True):
    """(sample, multiplier) of the reference `SparseMixer.forward`; the layer outputs expert_sample(x) * multiplier."""
    with torch.no_grad():
        threshold, max_ind = logits.max(dim=-1, keepdim=True)
        factor = logits.abs().clamp(min=threshold)
        masked = ((threshold - logits) / factor) > (2 * jitter_eps)
    logits = logits.masked_fill(masked, float("-inf"))
    p = logits.softmax(dim=-1)
    if training:
        sample = (logits - exponential.log()).max(dim=-1)[1].unsqueeze(-1)
        multiplier = p.gather(dim=1, index=sample)
        mask_for_firstorder = torch.logical_or(sample == max_ind, coin > 0.5)
        multiplier = ReferenceSparseMixerCore.apply(multiplier, mask_for_firstorder)
    else:
        sample = max_ind
        multiplier = p.gather(dim=1, index=sample)
    return sample, multiplier * omega


def reference_switch_gate(logits, jitter_eps, jitter=None, training=True):
    """(sample, multiplier) of the reference `SwitchGate.forward`."""
    if training:
        logits = logits * (jitter * 2 * jitter_eps + 1.0 - jitter_eps)
    p = logits.softmax(dim=-1)
    sample = torch.argmax(p, dim=-1)
    return sample.unsqueeze(-1), p.gather(dim=-1, index=sample.unsqueeze(1))


def uniform_selecting(p, sample):
    """The uniform that gradest's inverse-CDF sampling maps to `sample`: the middle of its CDF interval."""
    cdf = p.detach().cumsum(-1)
    upper = cdf.gather(-1, sample)
    return (upper - p.detach().gather(-1, sample) / 2) / cdf[..., -1:]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("jitter_eps", [0.1, 0.3])
def test_sparsemixer_equals_the_reference_router(training, jitter_eps):
    """`sparsemixer` with omega in the MoE output equals the reference SparseMixer router on the same draws: its
    chosen experts, the output e_D * multiplier, and the gradients of the logits and of omega (float64)."""
    from gradest.estimators.base import sparsity_mask
    g = torch.Generator().manual_seed(int(jitter_eps * 10) + training)
    T, n, d = 64, 6, 3
    logits = (torch.randn(T, n, generator=g, dtype=torch.float64) * 0.6).requires_grad_()
    omega = (1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)).requires_grad_()
    outputs = torch.randn(T, n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(T, d, generator=g, dtype=torch.float64)
    exponential = torch.empty(T, n, dtype=torch.float64).exponential_(generator=g)
    coin = torch.rand(T, 1, generator=g, dtype=torch.float64)

    sample, multiplier = reference_sparsemixer(logits, omega, jitter_eps, exponential, coin, training)
    theirs_y = outputs.gather(1, sample[..., None].expand(T, 1, d))[:, 0] * multiplier
    theirs = (theirs_y, *torch.autograd.grad((theirs_y * weight).sum(), [logits, omega]))

    estimator = get_estimator("sparsemixer", jitter_eps=jitter_eps)
    z = logits.detach()
    keep = sparsity_mask(z, z.max(-1, keepdim=True).values, "reference", jitter_eps)
    p = z.masked_fill(~keep, float("-inf")).softmax(-1)
    noise = torch.cat([uniform_selecting(p, sample), coin], -1)
    routing = estimator.route(logits, training=training, noise=noise if training else None)
    assert torch.equal(routing.experts[:, 0], sample)
    ours_y = mix(outputs, routing)[:, 0] * omega
    ours = (ours_y, *torch.autograd.grad((ours_y * weight).sum(), [logits, omega]))
    if training:
        assert 0 < (~keep).sum() and (sample != z.argmax(-1, keepdim=True)).any()  # both branches exercised
    for name, a, b in zip(("output", "logit gradient", "omega gradient"), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_switch_equals_the_reference_switch_gate(training):
    """`switch` equals the reference SwitchGate on the same jitter draws: chosen experts, output, logit gradient."""
    g = torch.Generator().manual_seed(3)
    T, n, d, eps = 64, 5, 3, 0.1
    logits = torch.randn(T, n, generator=g, dtype=torch.float64).requires_grad_()
    outputs = torch.randn(T, n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(T, d, generator=g, dtype=torch.float64)
    jitter = torch.rand(T, n, generator=g, dtype=torch.float64)

    sample, multiplier = reference_switch_gate(logits, eps, jitter, training)
    theirs_y = outputs.gather(1, sample[..., None].expand(T, 1, d))[:, 0] * multiplier
    (theirs_grad,) = torch.autograd.grad((theirs_y * weight).sum(), logits)

    routing = get_estimator("switch", jitter_eps=eps).route(logits, training=training,
                                                           noise=jitter if training else None)
    assert torch.equal(routing.experts[:, 0], sample)
    ours_y = mix(outputs, routing)[:, 0]
    (ours_grad,) = torch.autograd.grad((ours_y * weight).sum(), logits)
    torch.testing.assert_close(ours_y, theirs_y, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------- Hugging Face PhiMoE: `sparsemixer`
class PhimoeDraws:
    """Stands in for `torch` inside transformers' modeling_phimoe, so that its `sparsemixer` sees gradest's noise
    (T, 2k): the k selection uniforms u_j, then the k coin uniforms c_j (same approach as tests/test_hf.py).

    Per stage j the native code draws E = torch.empty_like(masked z).exponential_() and picks argmax(masked z -
    log E) (Gumbel-max), then r = torch.rand_like(...) (stage 2: .uniform_() again) and keeps scale 1 when r > 0.75.
    gradest picks stage j's expert by inverse CDF of the same masked softmax at u_j, and keeps scale 1 when
    c_j < 0.25. So E is 1 except 1e-300 on the inverse-CDF expert of u_j under the native stage's own masked
    softmax (-log E = 690.8 dwarfs any logit gap, so Gumbel-max picks it), and r = 1 - c_j (r > 0.75 iff c_j < 0.25).
    With k = 1 the native second stage (which gradest does not have) gets u = c = 1/2. With `exact_thirds` the
    native Heun scale torch.add(0.3333, mask, alpha=0.6667) (float32, so 0.33329999446868896, not 1/3) is
    replaced by 1/3 in float64."""

    def __init__(self, noise, k, exact_thirds):
        self.noise, self.k, self.exact_thirds = noise, k, exact_thirds
        self.selections = self.coins = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def uniform(self, j, column):
        return self.noise[:, column:column + 1] if j < self.k else torch.full_like(self.noise[:, :1], 0.5)

    def empty_like(self, masked_gates, **kwargs):
        j, self.selections = self.selections, self.selections + 1
        u = self.uniform(j, j)
        cdf = torch.softmax(masked_gates.detach(), -1).cumsum(-1)
        cdf = (cdf / cdf[:, -1:]).contiguous()
        chosen = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_max(cdf.shape[-1] - 1)
        return torch.ones_like(masked_gates.detach()).scatter(-1, chosen, 1e-300).as_subclass(Drawn)

    def rand_like(self, like, **kwargs):
        j, self.coins = self.coins, self.coins + 1
        return (1 - self.uniform(j, self.k + j)).reshape(like.shape).to(like.dtype).as_subclass(Drawn)

    def add(self, input, other, *, alpha=1, **kwargs):
        if self.exact_thirds and isinstance(input, float) and input == 0.3333 and alpha == 0.6667:
            return torch.where(other, torch.tensor(1.0, dtype=torch.float64), torch.tensor(1 / 3, dtype=torch.float64))
        return torch.add(input, other, alpha=alpha, **kwargs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("jitter_eps", [0.01, 0.1])
@pytest.mark.parametrize("k", [1, 2])
def test_sparsemixer_v2_equals_phimoe_sparsemixer(k, jitter_eps, training, monkeypatch):
    """`sparsemixer-v2` (mask "reference") equals the `sparsemixer` routing function of transformers' PhiMoE on the
    same logits and draws (float64): chosen experts, gate multipliers, and the router-logit gradient of a random
    linear loss of sum_j multiplier_j e_{D_j}.

    The native function ignores its top_k and always routes 2 experts by sequential top-2; its first stage does not
    depend on the second, so for k = 1 its first column is compared and its second is dropped. Its backward ignores
    the Heun scale (it is p_D's softmax gradient, as gradest's grad_scale = 1), but its forward uses the rounded
    constant 0.3333 (float32) for 1/3: the main comparison patches it to 1/3 (float64), and the as-shipped run is
    bounded separately (relative 1.0e-4, only on the lost coin flips). gradest builds its 1/3 in the gates' dtype
    (this test found it rounded to float32 before), so every gate is compared to 1e-12."""
    modeling_phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    from gradest.estimators.base import sparsity_mask
    g = torch.Generator().manual_seed(100 * k + int(1000 * jitter_eps) + training)
    T, n, d = 512, 6, 3
    # per-token offsets -3, 0, 3: logits of both signs, so both sides of max(|z_i|, z*) in the mask are exercised,
    # and near-ties within the narrow r = 0.01 mask
    offset = 3.0 * torch.randint(-1, 2, (T, 1), generator=g).double()
    logits = offset + 0.5 * torch.randn(T, n, generator=g, dtype=torch.float64)
    outputs = torch.randn(T, n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(T, d, generator=g, dtype=torch.float64)
    noise = torch.rand(T, 2 * k, generator=g, dtype=torch.float64)

    def loss_and_grad(gates, experts, z):
        y = (gates.unsqueeze(-1) * outputs.gather(1, experts[..., None].expand(T, k, d))).sum(1)
        (grad,) = torch.autograd.grad((y * weight).sum(), z, retain_graph=True)
        return grad

    estimator = get_estimator("sparsemixer-v2", k=k, jitter_eps=jitter_eps)
    assert estimator.mask == "reference"
    z = logits.clone().requires_grad_()
    routing = estimator.route(z, training=training, noise=noise if training else None)
    ours_experts, ours_gates = routing.experts[:, 0], routing.gates[:, 0]
    ours_grad = loss_and_grad(ours_gates, ours_experts, z)
    # the same loss through gradest's own mixing
    (mixed_grad,) = torch.autograd.grad((mix(outputs, routing)[:, 0] * weight).sum(), z)
    torch.testing.assert_close(mixed_grad, ours_grad, rtol=1e-12, atol=1e-14)

    def native(exact_thirds):
        draws = PhimoeDraws(noise, k, exact_thirds)
        monkeypatch.setattr(modeling_phimoe, "torch", draws)
        z = logits.clone().requires_grad_()
        multiplier, experts = modeling_phimoe.sparsemixer(z, jitter_eps, training, top_k=k)
        monkeypatch.undo()
        assert multiplier.shape == experts.shape == (T, 2)  # always top-2, whatever top_k
        assert (draws.selections, draws.coins) == ((2, 2) if training else (0, 0))  # every draw injected
        multiplier, experts = multiplier[:, :k], experts[:, :k]
        return experts, multiplier, loss_and_grad(multiplier, experts, z)

    theirs_experts, theirs_gates, theirs_grad = native(exact_thirds=True)
    assert torch.equal(ours_experts, theirs_experts)
    torch.testing.assert_close(ours_gates, theirs_gates, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-14)
    assert theirs_grad.abs().max() > 1e-2

    # not vacuous: the mask masks; in training, at every stage some draws are not the stage's arg-max, and among
    # those some lose the Heun coin (scale 1/3) and some win it
    keep = sparsity_mask(logits, logits.max(-1, keepdim=True).values, "reference", jitter_eps)
    assert (~keep).any() and (keep.sum(-1) > k).any()
    removed, third = torch.zeros(T, n, dtype=torch.bool), torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        stage_max = logits.masked_fill(removed, float("-inf")).argmax(-1)
        removed = removed.scatter(-1, ours_experts[:, j:j + 1], True)
        if not training:
            assert torch.equal(ours_experts[:, j], stage_max)
            continue
        not_max, lost = ours_experts[:, j] != stage_max, noise[:, k + j] >= 0.25
        third[:, j] = not_max & lost
        assert (not_max & lost).any() and (not_max & ~lost).any(), j
        # a lost coin scales the gate by 1/3 (forward only); the arg-max and won coins keep it
        p = estimator.objective().route(logits, experts=ours_experts)[1]
        expected = torch.where(not_max & lost, p[:, j] / 3, p[:, j])
        torch.testing.assert_close(ours_gates[:, j], expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ours_gates[:, j][~(not_max & lost)], theirs_gates[:, j][~(not_max & lost)],
                                   rtol=1e-12, atol=1e-14)

    # as shipped (0.3333 in float32 for 1/3): same experts and gradient; the gates differ only on lost coin flips,
    # by the constant's relative error 1 - 3 * 0.33329999446868896 = 1.00002e-4 (1.0006e-4 from gradest's float32
    # 1/3); elsewhere not at all
    shipped_experts, shipped_gates, shipped_grad = native(exact_thirds=False)
    assert torch.equal(shipped_experts, ours_experts)
    torch.testing.assert_close(shipped_grad, ours_grad, rtol=1e-12, atol=1e-14)
    relative = (shipped_gates / ours_gates - 1).abs()
    assert relative.max() < 1.001e-4 and relative[~third].max() < 1e-12
    assert (relative.max() > 0.99e-4) == training  # eval applies no Heun scale at all
