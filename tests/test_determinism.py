"""Determinism you can check: a run's numbers are bit-identical for the same seed, the same torch thread count and
the same machine type, and every run records what decides them (thread count, processor, torch's math settings).
The thread count is part of that: a sum split over more threads is added in another order."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from gradest.cli import main
from gradest.io import environment

RUN = ["run", "--estimator", "sparsemixer", "--steps", "6", "--batch-size", "8", "--model", "n_layer=2",
       "--model", "d_model=64", "--model", "d_ff=256", "--model", "n_head=2", "--model", "block_size=64"]


def run_with_threads(threads: int, out) -> tuple[pd.DataFrame, dict]:
    """A short `gradest --threads N run` (in this process), its metrics and its config.json."""
    previous = torch.get_num_threads()
    try:
        result = CliRunner().invoke(main, ["--threads", str(threads), *RUN, "--out", str(out)],
                                    catch_exceptions=False)
    finally:
        torch.set_num_threads(previous)
    assert result.exit_code == 0, result.output
    return pd.read_csv(out / "metrics.csv"), json.loads((out / "config.json").read_text())


NUMBERS = ["train_loss", "aux_loss", "grad_norm", "val_loss", "argmax_fraction", "router_entropy", "max_load"]


@pytest.mark.slow
def test_same_thread_count_is_bit_identical_and_the_thread_count_is_recorded(tmp_path):
    first, config = run_with_threads(1, tmp_path / "a")
    again, _ = run_with_threads(1, tmp_path / "b")
    columns = [c for c in NUMBERS if c in first]
    pd.testing.assert_frame_equal(first[columns], again[columns], check_exact=True)
    assert config["environment"]["threads"] == 1
    assert {"cpu", "machine", "float32_matmul_precision", "deterministic_algorithms"} <= set(config["environment"])
    two, config_two = run_with_threads(2, tmp_path / "c")
    assert config_two["environment"]["threads"] == 2
    # Two thread counts need not agree in the last bits (they may on a model this small): what a reader is promised
    # is only the same numbers at the same thread count, which is why each run records its own.
    difference = (two[columns] - first[columns]).abs().max().max()
    print(f"largest difference between 1 and 2 threads over {len(first)} steps: {difference:.3g}")
    assert difference < 1e-3  # the same run, up to rounding


def test_environment_names_what_decides_the_last_bits():
    env = environment()
    assert env["threads"] == torch.get_num_threads() and env["cpu"] and env["cores"] >= 1


def test_a_second_run_into_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    """One process trains a run directory: while it holds the directory's lock, a second `gradest run --out` the
    same directory is refused in one line and writes nothing (before, both ran and one was silently lost)."""
    import subprocess
    import sys

    from gradest.io import directory_lock
    out = tmp_path / "run"
    with directory_lock(out):  # as a first `gradest run` holds it
        result = subprocess.run([sys.executable, "-m", "gradest.cli", *RUN, "--out", str(out)], capture_output=True,
                                text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "another process is writing to" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
