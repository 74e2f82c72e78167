"""`gradest run --hf ...`: a Hugging Face MoE causal LM trained by the Switch LM's Trainer (run directory, per-layer
router statistics, exact resume), from an architecture name, a config file or a saved model; bad inputs refused."""

import json

import pandas as pd
import pytest
import torch

pytest.importorskip("transformers")

from gradest import hf  # noqa: E402
from gradest.hf import train as hf_train  # noqa: E402
from gradest.train import Trainer, TrainConfig  # noqa: E402
from helpers import assert_one_line_error, cli  # noqa: E402

TIMING = ["seconds", "tokens_per_s"]
# two layers of width 32, 4 experts, 16-character windows: a step takes a few milliseconds
SMALL = ["--hf-set", "num_hidden_layers=2", "--hf-set", "hidden_size=32", "--hf-set", "intermediate_size=64",
         "--hf-set", "num_local_experts=4", "--model", "block_size=16", "--batch-size", "8"]
SMALL_SETTINGS = dict(hf_settings={"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
                                   "num_local_experts": 4}, block_size=16, batch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_switch_settings_are_unchanged():
    """The hf settings appear only in a Hugging Face run's settings: study cell hashes and Switch config.json
    files stay as they were."""
    assert TrainConfig().settings() == {
        "task": "lm", "estimator": "sparsemixer", "hparams": {}, "experts": 8, "top_k": 1, "omega": None,
        "steps": 600, "batch_size": 32, "block_size": 128, "lr": 2e-3, "warmup": 50, "min_lr_ratio": 0.1,
        "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 100, "eval_batches": 8, "checkpoint_interval": 100,
        "seed": 0, "device": "cpu", "dtype": "float32", "model": {}}
    settings = TrainConfig(hf="mixtral", estimator="topk").settings()
    assert settings["hf"] == "mixtral" and settings["hf_settings"] == {} and "hf_config" not in settings
    assert settings["top_k"] == 2 and settings["experts"] == 8  # the tiny model's num_experts_per_tok, experts


def test_cli_run_writes_per_layer_stats_and_the_loss_falls(tmp_path):
    out = tmp_path / "run"
    result = cli("run", "--hf", "mixtral", "--estimator", "sparsemixer-v2", "--steps", 20, *SMALL, "--lr", "5e-3",
                 "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("metrics.csv", "loss.png", "config.json", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    metrics = pd.read_csv(out / "metrics.csv")
    for i in range(2):
        for key in ("max_load", "router_entropy", "argmax_fraction"):
            assert metrics[f"layer{i}_{key}"].notna().all()
    assert (metrics["layer0_max_load"] >= 1).all() and (metrics["layer0_max_load"] <= 4).all()
    assert (metrics["aux_loss"] > 0).all()  # Mixtral's own load-balancing loss
    shares = metrics[[f"load_{i}" for i in range(4)]].sum(axis=1)
    torch.testing.assert_close(torch.tensor(shares.to_numpy()), torch.ones(len(metrics), dtype=torch.float64))
    assert metrics["train_loss"].iloc[-3:].mean() < metrics["train_loss"].iloc[:3].mean() - 0.3
    assert metrics["val_loss"].dropna().iloc[-1] < 4.0  # ln 65 = 4.17 at the start
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["hf"] == "mixtral" and config["top_k"] == 2 and config["experts"] == 4
    assert config["hf_settings"]["num_hidden_layers"] == 2
    assert "step 20/20" in result.output and "Hugging Face mixtral" in result.output


@pytest.mark.parametrize("estimator", ["sparsemixer-v2", "reinforce:baseline=mean", "default-moe"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, estimator):
    settings = dict(hf="mixtral", estimator=estimator, steps=12, checkpoint_interval=6, eval_interval=6,
                    eval_batches=2, warmup=2, **SMALL_SETTINGS)
    whole = Trainer(TrainConfig(**settings), tmp_path / "whole").run()
    Trainer(TrainConfig(**settings), tmp_path / "cut").run(until=6)
    torch.manual_seed(999)
    resumed = Trainer.resume(tmp_path / "cut").run()
    assert len(resumed) == 12
    pd.testing.assert_frame_equal(whole.drop(columns=TIMING), resumed.drop(columns=TIMING), check_exact=True)


def test_cli_resume_continues_an_hf_run(tmp_path):
    out = tmp_path / "run"
    assert cli("run", "--hf", "mixtral", "--estimator", "topk", "--steps", 4, *SMALL, "--out", out).exit_code == 0
    again = cli("run", "--resume", out, "--steps", 6)
    assert again.exit_code == 0, again.output
    assert list(pd.read_csv(out / "metrics.csv")["step"]) == list(range(1, 7))
    assert_one_line_error(cli("run", "--resume", out, "--steps", 8, "--hf", "qwen3_moe"), "--hf mixtral")


@pytest.mark.parametrize("estimator", ["default-moe", "reinforce", "reinforce:baseline=zero", "densemixer"])
def test_stateful_score_and_dense_estimators_train(tmp_path, estimator):
    trainer = Trainer(TrainConfig(hf="mixtral", estimator=estimator, steps=8, eval_interval=8, eval_batches=2,
                                  warmup=2, lr=5e-3, **SMALL_SETTINGS), tmp_path)
    start = trainer.evaluate()
    metrics = trainer.run()
    assert metrics["val_loss"].dropna().iloc[-1] < start
    assert torch.isfinite(torch.tensor(metrics["train_loss"].to_numpy())).all()
    if estimator == "default-moe":  # its state is buffers of the blocks: in the checkpoint
        state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
        assert any("gradest_state_" in key for key in state)


def test_reinforce_gets_its_score_term_through_routing_log_prob(tmp_path, monkeypatch):
    """The Trainer adds REINFORCE's score term from the model's log-probability of its sampled routing, one per
    sequence (`gradest.hf.routing_log_prob`, which `gradest.hf.score_loss` uses too)."""
    calls = []
    routing_log_prob = hf_train.routing_log_prob

    def counting(model, batch, **kwargs):
        log_prob = routing_log_prob(model, batch, **kwargs)
        calls.append(None if log_prob is None else log_prob.shape)
        return log_prob

    monkeypatch.setattr(hf_train, "routing_log_prob", counting)  # the name the training back-end calls
    Trainer(TrainConfig(hf="mixtral", estimator="reinforce", steps=2, eval_batches=1, **SMALL_SETTINGS),
            tmp_path).run()
    assert calls == [torch.Size([8])] * 2


def test_hf_config_file(tmp_path):
    """A transformers config JSON (here a Qwen3-MoE's): randomly initialised, its vocab_size the corpus's."""
    config = hf.tiny_config("qwen3_moe", k=1, vocab_size=1000)
    config.save_pretrained(tmp_path / "cfg")
    out = tmp_path / "run"
    result = cli("run", "--hf-config", tmp_path / "cfg" / "config.json", "--estimator", "switch", "--steps", 3,
                 "--model", "block_size=16", "--batch-size", 4, "--out", out)
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "config.json").read_text())["config"]
    assert settings["top_k"] == 1 and settings["experts"] == 4 and settings["hf_config"].endswith("config.json")
    assert "layer1_router_entropy" in pd.read_csv(out / "metrics.csv")
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert state["hf_model.model.embed_tokens.weight"].shape[0] == 65


def test_hf_model_directory(tmp_path):
    """A model saved by save_pretrained: its weights are the start (the first evaluation is the saved model's)."""
    torch.manual_seed(3)
    model = hf.model_from_config(hf.tiny_config("olmoe", vocab_size=80))
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    result = cli("run", "--hf-model", tmp_path / "model", "--estimator", "sparsemixer-v2", "--steps", 3,
                 "--model", "block_size=16", "--batch-size", 4, "--out", out)
    assert result.exit_code == 0, result.output
    trainer = Trainer.resume(out)
    assert trainer.config.hf_model == str((tmp_path / "model").resolve())
    loaded = Trainer(TrainConfig(hf_model=str(tmp_path / "model"), estimator="topk", block_size=16), tmp_path / "x")
    for name, p in model.named_parameters():
        torch.testing.assert_close(loaded.model.hf_model.get_parameter(name), p, rtol=0, atol=0)
    assert loaded.config.top_k == 2 and loaded.model.hf_model.config.vocab_size == 80


@pytest.mark.parametrize("args, words", [
    (["--hf", "llama"], ["unknown architecture 'llama'", "mixtral", "qwen3_moe"]),
    (["--hf", "switch_transformers"], ["encoder-decoder", "valid: mixtral"]),
    (["--hf-config", "missing.json"], ["no such config file", "missing.json"]),
    (["--hf-model", "missing_dir"], ["not a saved model"]),
    (["--hf", "mixtral", "--model", "n_layer=2"], ["Switch Transformer setting", "block_size"]),
    (["--hf", "mixtral", "--experts", "4"], ["--experts", "--hf-set"]),
    (["--hf", "mixtral", "--omega"], ["--omega"]),
    (["--hf", "mixtral", "--task", "mt"], ["lm task"]),
    (["--hf", "mixtral", "--top-k", "9"], ["top_k=9", "8 experts"]),
    (["--hf", "mixtral", "--hf-model", "x"], ["give one of"]),
    (["--hf-set", "num_hidden_layers=2"], ["--hf ARCH"]),
    (["--hf", "mixtral", "--hf-set", "router_jitter_noise=abc"], ["router_jitter_noise", "expected float"]),
    (["--hf", "mixtral", "--problem", "linear"], ["synthetic problem"]),
])
def test_bad_inputs_give_one_line_and_exit_2(tmp_path, args, words):
    assert_one_line_error(cli("run", "--estimator", "topk", "--out", tmp_path / "run", *args), *words)


def test_a_config_without_moe_is_refused(tmp_path):
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    assert_one_line_error(cli("run", "--hf-config", tmp_path / "llama.json", "--estimator", "topk"),
                          "model_type 'llama'", "no mixture-of-experts block", "valid: mixtral")
    (tmp_path / "bad.json").write_text("{")
    assert_one_line_error(cli("run", "--hf-config", tmp_path / "bad.json", "--estimator", "topk"), "not a JSON")


@pytest.mark.parametrize("args, words", [
    (["--hf-set", "num_hiden_layers=2"], ["unknown config setting 'num_hiden_layers'", "valid: num_hidden_layers"]),
    (["--hf-set", "model_type=qwen3_moe"], ["model_type is not a setting"]),
])
def test_hf_set_keys_are_the_configs(tmp_path, args, words):
    """A typo in --hf-set is refused with the config's fields, the closest first (it used to be set as a stray
    attribute, and the run trained without it); nothing is written."""
    out = tmp_path / "run"
    assert_one_line_error(cli("run", "--hf", "mixtral", "--estimator", "topk", *args, "--out", out), *words)
    assert not out.exists()
