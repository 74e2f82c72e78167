"""The reference setup as settings: `--preset sparsemixer-reference` and the settings it fills in."""

import math

import pytest
import torch

from gradest.presets import PRESETS, REFERENCE_BALANCE_COEF, apply_preset
from gradest.train import Trainer, TrainConfig
from helpers import cli

TINY = {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64}


def test_the_preset_is_microsoft_sparsemixers_setup():
    """Every choice read from the reference code, as it reaches the run (model, optimiser, estimator)."""
    config = TrainConfig(**apply_preset("sparsemixer-reference", {"estimator": "switch", "model": TINY}),
                         preset="sparsemixer-reference")
    m = config.model
    assert (m.balance_coef, m.balance_probs, m.router_bias, m.moe_first, m.post_ln) == \
        (0.01 / 8192, "sampled", True, True, True)
    assert (m.dropout, m.expert_dropout) == (0.1, 0.1)
    assert (config.weight_decay, config.grad_clip, config.adam_beta2, config.schedule, config.lr) == \
        (0.0, None, 0.98, "inverse-sqrt", 7e-4)
    assert config.build_estimator().jitter_eps == 0.1  # --jitter-eps 0.1 for Switch's jitter
    assert config.label_smoothing == 0  # the LM task; translation gets 0.1
    mt = apply_preset("sparsemixer-reference", {"task": "mt", "estimator": "sparsemixer"})
    assert mt["label_smoothing"] == 0.1 and mt["hparams"] == {"jitter_eps": 0.1}
    assert apply_preset("sparsemixer-reference", {"estimator": "st"})["hparams"] == {}  # st has no jitter_eps
    assert REFERENCE_BALANCE_COEF == pytest.approx(1.22e-6, rel=1e-3)
    assert config.settings()["preset"] == "sparsemixer-reference"
    assert TrainConfig(**config.settings()).settings() == config.settings()


def test_given_settings_win_over_the_preset():
    settings = apply_preset("sparsemixer-reference", {"estimator": "switch", "lr": 1e-3, "hparams": {"jitter_eps": 0.2},
                                                      "model": {"post_ln": False}})
    assert settings["lr"] == 1e-3 and settings["hparams"] == {"jitter_eps": 0.2}
    assert settings["model"]["post_ln"] is False and settings["model"]["router_bias"] is True
    assert apply_preset(None, {"lr": 1}) == {"lr": 1}
    assert set(PRESETS) == {"sparsemixer-reference", "sparsemixer-reference-full"}


def test_inverse_sqrt_schedule_betas_and_label_smoothing(tmp_path):
    """inverse-sqrt: linear warm-up, then sqrt(warmup / step) (fairseq's); the betas reach AdamW; label smoothing
    raises the training loss of the same batch and leaves the validation loss (plain cross-entropy) alone."""
    trainer = Trainer(TrainConfig(estimator="switch", steps=10, warmup=4, schedule="inverse-sqrt",
                                  adam_beta2=0.95, batch_size=2, block_size=16, model=TINY), tmp_path / "a")
    assert [trainer.lr_factor(s) for s in (0, 3, 4, 15)] == [0.25, 1.0, math.sqrt(4 / 5), math.sqrt(4 / 16)]
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    plain = Trainer(TrainConfig(estimator="topk", steps=2, batch_size=2, block_size=16, model=TINY), tmp_path / "b")
    smooth = Trainer(TrainConfig(estimator="topk", steps=2, batch_size=2, block_size=16, model=TINY,
                                 label_smoothing=0.1), tmp_path / "c")
    batch = plain.task.batch("train", torch.Generator().manual_seed(0))
    assert smooth.loss(batch)[1]["train_loss"] > plain.loss(batch)[1]["train_loss"] + 1e-3
    assert smooth.evaluate() == plain.evaluate()


def test_cli_preset_runs_and_records_it(tmp_path):
    args = ["run", "--estimator", "sparsemixer", "--preset", "sparsemixer-reference", "--steps", "2", "--batch-size",
            "2", "--model", "block_size=16", *[f"--model={k}={v}" for k, v in TINY.items()], "--out", tmp_path / "r"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    import json
    config = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert config["preset"] == "sparsemixer-reference" and config["schedule"] == "inverse-sqrt"
    bad = cli("run", "--estimator", "switch", "--preset", "nosuch")
    assert bad.exit_code == 2 and "nosuch" in bad.output and "sparsemixer-reference" in bad.output


def test_the_full_preset_adds_the_reference_model_and_trains(tmp_path):
    """sparsemixer-reference-full is sparsemixer-reference plus fairseq's architecture and initialisation and
    SwitchGate's P_i; the committed studies' preset stays as it was (their cells' hashes cover what it fills)."""
    given = {"estimator": "switch", "task": "mt", "model": TINY}
    base, full = (apply_preset(name, given) for name in ("sparsemixer-reference", "sparsemixer-reference-full"))
    added = {"activation": "relu", "expert_bias": True, "dense_activation_dropout": 0.1, "positions": "sinusoidal",
             "embed_scale": True, "init": "fairseq", "balance_probs": "routed"}
    assert full["model"] == {**base["model"], **added}
    assert {k: v for k, v in full.items() if k != "model"} == {k: v for k, v in base.items() if k != "model"}
    assert base["model"]["balance_probs"] == "sampled" and not (set(added) - {"balance_probs"}) & set(base["model"])
    config = TrainConfig(**apply_preset("sparsemixer-reference-full", {"estimator": "switch", "steps": 2,
                                                                       "batch_size": 2, "block_size": 16,
                                                                       "model": TINY}),
                         preset="sparsemixer-reference-full")
    assert config.settings()["model"]["init"] == "fairseq"
    trainer = Trainer(config, tmp_path / "full")
    assert math.isfinite(trainer.train_step()["train_loss"])
