"""The `gradest` command: what each subcommand writes, and that every user error is one line with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import assert_one_line_error, cli
from gradest.estimators import REGISTRY
from gradest.io import atomic_write_text
from gradest.figures import atomic_savefig
from gradest.report import SUMMARY_COLUMNS

SMALL = ["--tokens", "4", "--samples", "200"]  # a problem small enough that compare takes a fraction of a second
CATEGORICAL_ESTIMATORS = {"st", "gumbel-st", "rb-gumbel", "gapped-st", "reinmax", "reinforce", "exact"}


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    # `gradest --threads N` sets torch's thread count; later test modules get theirs back
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)




def base_name(label: str) -> str:
    """`reinforce(baseline=mean)` -> `reinforce`."""
    return label.split("(")[0]


# ---------------------------------------------------------------------------------------------------------- list
def test_list_shows_every_estimator():
    result = cli("list")
    assert result.exit_code == 0, result.output
    first_column = {line.split()[0] for line in result.stdout.splitlines()[2:] if line.strip()}
    assert first_column == set(REGISTRY)
    assert "Switch Transformers" in result.stdout and "tau=1.0" in result.stdout


# ------------------------------------------------------------------------------------------------------- compare
@pytest.fixture(scope="module")
def small_compare(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    result = cli("compare", "--problem", "moe-regression", "--experts", 3, *SMALL, "--seed", 3, "--out", out)
    assert result.exit_code == 0, result.output
    return result, out


def test_compare_writes_the_report(small_compare):
    result, out = small_compare
    summary = pd.read_csv(out / "summary.csv")
    assert set(SUMMARY_COLUMNS) <= set(summary.columns)
    assert set(summary["problem"]) == {"moe-regression"} and set(summary["experts"]) == {3}
    assert {base_name(label) for label in summary["estimator"]} == set(REGISTRY)
    markdown = (out / "summary.md").read_text()
    assert "moe-regression" in markdown and "router" in markdown and "jackknife" in markdown
    assert len(list(out.glob("*.png"))) >= 2
    metadata = json.loads((out / "config.json").read_text())
    assert metadata["seed"] == 3
    assert {"python", "torch", "numpy", "pandas", "gradest"} <= set(metadata["versions"])
    assert metadata["git"]["commit"]  # a hash in a checkout, "unknown" outside one
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files behind
    assert "sparsemixer" in result.stdout  # the summary table is printed too


def test_compare_all_on_poly_uses_only_categorical_estimators(tmp_path):
    result = cli("compare", "--problem", "poly", *SMALL, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {base_name(label) for label in summary["estimator"]} == CATEGORICAL_ESTIMATORS
    assert set(summary["experts"]) == {2}  # poly's binary default


def test_compare_measures_every_combination(tmp_path):
    result = cli("compare", "--problem", "moe-regression,moe-classify", "--experts", "3,4", "--sharpness", "1,2",
                    "--estimators", "st:tau=0.5,exact", *SMALL, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary.groupby(["problem", "experts", "sharpness"])) == 8
    assert set(summary["estimator"]) == {"st(tau=0.5)", "exact"}


def test_gate_estimator_on_a_categorical_problem_names_those_that_apply(tmp_path):
    result = cli("compare", "--problem", "poly", "--estimators", "switch", *SMALL, "--out", tmp_path)
    assert_one_line_error(result, "switch", *CATEGORICAL_ESTIMATORS)


@pytest.mark.parametrize("args, words", [
    (["--estimators", "nosuch"], ["nosuch", "reinmax"]),
    (["--set", "tau=0"], ["tau"]),
    (["--set", "jitter_eps=-1"], ["jitter_eps"]),
    (["--set", "nosuch=1"], ["nosuch"]),
    (["--set", "tau"], ["key=value"]),
    (["--set", "k=2"], ["--top-k"]),
    (["--estimators", "reinforce:baseline=best"], ["baseline"]),
    (["--top-k", 5, "--experts", 3], ["top_k=5"]),
    (["--experts", 1], ["experts"]),
    (["--experts", "3,"], ["--experts"]),
    (["--problem", "nosuch"], ["nosuch", "moe-regression"]),
    (["--samples", "many"], ["--samples"]),
    (["--samples", 2], ["--samples"]),
    (["--wrt", "weights"], ["--wrt"]),
    (["--sharpness", "nan"], ["sharpness"]),
], ids=lambda value: " ".join(map(str, value)) if isinstance(value, list) else None)
def test_compare_errors_are_one_line(tmp_path, args, words):
    result = cli("compare", "--problem", "moe-regression", *SMALL, *args, "--out", tmp_path)
    assert_one_line_error(result, *words)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_console_script_error_is_one_line():
    script = Path(sys.executable).with_name("gradest")
    if not script.exists():
        pytest.skip("the gradest console script is not installed next to this python")
    process = subprocess.run([str(script), "compare", "--estimators", "nosuch"], capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [process.stderr.strip()]
    assert process.stderr.startswith("error: unknown estimator 'nosuch'") and "Traceback" not in process.stderr
    assert process.stdout == ""


# ----------------------------------------------------------------------------------------------------------- run
RUN_SMALL = ["--problem", "moe-regression", "--tokens", 8, "--steps", 15]


def run_metrics(out, *args):
    result = cli("run", *RUN_SMALL, *args, "--out", out)
    assert result.exit_code == 0, result.output
    return pd.read_csv(out / "metrics.csv")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["st", "reinforce:baseline=mean"])
def test_run_writes_metrics_and_is_deterministic(tmp_path, spec):
    first = run_metrics(tmp_path / "first", "--estimator", spec, "--seed", 5)
    again = run_metrics(tmp_path / "again", "--estimator", spec, "--seed", 5)
    other_seed = run_metrics(tmp_path / "other", "--estimator", spec, "--seed", 6)
    assert list(first.columns) == ["step", "objective", "own_objective", "inference_loss", "objective_exact_run",
                                   "inference_loss_exact_run", "seconds"]
    assert list(first["step"]) == list(range(16))  # the start, then every step
    numbers = first.columns.drop("seconds")  # wall time is the one column that may differ
    pd.testing.assert_frame_equal(first[numbers], again[numbers], check_exact=True)
    assert not first[numbers].equals(other_seed[numbers])
    assert (tmp_path / "first" / "objective.png").stat().st_size > 0
    metadata = json.loads((tmp_path / "first" / "config.json").read_text())
    assert metadata["seed"] == 5 and metadata["config"]["problem"]["problem"] == "moe-regression"
    assert metadata["git"]["commit"] and "torch" in metadata["versions"]


def test_run_with_the_exact_gradient_lowers_the_objective(tmp_path):
    metrics = run_metrics(tmp_path, "--estimator", "exact", "--problem", "moe-classify")
    assert metrics["objective"].iloc[-1] < metrics["objective"].iloc[0]
    # training with `exact` is the reference run itself, step for step
    assert metrics["objective"].equals(metrics["objective_exact_run"])


def test_run_default_directory_names_estimator_problem_and_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("run", "--estimator", "sparsemixer-v2*", "--problem", "moe-regression", "--tokens", 4,
                    "--steps", 2)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "sparsemixer-v2-star-moe-regression-seed0" / "metrics.csv").exists()


@pytest.mark.parametrize("args, words", [
    (["--estimator", "nosuch"], ["nosuch"]),
    (["--estimator", "switch", "--problem", "poly"], ["switch", "reinmax"]),
    (["--estimator", "st", "--top-k", 2], ["top-2"]),
    (["--estimator", "st", "--lr", "-1"], ["lr"]),
    (["--estimator", "st", "--steps", 0], ["--steps"]),
    (["--estimator", "st", "--set", "tau=0"], ["tau"]),
], ids=lambda value: " ".join(map(str, value)) if isinstance(value, list) else None)
def test_run_errors_are_one_line(tmp_path, args, words):
    result = cli("run", "--problem", "moe-regression", *args, "--out", tmp_path / "out")
    assert_one_line_error(result, *words)
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------------------- report
def test_interrupted_write_keeps_the_previous_file(tmp_path):
    class FailingFigure:
        def savefig(self, handle, **kwargs):
            handle.write(b"half a png")
            raise RuntimeError("interrupted")

    path = atomic_write_text(tmp_path / "plot.png", "previous")
    with pytest.raises(RuntimeError):
        atomic_savefig(FailingFigure(), path)
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


@pytest.mark.slow
def test_compare_probes_the_switch_transformer(tmp_path):
    """--problem switch-lm runs the router-gradient probe next to a synthetic problem, in one report, with the
    probe's reference method and its standard error."""
    out = tmp_path / "probe"
    result = cli("compare", "--problem", "switch-lm,moe-regression", "--estimators", "sparsemixer,reinforce,st",
                    "--samples", 60, "--out", out)
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / "summary.csv")
    probe = df[df.problem == "switch-lm"]
    assert set(probe.estimator) == {"sparsemixer", "reinforce", "st"}
    assert set(probe.reference) <= {"enumeration", "rao-blackwell"} and (probe.reference_se >= 0).all()
    assert set(df[df.problem == "moe-regression"].estimator) == {"sparsemixer", "reinforce", "st"}
    assert "switch-lm" in (out / "summary.md").read_text()


@pytest.mark.parametrize("args,words", [
    (["--problem", "switch-lm", "--wrt", "all"], ["--wrt all", "logits, router"]),
    (["--problem", "switch-xx"], ["switch-xx", "switch-lm", "moe-regression"]),
])
def test_compare_switch_errors(tmp_path, args, words):
    assert_one_line_error(cli("compare", *args, "--samples", 10, "--out", tmp_path / "out"), *words)
