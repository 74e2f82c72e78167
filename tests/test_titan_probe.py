"""gradest.titan.probe: the router-gradient probe on one MoE layer of gradest.titan's small torchtitan Qwen3-MoE
(float64 model; torchtitan's experts compute in bfloat16 whatever the dtype, and its combine multiplies the gates in
float32: tests/test_titan.py's module docstring).

- The enumeration reference is the gradient of J = E_D[L(D)]: central finite differences of a brute-force J (every
  assignment of the layer's routing, its probability from the router's softmax computed here).
- `topk`'s measured bias is the distance from the exact gradient of torchtitan's OWN router (route_norm off, which
  is the top-k rule with softmax gates) to that reference: computed here by one backward through the native model.
- reinforce is unbiased (its bias interval covers 0); switch is measurably biased; a dense estimator runs.
- `gradest compare --problem titan` writes its report; options that do not apply are one-line errors.

The probed layer is the last MoE block (layer 1): above it only the norm and the head, so no bf16 expert sits
between the probed gates and the loss (a bf16 rounding flipped by a finite-difference step would be a jump of
2^-8 relative, far above the difference quotient's resolution).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchtitan")

from gradest.datasets import load_shakespeare  # noqa: E402
from gradest.estimators import Objective, get_estimator  # noqa: E402
from gradest.probe import enumerate_reference, lm_probe_batch, probing  # noqa: E402
from gradest.titan.models import forward  # noqa: E402
from gradest.titan.probe import TitanSite, probe_model, titan_probe  # noqa: E402
from helpers import assert_one_line_error, brute_force_J, cli, one_line_error  # noqa: E402

# torchtitan's router asks for float32 autocast, which the CPU's autocast declines (computing in the model's dtype)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:In CPU autocast")]


def tiny(k: int, seq_len: int):
    return probe_model(k, seq_len, seed=0, dtype=torch.float64)


def batch(seq_len: int, size: int = 2):
    return lm_probe_batch(load_shakespeare(), size, seq_len)


@pytest.mark.parametrize("k,T", [(1, 3), (2, 2)])
def test_enumeration_equals_finite_differences(k, T):
    model = tiny(k, T)
    site = TitanSite(model, batch(T), layer=1)
    grad = enumerate_reference(site, Objective(k)).values(site, "router").reshape(site.n, site.d)
    W = site.router.gate.weight
    # torchtitan's combine rounds the gates to float32: J carries rounding noise of about 2^-24 relative, so the
    # step is large (truncation O(h^2) ~ 1e-5 relative) and the tolerance 1e-3 relative (noise / h ~ 1e-5 of J's
    # scale); a wrong weight, gate or probability is off by far more
    h = 3e-3
    generator = torch.Generator().manual_seed(0)
    directions = [grad / grad.norm()] + [torch.randn(W.shape, generator=generator, dtype=W.dtype) for _ in range(2)]
    for v in directions:
        with torch.no_grad():
            W += h * v
        plus = brute_force_J(site, W, k)
        with torch.no_grad():
            W -= 2 * h * v
        minus = brute_force_J(site, W, k)
        with torch.no_grad():
            W += h * v
        fd = (plus - minus) / (2 * h)
        assert fd == pytest.approx(float((grad * v).sum()), rel=1e-3, abs=1e-3 * float(grad.norm() * v.norm()))
    assert grad.norm() > 0
    assert site.layer.patched is None and "forward" not in site.router.__dict__  # torchtitan's routing again


def native_router_gradient(site: TitanSite) -> torch.Tensor:
    """The router weight's gradient of L through torchtitan's OWN router (no gradest) with route_norm off: top-k
    of softmax(z), gates the softmax's values, which is `topk`'s rule (renormalize=false)."""
    model, router = site.model, site.router
    router.route_norm = False
    try:
        with probing(model):
            model.zero_grad(set_to_none=True)
            logits = forward(model, site.idx)
            F.cross_entropy(logits.transpose(1, 2), site.targets, reduction="none").mean(-1).mean().backward()
    finally:
        router.route_norm = True
    return router.gate.weight.grad.flatten().clone()


@pytest.mark.parametrize("k", [1, 2])
def test_topk_bias_is_its_distance_to_the_exact_gradient(k):
    """topk is deterministic, so its measured rel_bias is exactly ||g_topk - g*|| / ||g*||. g_topk from torchtitan's
    native router (module docstring), g* the enumeration (checked against finite differences above). Both pass the
    gates through torchtitan's float32 combine: tolerance 2^-16 relative on the distance (float32's 2^-24 amplified
    by the cancellation of g_topk - g* and the accumulation over tokens); a wrong gate or missing gradient path
    changes it at order 1."""
    T = 3 if k == 1 else 2
    model = tiny(k, T)
    data = batch(T)
    site = TitanSite(model, data, layer=1)
    exact = enumerate_reference(site, Objective(k)).values(site, "router")
    native = native_router_gradient(site)
    df = titan_probe(model, data, 1, "topk:renormalize=false", 3, reference="enumeration")
    assert list(df["reference"]) == ["enumeration"] and list(df["problem"]) == ["titan-qwen3-moe"]
    expected = float((native - exact).norm() / exact.norm())
    assert expected > 0.05  # topk ignores the other experts' terms: measurably biased
    assert df["rel_bias"][0] == pytest.approx(expected, rel=2.0 ** -16)
    assert df["variance"][0] == 0


def test_reinforce_unbiased_switch_biased_dense_runs():
    model = tiny(1, 3)
    df = titan_probe(model, batch(3), layer=0, estimators="reinforce:baseline=mean,switch,densemixer",
                     samples=300, seed=0).set_index("estimator")
    assert set(df["reference"]) == {"enumeration"}
    reinforce = df.loc["reinforce(baseline=mean)"]
    assert reinforce["bias_sq_lo"] <= 0 <= reinforce["bias_sq_hi"]
    assert df.loc["switch", "rel_bias_lo"] > 0.1, df.loc["switch", "rel_bias_lo"]
    assert df.loc["densemixer", "experts_per_token"] == 4 and df.loc["densemixer", "rel_bias"] >= 0


def test_rao_blackwell_reference_agrees_with_enumeration():
    model = tiny(1, 3)
    data = batch(3)
    exact = titan_probe(model, data, 1, "topk", 3, reference="enumeration")
    mc = titan_probe(model, data, 1, "topk", 3, reference="rao-blackwell", draws=32)
    assert mc["reference"][0] == "rao-blackwell" and 0 < mc["reference_se"][0] < 0.5
    # topk is deterministic: its relative bias differs only by the reference's noise
    assert abs(mc["rel_bias"][0] - exact["rel_bias"][0]) < 4 * mc["reference_se"][0] + 0.05


def test_site_refusals():
    model = tiny(1, 3)
    one_line_error(lambda: TitanSite(model, batch(3), layer=2), "layer", "0..1")
    one_line_error(lambda: titan_probe(model, batch(3), 0, "default-moe", 3), "default-moe", "stateful")
    one_line_error(lambda: titan_probe(model, batch(3), 0, [get_estimator("topk", k=2)], 3), "k=2", "top_k=1")
    model.layers["0"].moe.expert_bias_E.fill_(0.5)
    one_line_error(lambda: TitanSite(model, batch(3), layer=0), "expert_bias_E")


def test_cli_writes_summary(tmp_path):
    import pandas as pd
    out = tmp_path / "report"
    result = cli("--threads", 1, "compare", "--problem", "titan", "--top-k", 1, "--layer", 1,
                 "--estimators", "switch,topk", "--samples", 4, "--seq-len", 4, "--out", out)
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / "summary.csv")
    assert list(df["estimator"]) == ["switch", "topk"] and set(df["problem"]) == {"titan-qwen3-moe"}
    assert set(df["layer"]) == {1} and set(df["seq_len"]) == {4}
    assert {"rel_bias", "reference", "reference_se"} <= set(df.columns)
    assert (out / "summary.md").exists() and (out / "rel_bias.png").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("args,words", [
    (["--layer", 7], ["layer", "0..1"]),
    (["--top-k", 9], ["--top-k 9", "4 experts"]),
    (["--wrt", "all"], ["--wrt all", "titan"]),
    (["--checkpoint", "x"], ["--checkpoint", "switch-lm", "titan"]),
    (["--hf", "mixtral"], ["--hf", "--problem hf"]),
    (["--dim", 4], ["--dim", "synthetic"]),
    (["--estimators", "default-moe"], ["default-moe", "stateful"]),
])
def test_cli_bad_inputs(tmp_path, args, words):
    result = cli("compare", "--problem", "titan", *args, "--samples", 3, "--out", tmp_path / "x")
    assert_one_line_error(result, *words)
    assert not (tmp_path / "x" / "summary.csv").exists()
