"""gradest.hf.probe: the router-gradient probe on one MoE layer of a Hugging Face causal LM (tiny Mixtral, float64).

- The enumeration reference is the gradient of J = E_D[L(D)]: central finite differences of a brute-force J
  (every assignment of the layer's routing, its probability from the router's softmax computed here).
- The batched estimator samples (the batch replicated K times, noise supplied) equal a per-sample loop in which
  the patched block draws its own noise after torch.manual_seed and the router weight's .grad is read.
- reinforce is unbiased (its bias interval covers 0); switch is measurably biased.
- The same on SwitchTransformers' encoder-decoder, on an encoder and a decoder MoE layer; switch-base-8's
  architecture is built by name.
- `gradest compare --problem hf` writes summary.csv.
"""

from __future__ import annotations

import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gradest import hf  # noqa: E402
from gradest.estimators import Objective, get_estimator  # noqa: E402
from gradest.hf import load_model  # noqa: E402
from gradest.hf.probe import HFSite, hf_probe, model_batch, text_batch  # noqa: E402
from gradest.probe import (ForcedRouting, enumerate_reference, installed, layer_gradient_samples,  # noqa: E402
                           probing, sample_seeds)
from helpers import REPO, assert_one_line_error, brute_force_J, cli  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(k: int):
    return load_model("mixtral", k=k, seed=0, dtype=torch.float64)


@pytest.mark.parametrize("k,T", [(1, 3), (2, 2)])
def test_enumeration_equals_finite_differences(k, T):
    model = tiny(k)
    # the last MoE layer: the native Mixtral router rounds its gates to float32 even in a float64 model, which
    # a native layer above the probed one would add to J as rounding noise of 1e-7 (too coarse for the FD)
    site = HFSite(model, text_batch(model.config.vocab_size, 2, T), layer=1)
    grad = enumerate_reference(site, Objective(k)).values(site, "router").reshape(site.n, site.d)
    W = site.router.weight
    # Mixtral's RMSNorm computes in float32 even in a float64 model: J carries rounding noise of about 1e-9, so
    # the step is large (truncation O(h^2) ~ 1e-5 relative) and the tolerance 1e-3 relative; a wrong weight, gate
    # or probability is off by far more
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


@pytest.mark.parametrize("k,spec", [(1, "sparsemixer-v2"), (2, "reinforce:baseline=mean")])
def test_batched_samples_equal_a_per_sample_loop(k, spec):
    model = tiny(k)
    batch = text_batch(model.config.vocab_size, 2, 4)
    site = HFSite(model, batch, layer=1)
    estimator = get_estimator(*spec.split(":")[:1], k=k, **dict(kv.split("=") for kv in spec.split(":")[1:]))
    K = 3
    batched = site.router_gradient(layer_gradient_samples(site, estimator, K, seed=5))
    seeds = sample_seeds(5, K)
    W = site.router.weight
    idx, targets = batch
    for j, s in enumerate(seeds):
        model.eval()
        patched = hf.patch(model, estimator)
        for block in patched.blocks:
            if block.block is not site.hf_block:
                block.restore()
        site.router.train()  # the patched block routes in training mode, drawing its own noise
        try:
            model.zero_grad(set_to_none=True)
            torch.manual_seed(s)
            logits = model(input_ids=idx, use_cache=False).logits
            per_sequence = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                                             reduction="none").mean(-1)
            hf.score_loss(model, per_sequence).mean().backward()
        finally:
            patched.undo()
            model.eval()
        torch.testing.assert_close(W.grad.flatten(), batched[j], rtol=1e-9, atol=1e-12)


def test_reinforce_unbiased_switch_biased():
    model = tiny(1)
    df = hf_probe(model, text_batch(model.config.vocab_size, 2, 3), layer=0,
                  estimators="reinforce:baseline=mean,switch", samples=300, seed=0)
    rows = df.set_index("estimator")
    assert set(rows["reference"]) == {"enumeration"}
    reinforce = rows.loc["reinforce(baseline=mean)"]
    assert reinforce["bias_sq_lo"] <= 0 <= reinforce["bias_sq_hi"]
    switch = rows.loc["switch"]
    assert switch["rel_bias_lo"] > 0.1, switch["rel_bias_lo"]


def test_rao_blackwell_reference_agrees_with_enumeration():
    model = tiny(1)
    batch = text_batch(model.config.vocab_size, 2, 3)
    exact = hf_probe(model, batch, 1, "topk", 3, reference="enumeration")
    mc = hf_probe(model, batch, 1, "topk", 3, reference="rao-blackwell", draws=32)
    assert mc["reference"][0] == "rao-blackwell" and 0 < mc["reference_se"][0] < 0.5
    # topk is deterministic: its relative bias differs only by the reference's noise
    assert abs(mc["rel_bias"][0] - exact["rel_bias"][0]) < 4 * mc["reference_se"][0] + 0.05


def test_cli_writes_summary(tmp_path):
    import pandas as pd
    out = tmp_path / "report"
    result = cli("--threads", 1, "compare", "--problem", "hf", "--hf", "mixtral", "--top-k", 1, "--layer", 1,
                 "--estimators", "switch,topk", "--samples", 4, "--seq-len", 4, "--out", out)
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / "summary.csv")
    assert list(df["estimator"]) == ["switch", "topk"] and set(df["problem"]) == {"hf-mixtral"}
    assert (out / "summary.md").exists() and (out / "rel_bias.png").exists()
    switch_like = pd.read_csv(out / "summary.csv").columns
    assert {"rel_bias", "reference", "reference_se", "layer"} <= set(switch_like)


@pytest.mark.parametrize("args,words", [
    (["--hf", "nope"], ["unknown architecture"]),
    (["--hf", "mixtral", "--layer", 7], ["layer"]),
    ([], ["--hf NAME"]),
    (["--hf-model", "/nonexistent"], ["config.json"]),
    (["--hf-config", "{cfg}"], ["invalid config", "router_dtype"]),
])
def test_cli_bad_inputs(tmp_path, args, words):
    (tmp_path / "cfg.json").write_text('{"model_type": "switch_transformers", "router_dtype": "float64"}')
    args = [str(a).format(cfg=tmp_path / "cfg.json") for a in args]
    result = cli("compare", "--problem", "hf", *args, "--samples", 3, "--out", tmp_path / "x")
    assert_one_line_error(result, *words)


# ------------------------------------------------------------------------------------ SwitchTransformers (seq2seq)
def tiny_switch():
    return load_model("switch_transformers", seed=0, dtype=torch.float64)


def switch_brute_force_J(site: HFSite) -> float:
    """mean_b sum_D prod_t P_t(D_t) L_b(D) over every top-1 assignment D of the probed layer's tokens."""
    W = site.router.classifier.weight
    with torch.no_grad():
        p = torch.softmax(site.u @ W.T, -1)  # (B, T, n)
    total = 0.0
    for b in range(site.B):
        experts = torch.tensor(list(itertools.product(range(site.n), repeat=site.T)))  # (R, T)
        prob = p[b, torch.arange(site.T), experts].prod(-1)
        forced = ForcedRouting(Objective(1), experts.reshape(-1, 1), leaf=False)
        with probing(site.model), installed(site.layer, forced), torch.no_grad():
            losses = site.losses(torch.full((len(experts),), b))
        total += float((prob * losses).sum())
    return total / site.B


@pytest.mark.parametrize("layer,where", [(0, "encoder"), (1, "decoder")])
def test_switch_transformers_enumeration_equals_finite_differences(layer, where):
    model = tiny_switch()
    site = HFSite(model, model_batch(model, 2, 3), layer=layer)
    assert site.where == where and site.name.startswith(where)
    grad = enumerate_reference(site, Objective(1)).values(site, "router").reshape(site.n, site.d)
    W = site.router.classifier.weight
    # the router computes in its router_dtype, float32 at most: J carries rounding noise of about 1e-7 relative,
    # so the step is large (truncation O(h^2)) and the tolerance 1e-3 relative, as for Mixtral above
    h = 3e-3
    generator = torch.Generator().manual_seed(0)
    for v in [grad / grad.norm()] + [torch.randn(W.shape, generator=generator, dtype=W.dtype) for _ in range(2)]:
        with torch.no_grad():
            W += h * v
        plus = switch_brute_force_J(site)
        with torch.no_grad():
            W -= 2 * h * v
        minus = switch_brute_force_J(site)
        with torch.no_grad():
            W += h * v
        fd = (plus - minus) / (2 * h)
        assert fd == pytest.approx(float((grad * v).sum()), rel=1e-3, abs=1e-3 * float(grad.norm() * v.norm()))
    assert grad.norm() > 0


def test_switch_transformers_reinforce_unbiased_switch_biased():
    model = tiny_switch()
    df = hf_probe(model, model_batch(model, 2, 3), layer=1, estimators="reinforce:baseline=mean,switch",
                  samples=300, seed=0).set_index("estimator")
    assert set(df["problem"]) == {"hf-switch_transformers"} and set(df["reference"]) == {"enumeration"}
    reinforce = df.loc["reinforce(baseline=mean)"]
    assert reinforce["bias_sq_lo"] <= 0 <= reinforce["bias_sq_hi"]
    assert df.loc["switch", "rel_bias_lo"] > 0.1


def test_switch_base_8_by_name():
    """switch-base-8's architecture (google/switch-base-8's config.json), built on the meta device: 619M
    parameters, 6 + 6 MoE blocks of 8 experts."""
    with torch.device("meta"):
        model = hf.model_from_config(hf.named_config("switch-base-8"))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(619.3e6, rel=1e-3)
    blocks = hf.moe_blocks(model)
    assert [name.split(".")[0] for name, _, _ in blocks] == ["encoder"] * 6 + ["decoder"] * 6
    assert {block.router.classifier.out_features for _, block, _ in blocks} == {8}


def test_doctor_refuses_an_encoder_decoder(tmp_path):
    result = cli("doctor", "--hf", "switch_transformers", "--out", tmp_path / "d")
    assert_one_line_error(result, "encoder-decoder", "compare --problem hf")


@pytest.mark.slow
def test_hf_probe_study_quick_profile(tmp_path):
    """studies/hf-probe.toml's quick profile: the hf-probe cells (a tiny Mixtral, a tiny SwitchTransformers'
    encoder and decoder blocks) run, record their cost, and report; a bad cell is refused before any runs."""
    import pandas as pd
    from gradest.errors import GradestError
    from gradest.study import load_study, run_study, write_report
    study = load_study(REPO / "studies" / "hf-probe.toml")
    summary = run_study(study, "quick", results=tmp_path / "res", progress=False)
    assert not summary.failed
    out = write_report(study, "quick", tmp_path / "res", tmp_path / "report")
    rows = pd.read_csv(out / "results.csv")
    assert set(rows["problem"]) == {"hf-mixtral", "hf-switch_transformers"}
    assert set(rows["layer"]) == {0, 1} and (rows["peak_rss_gb"] > 0).all() and (rows["parameters"] > 0).all()
    assert (rows["reference"] == "enumeration").all()
    text = (out / "README.md").read_text()
    assert "### Cost of each cell" in text and "peak memory (GB)" in text
    study.profiles["quick"]["grid"]["variant"] = [{"hf": "switch_transformers", "layer": 2}]
    with pytest.raises(GradestError, match="layer must be in 0..1"):
        study.cells("quick", tmp_path / "res")
    study.profiles["quick"]["grid"]["variant"] = [{"hf": "mixtral", "hf_settings": {"router_jitter_noise": "x"}}]
    with pytest.raises(GradestError, match="invalid settings for mixtral"):
        study.cells("quick", tmp_path / "res")
    # reinforce's leave-one-out mean needs two sequences: refused before any runs, left out of "all"
    study.profiles["quick"]["grid"]["variant"] = [{"hf": "mixtral", "batch_size": 1}]
    study.profiles["quick"]["grid"]["estimator"] = ["reinforce:baseline=mean"]
    with pytest.raises(GradestError, match="needs a batch of at least 2 sequences"):
        study.cells("quick", tmp_path / "res")
    study.profiles["quick"]["grid"]["estimator"] = ["all"]
    assert study.cells("quick", tmp_path / "res")
    study.profiles["quick"]["grid"]["variant"] = [{"hf": "mixtral", "device": "tpu"}]
    with pytest.raises(GradestError, match="unknown device 'tpu'"):
        study.cells("quick", tmp_path / "res")


def test_a_saved_switch_transformers_model_loads_as_seq2seq(tmp_path):
    """--hf-model DIR with a saved SwitchTransformers (what a user with the switch-base-8 checkpoint passes):
    loaded as the encoder-decoder, probed on a decoder block."""
    load_model("switch_transformers", seed=0).save_pretrained(tmp_path / "switch")
    model = load_model(model_dir=tmp_path / "switch")
    assert model.config.is_encoder_decoder
    df = hf_probe(model, model_batch(model, 2, 3), layer=1, estimators="switch", samples=4)
    assert list(df["estimator"]) == ["switch"] and set(df["problem"]) == {"hf-switch_transformers"}
