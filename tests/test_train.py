"""Training a Switch Transformer with every estimator: the loss goes down, resuming reproduces, flags are checked."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from gradest.cli import main
from helpers import assert_one_line_error, cli
from gradest.devices import available_devices, check_device
from gradest.errors import GradestError
from gradest.estimators import trainable
from gradest.train import Diverged, Interrupted, Trainer, TrainConfig

TINY = {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64}
TIMING = ["seconds", "tokens_per_s"]  # the only columns allowed to differ between identical runs
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only stalls a busy machine


def tiny(tmp_path, **overrides) -> Trainer:
    settings = dict(steps=30, batch_size=8, block_size=32, experts=4, eval_interval=15, eval_batches=2,
                    checkpoint_interval=10, warmup=5, model=TINY) | overrides
    return Trainer(TrainConfig(**settings), tmp_path)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_translation_reports_bleu(tmp_path):
    """--task mt trains the encoder-decoder on Multi30k and reports greedy BLEU on val and test_2016."""
    trainer = tiny(tmp_path, task="mt", steps=4, eval_interval=4, block_size=96, model=TINY | {"n_encoder_layer": 1})
    with pytest.raises(GradestError, match="block_size=32 is shorter than translation needs"):
        tiny(tmp_path / "short", task="mt", steps=4, model=TINY)
    # BLEU's whole pipeline on the first 64 sentences of val and test: an untrained model decodes every one of
    # the 2,000 to the length limit, minutes of a test; the committed translation study scores the whole sets
    data, n = trainer.task.data, 64
    trainer.task.data = dataclasses.replace(data, val=data.val[:n], test=data.test[:n], target_text={
        **data.target_text, "val": data.target_text["val"][:n], "test": data.target_text["test"][:n]})
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
    (["--estimator", "sparsemixer", "--device", "bogus"], ["'bogus'", "valid here: cpu"]),
    (["--estimator", "sparsemixer", "--device", "cuda:99"], ["'cuda:99'", "valid here: cpu"]),
])
def test_bad_flags_give_one_line_and_exit_2(args, words):
    result = CliRunner().invoke(main, ["run", *args, "--steps", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("balancing", [[], ["--model=balance_bias_rate=0.01"]], ids=["plain", "bias-balanced"])
def test_two_gloo_processes_equal_one_process(tmp_path, balancing):
    """torchrun with 2 gloo processes on the CPU trains like one process on the same global batch: per-step
    losses, gradient norms and the final parameters agree to float32 rounding. (Deterministic routing and no
    load-balancing loss, the two things computed per rank.) With auxiliary-loss-free balancing the selection biases
    (in the checkpoint) agree too: each rank's loads are summed over the ranks before the update."""
    import socket
    import subprocess
    import sys
    with socket.socket() as probe:  # a free port: a fixed one collides with any other run of this test
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    args = ["run", "--estimator", "topk", "--steps", "4", "--batch-size", "8", "--experts", "4",
            "--model=balance_coef=0", *balancing] + [f"--model={k}={v}" for k, v in TINY.items()]
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
    if balancing:
        biases = [value for key, value in params[0].items() if key.endswith("expert_bias")]
        assert biases and any(b.abs().max() > 0 for b in biases)


@pytest.mark.slow
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


# ------------------------------------------------------------------------------ stopping, resuming, diverging
TINY_ARGS = ["--batch-size", "4", "--model=block_size=32"] + [f"--model={k}={v}" for k, v in TINY.items()]




def snapshot(directory):
    """Every file of a directory, with its bytes and modification time: to check that nothing was written."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete 6-step run of the tiny model, made by the CLI (default experts: 8). Tests copy it to change it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = cli("run", "--estimator", "sparsemixer", "--steps", 6, *TINY_ARGS, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def copy_of(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "run"))


# `gradest run` in a subprocess, given a real signal: the run is planned for 400 steps and the signal is sent once its
# first checkpoint and metrics.csv (step 100) are on disk, so hundreds of steps (seconds) separate it from the run's end
STOPPED_RUN = ["--estimator", "sparsemixer", "--steps", "400", *TINY_ARGS]
GRADEST = [sys.executable, "-m", "gradest.cli"]
# gradest's CLI, then a check that the signal handlers it set for the run were given back the ones it found
GRADEST_CHECKING_HANDLERS = [sys.executable, "-c", """
import signal, sys
from gradest.cli import main
handlers = lambda: (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
before = handlers()
try:
    main(sys.argv[1:])
finally:
    assert handlers() == before, f"signal handlers {handlers()} after the run, {before} before"
"""]


def start(command, out):
    """Start COMMAND --out OUT with one intra-op thread, SIGINT at its default as on a terminal (a process started
    with it ignored, as a background job of a script is, keeps ignoring it, as it should)."""
    return subprocess.Popen([*command, "--out", str(out)], env=os.environ | {"OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop(process, out, signum):
    """Send `signum` to the run `process` once its first checkpoint and metrics.csv (saved in this order) are in
    OUT; its return code and stderr lines."""
    deadline = time.monotonic() + 300
    while not (out / "metrics.csv").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr.strip().splitlines()


def interrupted_at(stderr, out) -> int:
    """The step of the one line a stopped run prints, `interrupted at step N; resume with: ...`."""
    match = re.fullmatch(rf"interrupted at step (\d+); resume with: gradest run --resume {re.escape(str(out))}",
                         "\n".join(stderr))
    assert match, stderr
    return int(match[1])


@pytest.mark.slow
def test_sigint_checkpoints_and_the_printed_resume_reproduces_the_uninterrupted_run(tmp_path):
    """SIGINT during `gradest run` finishes the step under way, writes the checkpoint and metrics.csv at it, prints
    the resume command and exits with 130; running that command gives the uninterrupted run's metrics exactly."""
    whole = start([*GRADEST, "run", *STOPPED_RUN], tmp_path / "whole")
    code, stderr = stop(start([*GRADEST, "run", *STOPPED_RUN], tmp_path / "cut"), tmp_path / "cut", signal.SIGINT)
    assert whole.wait(timeout=300) == 0, whole.communicate()[1][-3000:]
    assert code == 130, stderr[-20:]
    step = interrupted_at(stderr, tmp_path / "cut")
    assert 100 <= step < 400
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == step
    assert list(pd.read_csv(tmp_path / "cut" / "metrics.csv")["step"]) == list(range(1, step + 1))
    resume = stderr[0].split("resume with: ")[1].split()
    assert resume[:2] == ["gradest", "run"]
    resumed = subprocess.run([*GRADEST, *resume[1:]], env=os.environ | {"OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (pd.read_csv(tmp_path / name / "metrics.csv").drop(columns=TIMING) for name in ("whole", "cut"))
    assert len(b) == 400
    pd.testing.assert_frame_equal(a, b, check_exact=True)


@pytest.mark.slow
def test_sigterm_stops_with_143_and_restores_the_signal_handlers(tmp_path):
    out = tmp_path / "run"
    code, stderr = stop(start([*GRADEST_CHECKING_HANDLERS, "run", *STOPPED_RUN], out), out, signal.SIGTERM)
    assert code == 143, stderr[-20:]  # 1, with an AssertionError, had the handlers not been restored
    step = interrupted_at(stderr, out)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == step


def test_a_signal_between_checkpoints_stops_after_its_step_and_resuming_reproduces(tmp_path):
    """In-process, at a known step: a real SIGINT, raised as step 15 is evaluated (checkpoints are due at 10 and
    20), stops the run after that step with the checkpoint and metrics.csv written at it, and the SIGINT handler
    found before the run is back after it; resuming gives the uninterrupted run's metrics exactly."""
    whole = tiny(tmp_path / "whole", steps=20).run()
    reached = []  # the handler in place before the run: the run's own handler must take the signal instead

    def ours(signum, frame):
        reached.append(signum)

    previous = signal.signal(signal.SIGINT, ours)
    try:
        with pytest.raises(Interrupted) as stop:
            tiny(tmp_path / "cut", steps=20).run(
                handle_signals=True, on_line=lambda line, row: row["step"] == 15 and signal.raise_signal(signal.SIGINT))
        assert signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (stop.value.step, stop.value.signum, reached) == (15, signal.SIGINT, [])
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 15
    assert list(pd.read_csv(tmp_path / "cut" / "metrics.csv")["step"]) == list(range(1, 16))
    torch.manual_seed(999)  # a resumed process starts with another RNG state
    resumed = Trainer.resume(tmp_path / "cut").run()
    pd.testing.assert_frame_equal(whole.drop(columns=TIMING), resumed.drop(columns=TIMING), check_exact=True)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_an_unreadable_checkpoint_is_one_line(finished_run, tmp_path, damage):
    out = copy_of(finished_run, tmp_path)
    path = out / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    before = snapshot(out)
    result = cli("run", "--resume", out, "--steps", 8)
    assert_one_line_error(result, f"{path} is not a readable checkpoint", "delete the run directory",
                          "resume another run")
    assert snapshot(out) == before


def test_resume_refuses_changed_options_and_records_itself(finished_run, tmp_path):
    """On --resume only --steps and --device may be given; other options are refused (naming the run's values)
    unless they have the run's value. config.json keeps the command that started the run and lists the resume."""
    out = copy_of(finished_run, tmp_path)
    before = snapshot(out)
    result = cli("run", "--resume", out, "--estimator", "switch", "--lr", 0.5, "--experts", 4)
    assert_one_line_error(result, "--estimator switch (the run's: --estimator sparsemixer)",
                          "--lr 0.5 (the run's: --lr 0.002)", "--experts 4 (the run's: --experts 8)",
                          "only --steps and --device")
    assert_one_line_error(cli("run", "--resume", out, "--model", "d_model=64", "--set", "tau=2"),
                          "--model d_model=64 (the run's: --model d_model=32)", "--set tau=2")
    assert_one_line_error(cli("run", "--resume", out, "--problem", "poly"), "--problem poly")
    assert snapshot(out) == before
    # the run's own values are no change; --steps extends, --device is allowed
    result = cli("run", "--resume", out, "--estimator", "sparsemixer", "--batch-size", 4, "--model", "d_model=32",
                 "--steps", 8, "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert "--resume" not in config["command"] and "--estimator sparsemixer --steps 6" in config["command"]
    assert [(r["step"], "--resume" in r["command"]) for r in config["resumes"]] == [(6, True)]
    assert config["config"]["steps"] == 8 and config["config"]["schedule_steps"] == 6


def test_resume_to_fewer_steps_is_refused_and_to_the_same_does_nothing(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    before = snapshot(out)
    assert_one_line_error(cli("run", "--resume", out, "--steps", 3), "--steps 3", "6 steps", "valid: --steps >= 6")
    for args in (["--steps", 6], []):
        result = cli("run", "--resume", out, *args)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == f"{out}/ is complete (6 of 6 steps): nothing to do; extend it with --steps " \
                                        f"N, N > 6"
    assert snapshot(out) == before
    cut = tiny(tmp_path / "cut", steps=20)
    cut.run(until=10)
    with pytest.raises(GradestError, match=r"valid: --steps > 10"):
        Trainer.resume(tmp_path / "cut", steps=10)


@pytest.mark.slow
def test_extending_a_run_keeps_its_schedule(tmp_path):
    """A run resumed to more steps than planned keeps its cosine (schedule_steps) and holds lr * min_lr_ratio
    after it: the learning rate is continuous at the resume point, whether the run had finished or was cut."""
    lr = lambda frame: list(frame["lr"])  # noqa: E731 - the rate each row leaves for the next step
    whole = tiny(tmp_path / "whole", steps=20).run()
    final = TrainConfig.default("lr") * TrainConfig.default("min_lr_ratio")
    assert lr(whole)[-1] == final and lr(whole)[0] > final
    extended = Trainer.resume(tmp_path / "whole", steps=30)
    assert extended.config.schedule_steps == 20
    assert lr(extended.run()) == lr(whole) + [final] * 10
    tiny(tmp_path / "cut", steps=20).run(until=10)
    resumed = Trainer.resume(tmp_path / "cut", steps=30).run()
    assert lr(resumed) == lr(whole) + [final] * 10
    again = Trainer.resume(tmp_path / "cut", steps=40)  # schedule_steps stays the first plan's
    assert again.config.schedule_steps == 20 and TrainConfig(**again.config.settings()) == again.config


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path):
    trainer = tiny(tmp_path / "run", lr=1e6, checkpoint_interval=1)
    with pytest.raises(Diverged, match=r"diverged at step (\d+).*last good checkpoint \(step \d+\).*--lr 500000"):
        trainer.run()
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["step"] == trainer.step and all(torch.isfinite(p).all() for p in state["model"].values())
    # a checkpoint is never written with non-finite parameters
    trainer = tiny(tmp_path / "nan")
    trainer.run(until=2)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(Diverged, match=r"step 2 \(parameters NaN or inf\).*\(step 2\)"):
        trainer.save()
    state = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(p).all() for p in state["model"].values())


def test_cli_divergence_is_one_line(tmp_path):
    result = cli("run", "--estimator", "sparsemixer", "--lr", "1e6", "--steps", 20, *TINY_ARGS, "--out", tmp_path)
    assert_one_line_error(result, "training diverged at step", "--lr 500000", "no checkpoint had been written")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_stale_temporaries_are_removed(tmp_path):
    """A write killed between writing its temporary and renaming it leaves `.NAME.<random>.tmp`: a run or resume
    deletes those of its files, and nothing else."""
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.pt.0123abcd.tmp", out / ".metrics.csv.77.tmp"]
    for path in [*stale, out / ".notes.tmp"]:
        path.write_bytes(b"half a file")
    tiny(out, steps=10).run(until=5)
    assert not any(path.exists() for path in stale) and (out / ".notes.tmp").exists()
    stale[0].write_bytes(b"half a file")
    Trainer.resume(out).run()
    assert not stale[0].exists()


@pytest.mark.slow
def test_progress_lines_without_a_terminal(tmp_path):
    """Off a terminal (no progress bar) the run prints one line per evaluation (every 100 steps and the last); any
    other step's line is a remark on the pace (a slow machine's first step), tests/test_progress.py's subject."""
    result = cli("run", "--estimator", "switch", "--steps", 200, *TINY_ARGS, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    lines = [line for line in steps if "val loss" in line]
    assert all("the first" in line or " left" in line for line in steps if line not in lines), steps
    assert [line.split(":")[0] for line in lines] == ["step 100/200", "step 200/200"], result.stdout
    for line in lines:
        assert "train loss" in line and "val loss" in line and "tokens/s" in line and "s elapsed" in line
    assert result.stderr == ""  # no bar


def test_devices():
    assert available_devices()[0] == "cpu" and check_device("cpu:0") == "cpu"
    with pytest.raises(GradestError, match="valid here: cpu"):
        check_device("cuda:99")


def test_help_gives_each_experts_default():
    from gradest.model import SwitchConfig
    from gradest.problems import ProblemConfig
    text = " ".join(cli("run", "--help").output.split())
    assert f"[default {SwitchConfig.experts} for a Switch Transformer; with --problem: 2 for poly, " \
           f"{ProblemConfig.experts} otherwise]" in text
    assert "only --steps and --device" in text
    assert f"[default 2 for poly, {ProblemConfig.experts} otherwise]" in " ".join(cli("compare", "--help")
                                                                                .output.split())


@pytest.mark.slow
def test_plateau_stops_early_and_a_resume_stops_at_the_same_step(tmp_path):
    """--plateau: the run ends at the first evaluation whose validation loss is less than `plateau` below the one
    `plateau_window` steps before (here a threshold so large that the first comparison, at step 20, stops it);
    the stopped run is complete, and one interrupted at step 10 and resumed stops at the same step with the same
    rows."""
    settings = dict(steps=60, eval_interval=10, plateau=10.0, plateau_window=10, checkpoint_interval=10)
    metrics = tiny(tmp_path / "one", **settings).run()
    assert metrics["step"].iloc[-1] == 20
    val = metrics["val_loss"].dropna().to_numpy()
    assert len(val) == 2 and val[0] - val[1] < 10.0
    assert Trainer.resume(tmp_path / "one").complete

    tiny(tmp_path / "two", **settings).run(until=10)
    again = Trainer.resume(tmp_path / "two").run()
    pd.testing.assert_frame_equal(again.drop(columns=TIMING), metrics.drop(columns=TIMING))

    never = tiny(tmp_path / "three", steps=30, eval_interval=10, plateau=1e-9, plateau_window=10).run()
    assert never["step"].iloc[-1] == 30  # still improving: trained to --steps


def test_plateau_window_must_be_a_multiple_of_the_eval_interval():
    with pytest.raises(GradestError, match="plateau_window=150 is not a multiple of eval_interval=100"):
        TrainConfig(plateau=0.005, plateau_window=150)
    TrainConfig(plateau_window=150)  # without --plateau the window is unused
