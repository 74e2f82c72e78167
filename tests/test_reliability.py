"""Inputs and faults that must give one clear line (exit 2, or 1 for the environment) and leave nothing behind."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


from helpers import cli

ROOT = Path(__file__).resolve().parents[1]



def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_figures_never_renders_a_broken_report_over_the_good_one(tmp_path):
    """Committed reports whose data is cut short, empty, has a wrong header, or whose report.json is corrupt are
    each named and left exactly as they were; the other report is rendered; the command exits non-zero. (One
    `gradest figures` over four damaged copies of top2 beside a good translation report.)"""
    reports = tmp_path / "reports"
    shutil.copytree(ROOT / "reports" / "translation", reports / "translation")
    damages = ["truncate", "empty", "header", "json"]
    for damage in damages:
        broken = reports / f"top2-{damage}"
        shutil.copytree(ROOT / "reports" / "top2", broken)
        results = broken / "results.csv"
        if damage == "truncate":
            text = results.read_text()
            results.write_text(text[: len(text) * 2 // 3])
        elif damage == "empty":
            results.write_text("")
        elif damage == "header":
            results.write_text("a,b\n1,2\n")
        else:
            (broken / "report.json").write_text("{not json")
    before = {damage: digest(reports / f"top2-{damage}") for damage in damages}
    result = subprocess.run([sys.executable, "-m", "gradest.cli", "figures", "--reports", str(reports)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"regenerated {reports / 'translation'}" in result.stdout, result.stdout
    for damage in damages:
        assert f"skipped {reports / f'top2-{damage}'}: " in result.stdout, (damage, result.stdout)
        assert digest(reports / f"top2-{damage}") == before[damage], damage  # nothing rendered over it or deleted


def test_all_with_other_estimators_is_refused():
    result = cli("compare", "--problem", "moe-regression", "--estimators", "all,switch", "--samples", "10")
    assert result.exit_code == 2 and "'all' stands alone" in result.output


def test_a_hyper_parameter_given_twice_is_refused(tmp_path):
    for args in (["--estimators", "st:tau=0.5:tau=2"], ["--set", "tau=1", "--set", "tau=2"]):
        result = cli("compare", "--problem", "moe-regression", *args, "--samples", "10", "--out", tmp_path / "c")
        assert result.exit_code == 2 and "tau" in result.output and "twice" in result.output, result.output
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("seed", ["-1", str(2 ** 63)])
@pytest.mark.parametrize("command", [["compare", "--problem", "moe-regression", "--samples", "10"],
                                     ["run", "--estimator", "switch", "--steps", "1"],
                                     ["run", "--problem", "poly", "--estimator", "st", "--steps", "1"]])
def test_one_seed_range_for_every_command(tmp_path, command, seed):
    result = cli(*command, "--seed", seed, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "seed" in result.output and "0 to 9,223,372,036,854,775,807" in result.output, \
        result.output
    assert not (tmp_path / "out").exists()


def test_stdout_on_a_full_disk_is_one_line_and_exit_1():
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "gradest.cli", "list"], stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert result.stderr.count("\n") == 1 and "cannot write" in result.stderr


@pytest.mark.parametrize("problem, option", [("hf", ["--experts", "4"]), ("hf", ["--sharpness", "2"]),
                                             ("switch-lm", ["--tokens", "8"]), ("switch-lm", ["--dim", "4"])])
def test_compare_refuses_an_option_no_chosen_problem_reads(tmp_path, problem, option):
    result = cli("compare", "--problem", problem, *option, "--out", tmp_path / "c")
    assert result.exit_code == 2 and option[0] in result.output and "synthetic problems" in result.output
    assert not (tmp_path / "c").exists()


def test_doctor_top_k_beyond_the_experts_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    result = cli("doctor", "--hf", "mixtral", "--top-k", "9", "--out", tmp_path / "d")
    assert result.exit_code == 2 and "--top-k 9" in result.output and "1 <= k <=" in result.output, result.output
    assert not (tmp_path / "d").exists()


def test_a_full_disk_during_compare_leaves_no_half_report(tmp_path, monkeypatch):
    """The third file of the report fails with ENOSPC: one line, exit code 1, nothing of the report left (the
    directory it made is gone), so the same command runs again to the same --out."""
    import errno
    import gradest.figures
    import gradest.io
    real, calls = gradest.io.atomic_write, []

    def full(path, write):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(gradest.io, "atomic_write", full)
    monkeypatch.setattr(gradest.figures, "atomic_write", full)
    args = ["compare", "--problem", "moe-regression", "--estimators", "switch", "--samples", "5", "--out",
            tmp_path / "c"]
    result = cli(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    # (stdout has the progress line of the one estimator measured)
    assert result.stderr.strip().splitlines() == [f"error: cannot write the report into {tmp_path / 'c'}/: No space "
                                                  f"left on device"]
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(gradest.io, "atomic_write", real)
    monkeypatch.setattr(gradest.figures, "atomic_write", real)
    assert cli(*args).exit_code == 0 and (tmp_path / "c" / "summary.csv").is_file()


def test_a_signal_during_the_first_step_stops_at_once(tmp_path):
    """A signal that arrives while the first step of the process runs reaches `stop_now` at once, from the watcher
    thread, while the main thread is still inside the step (here: waiting for it); the handlers are restored."""
    import signal
    import threading
    from gradest.config import TrainConfig
    from gradest.train import Trainer
    trainer = Trainer(TrainConfig(estimator="switch", steps=2, batch_size=2, block_size=8,
                                  model={"n_layer": 2, "d_model": 8, "d_ff": 16, "n_head": 2}), tmp_path / "run")
    reached, stopped = threading.Event(), []

    def step():  # a first step minutes long, inside torch: it ends when the signal has been seen
        signal.raise_signal(signal.SIGTERM)
        assert reached.wait(timeout=300)
        raise KeyboardInterrupt  # (stop_now would have ended the process)

    def stop_now(signum):
        stopped.append(signum)
        reached.set()

    trainer.train_step = step
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(handle_signals=True, stop_now=stop_now)
    assert stopped == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is before


WINDOW = """
import contextlib, signal, sys
import gradest.cli
lock = gradest.cli.directory_lock

@contextlib.contextmanager
def signalled_lock(path):  # SIGTERM the moment the run's directory is locked, before the run sets its handlers
    with lock(path) as held:
        signal.raise_signal(signal.SIGTERM)
        yield held

gradest.cli.directory_lock = signalled_lock
gradest.cli.main(sys.argv[1:], prog_name="gradest")
"""


def test_sigterm_between_the_lock_and_the_runs_handlers_stops_it_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", WINDOW, "--threads", "1", "run", "--estimator", "switch",
                             "--steps", "2", "--batch-size", "2", "--model", "n_layer=2", "--model", "d_model=16",
                             "--model", "d_ff=16", "--model", "n_head=2", "--model", "block_size=8", "--out",
                             str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip().splitlines() == ["interrupted before the first step ended: nothing was kept; "
                                                  "start the run again with the same command"]
    assert not out.exists()


@pytest.mark.slow
def test_sigterm_in_the_first_step_of_a_large_run_stops_it_and_leaves_nothing(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "gradest.cli", "--threads", "1", "run", "--estimator",
                                "switch", "--steps", "3", "--batch-size", "16", "--model", "block_size=512",
                                "--model", "n_layer=8", "--model", "d_model=256", "--model", "d_ff=1024", "--out",
                                str(out)],  # a first step of seconds on one thread, about 2 GB
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / "config.json").exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["interrupted before the first step ended: nothing was kept; start the run "
                                           "again with the same command"]
    assert not out.exists()


@pytest.mark.slow
def test_a_checkpoint_of_another_model_or_kind_is_one_line(tmp_path):
    """A real run's checkpoint whose record says another d_model (the weights do not load), and a Hugging Face
    run's checkpoint given to the Switch probe, are one line naming the mismatch; nothing is written."""
    import torch
    tiny = ["--steps", "1", "--batch-size", "2", "--model", "n_layer=2", "--model", "d_model=16", "--model",
            "d_ff=32", "--model", "n_head=2", "--model", "block_size=16"]
    assert cli("run", "--estimator", "switch", *tiny, "--out", tmp_path / "run").exit_code == 0
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    state["config"]["model"]["d_model"] = 32
    torch.save(state, path)
    before = digest(tmp_path)
    for args in (["run", "--resume", tmp_path / "run", "--steps", "3"],
                 ["compare", "--problem", "switch-lm", "--checkpoint", tmp_path / "run", "--samples", "5", "--out",
                  tmp_path / "c"]):
        result = cli(*args)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert "size mismatch" in result.output and "checkpoint.pt does not fit" in result.output
    assert digest(tmp_path) == before and not (tmp_path / "c").exists()
    pytest.importorskip("transformers")
    assert cli("run", "--hf", "mixtral", "--estimator", "topk", "--steps", "1", "--batch-size", "2", "--model",
               "block_size=8", "--out", tmp_path / "hf").exit_code == 0
    result = cli("compare", "--problem", "switch-lm", "--checkpoint", tmp_path / "hf", "--samples", "5", "--out",
                 tmp_path / "c")
    assert result.exit_code == 2 and "is a Hugging Face run (hf=mixtral)" in result.output, result.output
    assert not (tmp_path / "c").exists()
