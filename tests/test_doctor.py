"""gradest doctor: a model's native router gradient against the exact expected-loss gradient, layer by layer.

- A top-1 Mixtral (renormalised gate, identically 1) is flagged: its router receives no task gradient.
- The same model with k=2 is healthy.
- A router whose gradient is corrupted (a hook flips the sign of the weight's gradient, or of the logits') is
  flagged on that layer only.
- The CLI writes the report (never over an earlier one) and prints the verdicts; bad inputs exit 2 with one line.
"""

from __future__ import annotations

import pandas as pd
import pytest

transformers = pytest.importorskip("transformers")

from gradest.doctor import diagnose, doctor_batch  # noqa: E402
from gradest.hf import load_model, moe_blocks  # noqa: E402
from helpers import assert_one_line_error, cli  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")


def run(k: int, corrupt=None):
    model = load_model("mixtral", k=k, seed=0)
    if corrupt is not None:
        corrupt(model)
    return diagnose(model, doctor_batch(model.config.vocab_size, 2, 2, 16), draws=8)


def test_top1_renormalised_is_flagged():
    result = run(1)
    assert (result.layers["zero_fraction"] == 1).all()
    assert (result.layers["native_norm"] < 1e-6 * result.layers["exact_norm"]).all()
    assert result.verdicts == [f"layer {i}: the router receives no task gradient (top-1 with a renormalised gate)"
                               for i in (0, 1)]
    assert "2 of 2" in result.model_verdict


def test_top2_is_healthy():
    result = run(2)
    assert list(result.layers["verdict"]) == ["healthy", "healthy"], result.layers
    assert result.model_verdict == "model: healthy"
    assert (result.layers["zero_fraction"] == 0).all()
    assert (result.layers["entropy"] > 0.5).all() and (result.layers["entropy"] <= 1).all()
    loads = result.layers["load"].map(lambda s: sum(map(float, s.split("/"))))
    assert loads.round(1).eq(1).all()


def flip_weight_gradient(model):
    _, block, arch = moe_blocks(model)[1]
    arch.family.router_weight(arch.router_of(block)).register_hook(lambda g: -g)


def flip_logits_gradient(model):
    _, block, arch = moe_blocks(model)[1]

    def hook(module, args, output):
        if output[0].requires_grad:  # the probe's own passes run without gradients through the weights
            output[0].register_hook(lambda g: -g)  # Mixtral's router returns (logits, gates, experts)

    arch.router_of(block).register_forward_hook(hook)


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [flip_weight_gradient, flip_logits_gradient])
def test_corrupted_router_gradient_is_flagged(corrupt):
    healthy, result = run(2), run(2, corrupt)
    cos = result.layers["cos"]
    assert cos[1] == pytest.approx(-healthy.layers["cos"][1], abs=1e-4) and cos[1] < 0
    assert result.layers["verdict"][0] == "healthy"
    assert result.verdicts[1].startswith("layer 1: native gradient cos -")
    assert "1 of 2" in result.model_verdict


def test_cli_report(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 4, encoding="utf-8")
    out = tmp_path / "doctor"
    args = ["--threads", 1, "doctor", "--hf", "mixtral", "--top-k", 1, "--text", text, "--batches", 1,
            "--seq-len", 8, "--draws", 4, "--out", out]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "layer 0: the router receives no task gradient (top-1 with a renormalised gate)" in result.output
    assert "model: 2 of 2 MoE layers flagged" in result.output
    layers = pd.read_csv(out / "layers.csv")
    assert list(layers["layer"]) == [0, 1] and {"cos", "rel_bias", "zero_fraction", "load", "entropy"} <= set(layers)
    assert (out / "cosine.png").stat().st_size > 0 and "| module" in (out / "doctor.md").read_text()
    assert (out / "config.json").exists()
    again = cli(*args)  # never over an earlier report
    assert_one_line_error(again, "already holds results")


@pytest.mark.parametrize("args,words", [
    (["--hf", "nope"], ["unknown architecture"]),
    ([], ["--hf NAME"]),
    (["--hf", "mixtral", "--text", "/nonexistent.txt"], ["--text"]),
    (["--hf", "mixtral", "--text", "EMPTY"], ["empty"]),
    (["--hf", "mixtral", "--text", "SHORT", "--seq-len", 64], ["seq_len"]),
    (["--hf-model", "/nonexistent"], ["config.json"]),
    (["--hf-config", "BADJSON"], ["cannot read the config"]),
    (["--hf", "mixtral", "--hf-model", "/x"], ["do not apply"]),
    (["--hf", "gpt2"], ["unknown architecture"]),
    (["--hf", "mixtral", "--batches", 0], ["--batches"]),
])
def test_bad_inputs(tmp_path, args, words):
    files = {"EMPTY": "", "SHORT": "abc", "BADJSON": "{not json"}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    args = [str(tmp_path / a) if a in files else a for a in args]
    result = cli("doctor", *args, "--out", tmp_path / "report")
    assert_one_line_error(result, *words)
    assert not (tmp_path / "report" / "layers.csv").exists()
