"""Cross-implementation checks: gradest's estimators against the authors' own code, on identical inputs.

`densemixer` against the `densemixer` package (1.0.1): the package only ships replacement `forward` methods for
Hugging Face MoE blocks, so its OLMoE block's forward is called on a stand-in block whose router returns given
logits and whose experts return given outputs (it touches nothing else of the block). It computes its softmax in
float32, so the comparison is in float32.
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
