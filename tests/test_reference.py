"""Cross-implementation checks: gradest's estimators against the authors' own code, on identical inputs.

- `densemixer` against the `densemixer` package (1.0.1): the package only ships replacement `forward` methods for
  Hugging Face MoE blocks, so its OLMoE block's forward is called on a stand-in block whose router returns given
  logits and whose experts return given outputs (it touches nothing else of the block). It computes its softmax in
  float32, so the comparison is in float32.
- `sparsemixer` (v1, with omega) and `switch` against transcriptions of microsoft/SparseMixer's routers
  (`SparseMixer`, `SwitchGate`), written from its source with their random draws as arguments: the same expert
  draws, coin flips and jitter are fed to both sides.
"""

from __future__ import annotations

import types

import pytest
import torch

from gradest.estimators import get_estimator
from gradest.problems import mix


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
