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
@pytest.mark.parametrize("damage", ["truncate", "empty", "header", "json"])
def test_figures_never_renders_a_broken_report_over_the_good_one(tmp_path, damage):
    """A committed report whose data is cut short, empty, has a wrong header, or whose report.json is corrupt is
    named and left exactly as it was; the other reports are rendered; the command exits non-zero."""
    reports = tmp_path / "reports"
    for name in ("top2", "bias-variance"):
        shutil.copytree(ROOT / "reports" / name, reports / name)
    broken = reports / "top2"
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
    before = digest(broken)
    result = subprocess.run([sys.executable, "-m", "gradest.cli", "figures", "--reports", str(reports)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"skipped {broken}" in result.stdout and f"regenerated {reports / 'bias-variance'}" in result.stdout
    assert digest(broken) == before  # not a byte rendered over it, no figure deleted


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
