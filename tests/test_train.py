"""Training a Switch Transformer with every estimator: the loss goes down, resuming reproduces, flags are checked."""

import json

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from gradest.cli import main
from gradest.errors import GradestError
from gradest.estimators import trainable
from gradest.train import Trainer, TrainConfig

TINY = {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64}
TIMING = ["seconds", "tokens_per_s"]  # the only columns allowed to differ between identical runs


def tiny(tmp_path, **overrides) -> Trainer:
    settings = dict(steps=30, batch_size=8, block_size=32, experts=4, eval_interval=15, eval_batches=2,
                    checkpoint_interval=10, warmup=5, model=TINY) | overrides
    return Trainer(TrainConfig(**settings), tmp_path)


@pytest.mark.parametrize("estimator", trainable("gated")
                         + ["reinforce:baseline=zero", "reinforce:baseline=mean"])
def test_short_run_lowers_the_loss(tmp_path, estimator):
    """Every estimator that can sit in an MoE layer trains the LM: validation loss (on fixed batches) falls by
    more than 0.1 nats from its start of ln 65 = 4.17 in 30 steps (REINFORCE without a baseline, the noisiest,
    falls about 0.2; the others 0.6 or more)."""
    trainer = tiny(tmp_path, estimator=estimator)
    start = trainer.evaluate()
    metrics = trainer.run()
    assert metrics["val_loss"].dropna().iloc[-1] < start - 0.1
    assert torch.isfinite(torch.tensor(metrics["train_loss"].to_numpy())).all()


def test_top2_omega_dense_baseline_post_ln_and_bf16(tmp_path):
    """Top-2 sequential routing, omega on a switch model, the dense baseline (no MoE), post-LN and bf16 autocast
    on the CPU all train."""
    for i, overrides in enumerate([dict(estimator="sparsemixer-v2", top_k=2), dict(estimator="switch", omega=True),
                                   dict(estimator="switch", model=TINY | {"moe_every": 0}),
                                   dict(estimator="sparsemixer", model=TINY | {"post_ln": True}),
                                   dict(estimator="sparsemixer", dtype="bfloat16")]):
        trainer = tiny(tmp_path / str(i), **overrides)
        start = trainer.evaluate()
        assert trainer.run()["val_loss"].dropna().iloc[-1] < start - 0.3
    assert not tiny(tmp_path / "x", estimator="switch", model=TINY | {"moe_every": 0}).model.moe_layers()


@pytest.mark.parametrize("estimator", ["sparsemixer", "reinforce:baseline=mean", "default-moe"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, estimator):
    """Stopping at step 10 and resuming from the checkpoint gives the uninterrupted run's metrics exactly:
    model, optimiser, scheduler, data order and the estimators' RNG are all restored."""
    whole = tiny(tmp_path / "whole", estimator=estimator, steps=20).run()
    tiny(tmp_path / "cut", estimator=estimator, steps=20).run(until=10)
    torch.manual_seed(999)  # a resumed process starts with another RNG state
    resumed = Trainer.resume(tmp_path / "cut").run()
    assert len(resumed) == 20
    pd.testing.assert_frame_equal(whole.drop(columns=TIMING), resumed.drop(columns=TIMING), check_exact=True)
    on_disk = pd.read_csv(tmp_path / "cut" / "metrics.csv")
    assert list(on_disk["step"]) == list(range(1, 21))


def test_same_seed_same_numbers(tmp_path):
    a = tiny(tmp_path / "a", steps=10).run().drop(columns=TIMING)
    b = tiny(tmp_path / "b", steps=10).run().drop(columns=TIMING)
    c = tiny(tmp_path / "c", steps=10, seed=1).run().drop(columns=TIMING)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert not a.equals(c)


def test_flops_per_update_counts_the_router_and_the_experts_run_and_changes_nothing(tmp_path):
    """FLOPs of one update (torch.utils.flop_counter): a Switch model is the dense baseline of the same active
    size plus exactly its routers' matrix products (forward x.W, backward for x and for W: 6 N d n per MoE layer,
    N tokens); REINFORCE's zero-output baseline adds a forward pass; a dense-routing estimator (reinmax) runs all n
    experts. Counting them leaves the run unchanged."""
    N, d, n = 8 * 32, TINY["d_model"], 4
    switch = tiny(tmp_path / "s", estimator="switch", steps=10)
    dense = tiny(tmp_path / "d", estimator="switch", model=TINY | {"moe_every": 0})
    moe_layers = len(switch.model.moe_layers())
    assert switch.flops_per_update() - dense.flops_per_update() == 6 * N * d * n * moe_layers
    reinforce = tiny(tmp_path / "r", estimator="reinforce:baseline=zero").flops_per_update()
    assert switch.flops_per_update() < reinforce < 1.5 * switch.flops_per_update()
    expert = 6 * N * 2 * d * TINY["d_ff"]  # one expert's two matrices, forward and backward
    reinmax = tiny(tmp_path / "x", estimator="reinmax").flops_per_update()
    assert reinmax >= switch.flops_per_update() + (n - 1) * expert * moe_layers
    counted = switch.run().drop(columns=TIMING)
    plain = tiny(tmp_path / "p", estimator="switch", steps=10).run().drop(columns=TIMING)
    pd.testing.assert_frame_equal(counted, plain, check_exact=True)


def test_cli_run_writes_its_files(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--estimator", "sparsemixer", "--steps", "12", "--batch-size", "4", "--experts", "4",
            "--out", str(out)] + [f"--model={k}={v}" for k, v in TINY.items()]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for name in ("metrics.csv", "loss.png", "config.json", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    metrics = pd.read_csv(out / "metrics.csv")
    for column in ("step", "train_loss", "val_loss", "val_ppl", "aux_loss", "argmax_fraction", "router_entropy",
                   "max_load", "seconds", "tokens_per_s", "grad_norm"):
        assert column in metrics
    shares = metrics[[f"load_{i}" for i in range(4)]].sum(axis=1)  # each expert's share of the tokens
    torch.testing.assert_close(torch.tensor(shares.to_numpy()), torch.ones(len(metrics), dtype=torch.float64))
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["estimator"] == "sparsemixer" and config["seed"] == 0 and config["git"]["commit"]
    assert "validation loss" in result.output
    again = CliRunner().invoke(main, ["run", "--resume", str(out), "--steps", "14"])
    assert again.exit_code == 0, again.output
    assert pd.read_csv(out / "metrics.csv")["step"].iloc[-1] == 14
    before = (out / "checkpoint.pt").read_bytes()
    refused = CliRunner().invoke(main, args)  # the same command again must not overwrite the run
    assert refused.exit_code == 2 and "--resume" in refused.output
    assert (out / "checkpoint.pt").read_bytes() == before


def test_translation_reports_bleu(tmp_path):
    """--task mt trains the encoder-decoder on Multi30k and reports greedy BLEU on val and test_2016."""
    trainer = tiny(tmp_path, task="mt", steps=4, eval_interval=4, block_size=96, model=TINY | {"n_encoder_layer": 1})
    with pytest.raises(GradestError, match="block_size=32 is shorter than translation needs"):
        tiny(tmp_path / "short", task="mt", steps=4, model=TINY)
    start = trainer.evaluate()
    final = trainer.run().iloc[-1]
    assert final["val_loss"] < start
    assert 0 <= final["bleu_val"] <= 100 and 0 <= final["bleu_test"] <= 100


@pytest.mark.parametrize("args,words", [
    (["--estimator", "exact"], ["exact", "layer"]),
    (["--estimator", "sparsemixer", "--task", "xx"], ["xx"]),
    (["--estimator", "sparsemixer", "--dtype", "float16"], ["float16"]),
    (["--estimator", "sparsemixer", "--model", "nosuch=1"], ["nosuch", "n_layer"]),
    (["--estimator", "sparsemixer", "--experts", "1"], ["experts"]),
    (["--estimator", "sparsemixer", "--top-k", "3", "--experts", "2"], ["top_k=3"]),
    (["--estimator", "sparsemixer", "--top-k", "2"], ["top-2", "sparsemixer-v2"]),
    (["--estimator", "sparsemixer", "--tokens", "5"], ["--tokens", "--problem"]),
    (["--estimator", "st", "--set", "tau=0"], ["tau=0"]),
    (["--resume", "/nonexistent/dir"], ["no checkpoint"]),
    ([], ["--estimator"]),
])
def test_bad_flags_give_one_line_and_exit_2(args, words):
    result = CliRunner().invoke(main, ["run", *args, "--steps", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0]


def test_two_gloo_processes_equal_one_process(tmp_path):
    """torchrun with 2 gloo processes on the CPU trains like one process on the same global batch: per-step
    losses, gradient norms and the final parameters agree to float32 rounding. (Deterministic routing and no
    load-balancing loss, the two things computed per rank.)"""
    import socket
    import subprocess
    import sys
    with socket.socket() as probe:  # a free port: a fixed one collides with any other run of this test
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    args = ["run", "--estimator", "topk", "--steps", "4", "--batch-size", "8", "--experts", "4",
            "--model=balance_coef=0"] + [f"--model={k}={v}" for k, v in TINY.items()]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", port, "-m", "gradest.cli", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    a, b = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("one", "two"))
    for column in ("train_loss", "grad_norm", "val_loss"):
        assert a[column].notna().equals(b[column].notna())
        torch.testing.assert_close(torch.tensor(a[column].dropna().to_numpy()),
                                   torch.tensor(b[column].dropna().to_numpy()), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["config"]["processes"] == 2
    params = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"] for name in ("one", "two")]
    for key in params[0]:
        torch.testing.assert_close(params[0][key], params[1][key], rtol=1e-4, atol=1e-6, msg=key)


def test_importing_the_trainer_draws_no_plotting_library():
    """The trainer (every rank of a torchrun) and the file helpers it writes with import no plotting library:
    seaborn and matplotlib are report.py's, loaded only where a figure is drawn. In a fresh interpreter, so that
    what other tests imported does not count."""
    import subprocess
    import sys
    check = ("import sys, gradest.train, gradest.io\n"
             "loaded = [m for m in ('seaborn', 'matplotlib') if m in sys.modules]\n"
             "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_io_module_imports_no_pandas_or_plotting():
    """gradest.io stays light: it imports none of pandas, matplotlib, seaborn itself."""
    import ast
    from pathlib import Path

    import gradest.io
    tree = ast.parse(Path(gradest.io.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name.split(".")[0] for name in imported} & {"pandas", "matplotlib", "seaborn"}, imported
