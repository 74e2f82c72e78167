"""Declarative studies: cells run once, cached by hash, resumable after a kill; reports collected from cached
results into CSVs, and rendered from those CSVs alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from gradest.cli import main
from gradest.errors import GradestError
from gradest.io import atomic_write_text
from gradest.study import finished, load_study, parse_study, regenerate, run_study, write_report
from helpers import REPO, SMALL, write_spec

STUDIES = REPO / "studies"


class Counter:
    """A runner that records which cells it ran, and can fail on some."""

    def __init__(self, fail=lambda config: False):
        self.calls, self.fail = [], fail

    def __call__(self, config, directory):
        self.calls.append(directory.name)
        if self.fail(config):
            raise RuntimeError(f"boom on {config['estimator']}\nsecond line")
        atomic_write_text(directory / "results.csv", "x\n1\n")  # as the real runners do
        return {"ok": True}


def done_cells(results: Path, kind: str = "compare") -> list[Path]:
    return sorted(p.parent for p in (results / kind).glob("*/done.json"))


def cli(*args):
    return CliRunner().invoke(main, list(args))


# ----------------------------------------------------------------------------------------------------- specs
@pytest.mark.slow
def test_shipped_specs_validate_and_quick_profiles_are_small(tmp_path):
    specs = {path.stem: load_study(path) for path in sorted(STUDIES.glob("*.toml"))}
    assert set(specs) >= {"bias-variance", "switch-probe", "lm-convergence", "ablations", "cost", "translation",
                          "top2"}
    for name, study in specs.items():
        assert study.name == name and set(study.profiles) == {"quick", "full", "paper"}
        for profile in ("quick", "full", "paper"):  # every profile's cells build (and are checked) here
            assert study.cells(profile, tmp_path)
        assert study.findings.strip(), f"{name}: the committed report must open with what its numbers show"
        if study.kind == "train" and study.baseline:
            names = {c.config["name"] or c.config["estimator"] for c in study.cells("full", tmp_path)}
            assert study.baseline in names
    assert len(specs["bias-variance"].cells("quick", tmp_path)) == 12
    train = specs["lm-convergence"]
    quick = train.cells("quick", tmp_path)
    assert len(quick) == 4 and all(c.config["steps"] == 20 for c in quick)
    # the full grid (50 runs, shared with ablations) is test_rerun_specs_validate_and_share_their_runs'
    # the probe's trained models are Switch runs of gradest's defaults at n = 4 (the first lm-convergence's), each
    # one training cell shared by the probe's cells of its seed
    from gradest.study import make_cell, probe_train_config
    probes = specs["switch-probe"].cells("full", tmp_path)
    trained = [make_cell("train", probe_train_config(c.config), tmp_path)
               for c in probes if c.config["stage"] == "trained"]
    assert len({c.hash for c in trained}) == 3
    assert all((c.config["estimator"], c.config["experts"], c.config["steps"], c.config.get("preset")) ==
               ("switch", 4, 600, None) for c in trained)


CELL_STORE = STUDIES / "cells"


def test_rerun_specs_validate_and_share_their_runs(tmp_path):
    """The re-runs under the reference preset: every profile builds;
    each study has its runs under the preset (lm-convergence's and top2's beside today's defaults, `preset=none`, a
    labelled arm) and its baseline among its arms; and the cache is shared: ablations' switch and sparsemixer arms are lm-convergence's n = 8
    runs, in both setups."""
    reruns = ("lm-convergence", "ablations", "top2", "translation")
    specs = {name: load_study(STUDIES / f"{name}.toml") for name in reruns}
    for name, study in specs.items():
        assert study.name == name and set(study.profiles) == {"quick", "full", "paper"}
        for profile in ("quick", "full", "paper"):
            assert study.cells(profile, tmp_path)
        full = study.cells("full", tmp_path)
        assert {c.config.get("preset") for c in full} >= {"sparsemixer-reference"}
        assert study.baseline in {c.config["name"] or c.config["estimator"] for c in full}
    lm = specs["lm-convergence"].cells("full", tmp_path)
    assert len(lm) == 50 and all(c.config["steps"] >= 1500 for c in lm)
    assert {c.config["experts"] for c in lm} == {4, 8, 16}
    assert {c.config["name"] for c in lm if c.config.get("preset") is None} == {"switch", "sparsemixer"}
    for c in lm:  # the preset's settings are the cell's (so its hash covers them)
        assert (c.config["lr"], c.config["model"].get("post_ln", False)) == (
            (7e-4, True) if c.config.get("preset") else (2e-3, False))
    n8 = {c.hash for c in lm if c.config["experts"] == 8 and c.config["name"] in ("switch", "sparsemixer")}
    ablations = specs["ablations"].cells("full", tmp_path)
    assert len(n8) == 20 and n8 <= {c.hash for c in ablations}
    top2 = specs["top2"].cells("full", tmp_path)
    assert {c.config["hparams"].get("jitter_eps") for c in top2 if c.config.get("preset")
            and c.config["estimator"] != "topk"} == {0.01}  # PhiMoE's router_jitter_noise


@pytest.mark.slow
def test_committed_cells_are_cells_of_a_study_at_a_clean_commit():
    """Each finished cell in the committed cell store (studies/cells) is one that a spec asks for today, under
    today's hash of its configuration (a changed default would orphan it), with what a report reads from it, and
    was computed at a clean commit."""
    from gradest.study.spec import cell_hash
    wanted = {c.hash for path in sorted(STUDIES.glob("*.toml"))
              for c in load_study(path).cells("full", CELL_STORE)}
    for done in sorted(CELL_STORE.glob("*/*/done.json")):
        cell = json.loads((done.parent / "cell.json").read_text())
        assert cell["hash"] == done.parent.name == cell_hash(cell["kind"], cell["config"])
        assert cell["hash"] in wanted, f"{done.parent} is no cell of any study"
        assert (done.parent / "run" / "metrics.csv").is_file()
        git = json.loads(done.read_text())["git"]
        assert git["dirty"] is False and len(git["commit"]) == 40, f"{done.parent}: {git}"


TRAIN_REPORTS = sorted(path.stem for path in STUDIES.glob("*.toml")
                       if load_study(path).kind == "train" and (REPO / "reports" / path.stem / "report.json").is_file())


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAIN_REPORTS)
def test_committed_training_report_rebuilds_from_committed_cells(name, tmp_path, monkeypatch):
    """`gradest report` over the committed cell store (GRADEST_RESULTS=studies/cells) writes every committed
    training report again, byte for byte: its numbers (results.csv, curves.csv, summary.csv) and its README."""
    assert {"lm-convergence", "balance", "top2", "translation", "ablations"} <= set(TRAIN_REPORTS)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("GRADEST_RESULTS", str(CELL_STORE))
    result = cli("report", f"studies/{name}.toml", "--out", str(tmp_path / name))
    assert result.exit_code == 0, result.output
    for file in ("results.csv", "curves.csv", "summary.csv", "README.md"):
        assert (tmp_path / name / file).read_bytes() == (REPO / "reports" / name / file).read_bytes(), file


@pytest.mark.parametrize("text, message", [
    ("[study]\nname='x'\nkind='compare'\n[grid]\nexpertz=[2]\n", "unknown key 'expertz' in [grid]"),
    ("[study]\nname='x'\nkind='nope'\n", "unknown study kind 'nope'"),
    ("[study]\nname='x'\nkind='compare'\n[settings]\nseed=[1]\n", "lists of values go in the grid"),
    ("[study]\nname='x'\nkind='compare'\n[profiles.huge]\n", "unknown key 'huge' in [profiles]"),
])
def test_bad_specs_are_one_line_errors(text, message):
    with pytest.raises(GradestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_study(__import__("tomllib").loads(text))


def test_cli_unknown_profile_names_the_valid_ones(tmp_path):
    result = cli("study", "run", str(STUDIES / "bias-variance.toml"), "--profile", "tiny", "--results",
                 str(tmp_path))
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "unknown profile 'tiny'" in result.output and "quick, full, paper" in result.output
    bad = write_spec(tmp_path, SMALL.replace("samples = 20", "samples = 20\nbogus = 1"))
    result = cli("report", str(bad), "--results", str(tmp_path))
    assert result.exit_code == 2 and "unknown key 'bogus'" in result.output


@pytest.mark.parametrize("kind, settings, message", [
    ("compare", {"samples": "lots"}, "samples must be an integer, got 'lots'"),
    ("compare", {"samples": 2}, "samples must be >= 3 (bias and variance need them), got 2"),
    ("compare", {"experts": 0}, "experts must be an integer >= 2"),
    ("compare", {"tokens": True}, "tokens must be an integer, got True"),
    ("compare", {"sharpness": "big"}, "sharpness must be a number, got 'big'"),
    ("compare", {"estimator": "nope"}, "unknown estimator 'nope'; valid: "),
    ("compare", {"hparams": {"tau": "hot"}}, "invalid tau='hot'"),
    ("compare", {"wrt": "up"}, "unknown gradient target 'up'; valid: logits, router, all"),
    ("probe", {"samples": 2.5}, "samples must be an integer, got 2.5"),
    ("probe", {"experts": 1}, "experts must be >= 2"),
    ("probe", {"top_k": 5}, "top_k must be in 1..4, got 5"),
    ("probe", {"layer": 2}, "layer must be in 0..1 (an index into the model's MoE layers), got 2"),
    ("probe", {"reference": "guess"}, "unknown reference 'guess'; valid: auto, enumeration, rao-blackwell"),
    ("probe", {"score": "token"}, "unknown score 'token'; valid: sequence, batch"),
    ("probe", {"draws": 2}, "draws must be >= 3, got 2"),
    ("probe", {"model": {"d_model": "wide"}}, "model.d_model must be an integer, got 'wide'"),
    ("probe", {"model": {"n_layers": 2}}, "unknown key 'model.n_layers'; valid: model.vocab_size,"),
    ("probe", {"stage": "trained", "train": {"device": "gpu"}}, "a probe's train table: unknown device 'gpu'"),
    ("train", {"device": "gpu9"}, "unknown device 'gpu9'; valid: cpu, cuda, mps, cuda:N"),
    ("train", {"steps": "lots"}, "steps must be an integer, got 'lots'"),
    ("train", {"lr": "fast"}, "lr must be a number, got 'fast'"),
    ("train", {"omega": "yes"}, "omega must be true or false, got 'yes'"),
    ("train", {"warmup": -1}, "warmup=-1; valid: an integer >= 0"),
    ("train", {"model": {"n_head": 2.0}}, "n_head=2.0; valid: an integer >= 1"),
    ("train", {"estimator": "exact"}, "estimator 'exact' cannot train an MoE layer"),
])
def test_every_setting_of_every_cell_is_checked_before_any_runs(tmp_path, kind, settings, message):
    """Types and values, with the checks of the configs themselves (ProblemConfig, TrainConfig, the estimator
    specs) and the probe's options: an error names the cell and what is valid, and nothing is written."""
    study = parse_study({"study": {"name": "x", "kind": kind}, "grid": {"seed": [0, 1]}, "settings": settings})
    with pytest.raises(GradestError, match=r"^study 'x' \(profile base\), cell \[seed=0\]: .*" + re.escape(message)):
        study.cells(None, tmp_path)
    assert not any(tmp_path.iterdir())


def test_study_run_checks_every_cell_before_the_first_runs(tmp_path):
    """One bad value in the grid (the last cells) or a device this machine lacks: `study run` runs no cell and
    says so in one line, exit code 2."""
    spec = write_spec(tmp_path, SMALL.replace("samples = 20", "").replace("seed = [0, 1, 2]",
                                                                          'seed = [0, 1, 2]\nsamples = [20, "lots"]'))
    result = cli("study", "run", str(spec), "--jobs", "2", "--results", str(tmp_path / "res"))
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert result.output.startswith("error: study 'small' (profile base), cell [")
    assert 'samples="lots"' in result.output and "samples must be an integer, got 'lots'" in result.output
    gpu = write_spec(tmp_path, """
    [study]
    name = "gpu"
    kind = "train"
    [grid]
    device = ["cpu", "cuda:99"]
    """, "gpu.toml")
    result = cli("study", "run", str(gpu), "--results", str(tmp_path / "res"))
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert "device 'cuda:99' is not available on this machine; valid here: cpu" in result.output
    assert not (tmp_path / "res").exists()  # not one cell started


# ---------------------------------------------------------------------------------------------------- running
def test_quick_study_end_to_end_then_rerun_is_a_noop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = str(STUDIES / "bias-variance.toml")
    result = cli("study", "run", spec, "--profile", "quick", "--results", "res")
    assert result.exit_code == 0, result.output
    assert "12 cells, 0 already done, 12 run, 0 failed" in result.output
    cells = done_cells(tmp_path / "res")
    assert len(cells) == 12
    stamps = {p: (p / "done.json").stat().st_mtime_ns for p in cells}
    for cell in cells:
        rows = pd.read_csv(cell / "results.csv")
        assert len(rows) == 1 and rows["mse"].notna().all()
        done = json.loads((cell / "done.json").read_text())
        assert done["git"]["commit"] and done["versions"]["torch"] and done["seconds"] > 0
    result = cli("study", "run", spec, "--profile", "quick", "--results", "res")
    assert result.exit_code == 0 and "12 already done, 0 run" in result.output
    assert {p: (p / "done.json").stat().st_mtime_ns for p in cells} == stamps
    # the report of those results
    monkeypatch.setenv("GRADEST_RESULTS", "res")
    result = cli("report", spec, "--profile", "quick")
    assert result.exit_code == 0, result.output
    out = tmp_path / "reports" / "bias-variance" / "quick"  # not the committed (full) report's folder
    for name in ("README.md", "results.csv", "summary.csv", "bias_variance.png", "rel_bias.png", "report.json"):
        assert (out / name).stat().st_size > 0
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and (summary["seeds"] == 3).all()
    # `figures` renders it again from its CSVs alone, to the same bytes (tables, figures and all)
    written = {path.name: path.read_bytes() for path in out.iterdir()}
    for name in ("README.md", "summary.csv", "rel_bias.png"):
        (out / name).unlink()
    shutil.rmtree(tmp_path / "res")
    result = cli("figures", "--reports", "reports/bias-variance")
    assert result.exit_code == 0 and "regenerated reports/bias-variance/quick" in result.output
    assert {path.name: path.read_bytes() for path in out.iterdir()} == written


@pytest.mark.slow
def test_jobs_and_shards_split_the_cells(tmp_path):
    study = load_study(write_spec(tmp_path))
    cells = study.cells(None, tmp_path / "res")
    assert len(cells) == 6
    runners = [Counter() for _ in range(3)]
    for i, runner in enumerate(runners):
        run_study(study, results=tmp_path / "res", shard_spec=f"{i}/3", runner=runner, progress=False)
    calls = [name for runner in runners for name in runner.calls]
    assert sorted(calls) == sorted(c.hash for c in cells)  # disjoint shards covering every cell once
    assert [len(r.calls) for r in runners] == [2, 2, 2]
    with pytest.raises(GradestError, match="--shard"):
        run_study(study, results=tmp_path / "res", shard_spec="3/3")
    # a process pool runs the real cells (one torch thread each)
    summary = run_study(study, results=tmp_path / "pool", jobs=2, progress=False)
    assert len(summary.done) == 6 and not summary.failed
    assert len(done_cells(tmp_path / "pool")) == 6


def test_changing_one_setting_reruns_only_the_affected_cells(tmp_path):
    spec = write_spec(tmp_path)
    first = Counter()
    run_study(load_study(spec), results=tmp_path, runner=first, progress=False)
    assert len(first.calls) == 6
    spec.write_text(SMALL.replace("st:tau=0.5", "st:tau=0.7"))
    second = Counter()
    run_study(load_study(spec), results=tmp_path, runner=second, progress=False)
    study = load_study(spec)
    st_cells = {c.hash for c in study.cells(None, tmp_path) if c.config["estimator"] == "st:tau=0.7"}
    assert sorted(second.calls) == sorted(st_cells) and len(st_cells) == 3
    # the old tau=0.5 cells are left alone; a third run does nothing
    assert len(list((tmp_path / "compare").glob("*/done.json"))) == 9
    third = Counter()
    run_study(study, results=tmp_path, runner=third, progress=False)
    assert third.calls == []


def test_a_failing_cell_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    study = load_study(write_spec(tmp_path))
    broken = Counter(fail=lambda config: config["estimator"] == "switch" and config["seed"] == 1)
    summary = run_study(study, results=tmp_path, runner=broken, progress=False)
    assert len(broken.calls) == 6 and len(summary.done) == 5 and len(summary.failed) == 1
    ((digest, message),) = summary.failed
    assert message == "RuntimeError: boom on switch second line"
    error = json.loads((tmp_path / "compare" / digest / "error.json").read_text())
    assert error["error"] == message and "Traceback" in error["traceback"]
    assert not (tmp_path / "compare" / digest / "done.json").exists()
    fixed = Counter()
    summary = run_study(study, results=tmp_path, runner=fixed, progress=False)
    assert fixed.calls == [digest] and summary.skipped == 5
    assert (tmp_path / "compare" / digest / "done.json").exists()
    assert not (tmp_path / "compare" / digest / "error.json").exists()
    # from the CLI, a real failure (a bad hyper-parameter value at run time) is exit 1 after the other cells
    import dataclasses

    import gradest.study as study_module
    real = study_module.CELL_KINDS["compare"]

    def flaky(config, directory):
        if config["seed"] == 2:
            raise ValueError("no luck")
        return real.run(config, directory)

    monkeypatch.setitem(study_module.CELL_KINDS, "compare", dataclasses.replace(real, run=flaky))
    result = cli("study", "run", str(write_spec(tmp_path)), "--results", str(tmp_path / "cli"))
    assert result.exit_code == 1
    assert "2 failed" in result.output and "ValueError: no luck" in result.output
    assert len(done_cells(tmp_path / "cli")) == 4
    # `gradest study status`: the counts in all and per arm, and each failure's error
    result = cli("study", "status", str(write_spec(tmp_path)), "--results", str(tmp_path / "cli"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "study small (profile base): 4 of 6 cells done, 2 failed, 0 to run"
    assert sorted(line.split() for line in lines[3:5]) == [["st:tau=0.5", "2", "1", "0"], ["switch", "2", "1", "0"]]
    assert [line.split(": ", 1)[1] for line in lines[5:]] == ["ValueError: no luck"] * 2
    result = cli("study", "status", str(write_spec(tmp_path)), "--results", str(tmp_path / "none"))
    assert result.output.splitlines()[0] == "study small (profile base): 0 of 6 cells done, 0 failed, 6 to run"


KILLABLE = """
import os, sys, time
from pathlib import Path
from gradest.io import atomic_write
from gradest.study import load_study, run_study
spec, results, log, mode = sys.argv[1:5]
action, stop_cell, stop_point = (mode.split(":") + ["0", ""])[:3]  # e.g. 'hang:3:writing'; 'run' stops nowhere


def point(where, started):
    # the point `where` of the `started`-th cell: 'exit' dies there, 'hang' says so in LOG.ready and waits there
    # (to be killed)
    if where == stop_point and started == int(stop_cell):
        if action == "exit":
            os._exit(1)
        Path(log + ".ready").write_text(where)
        time.sleep(120)


def runner(config, directory):
    with open(log, "a") as f:
        f.write(f"start {directory.name}\\n")
    started = sum(1 for line in open(log) if line.startswith("start"))
    point("start", started)

    def write(handle):  # atomically, as the real runners write their outputs
        handle.write(b"x\\n")
        handle.flush()
        point("writing", started)  # half of the file is written, under a temporary name
        handle.write(b"1\\n")

    atomic_write(directory / "results.csv", write)
    point("written", started)  # the outputs are written, done.json is not
    with open(log, "a") as f:
        f.write(f"end {directory.name}\\n")
    return {"ok": 1}


run_study(load_study(spec), results=results, runner=runner, progress=False)
"""


def _script(tmp_path, mode) -> list[str]:
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    return [sys.executable, str(script), str(tmp_path / "small.toml"), str(tmp_path / "res"), str(tmp_path / "log"),
            mode]


def _events(tmp_path, event) -> list[str]:
    return [line.split()[1] for line in (tmp_path / "log").read_text().splitlines() if line.startswith(event)]


def _check_intact(results: Path):
    for path in results.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".csv":
                pd.read_csv(path)


@pytest.mark.slow
def test_a_killed_study_resumes_with_every_cell_exactly_once(tmp_path):
    write_spec(tmp_path)
    assert subprocess.run(_script(tmp_path, "exit:4:written"), timeout=60).returncode == 1
    assert len(_events(tmp_path, "end")) == 3
    assert len(done_cells(tmp_path / "res")) == 3
    assert subprocess.run(_script(tmp_path, "run"), timeout=60).returncode == 0
    ends, starts = _events(tmp_path, "end"), _events(tmp_path, "start")
    assert len(ends) == 6 and len(set(ends)) == 6  # every cell finished exactly once
    killed = [d for d in set(starts) if starts.count(d) == 2]
    assert len(killed) == 1 and len(starts) == 7  # only the interrupted cell was started again
    assert len(done_cells(tmp_path / "res")) == 6
    _check_intact(tmp_path / "res")


@pytest.mark.slow
@pytest.mark.parametrize("cell, point", [(1, "start"), (3, "writing"), (6, "written")])
def test_sigkill_at_any_point_of_a_cell_leaves_finished_cells_intact(tmp_path, cell, point):
    """SIGKILL at a chosen point of a chosen cell (the runner says it is there, then waits to be killed): the
    cells before it are finished and intact, that one is not finished (whatever it had written), and the next run
    redoes it, and only it and the cells after it, cleanly."""
    write_spec(tmp_path)
    results = tmp_path / "res"
    process = subprocess.Popen(_script(tmp_path, f"hang:{cell}:{point}"))
    ready = tmp_path / "log.ready"
    try:
        deadline = time.time() + 60
        while not ready.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert ready.read_text() == point
    finally:
        process.kill()
        process.wait()
    study = load_study(tmp_path / "small.toml")
    cells = study.cells(None, results)  # the order they run in
    done, failed, missing = finished(study, None, results)
    assert [c.hash for c in done] == [c.hash for c in cells[:cell - 1]] and not failed
    killed = cells[cell - 1]
    assert not killed.done and killed.hash in [c.hash for c in missing]
    if point == "writing":  # the half-written file is only a hidden temporary: no results.csv to misread
        assert not (killed.directory / "results.csv").exists()
        assert [p.name.startswith(".results.csv.") for p in killed.directory.glob("*.tmp")] == [True]
    _check_intact(results)
    before = {c.hash: (c.directory / "done.json").read_bytes() for c in done}
    assert subprocess.run(_script(tmp_path, "run"), timeout=60).returncode == 0
    assert _events(tmp_path, "start") == [c.hash for c in cells[:cell]] + [c.hash for c in cells[cell - 1:]]
    assert sorted(_events(tmp_path, "end")) == sorted(c.hash for c in cells)  # each cell finished once
    assert all(c.done for c in cells)
    assert {h: (results / "compare" / h / "done.json").read_bytes() for h in before} == before  # not rerun
    assert (killed.directory / "results.csv").read_text() == "x\n1\n"
    _check_intact(results)


# --------------------------------------------------------------------------------------------- parallel workers
SLOW = """
[study]
name = "slow"
kind = "train"
[grid]
seed = [0, 1, 2]
[settings]
estimator = "switch"
steps = 100000
batch_size = 4
block_size = 32
model = { n_layer = 2, n_head = 2, d_model = 32, d_ff = 64 }
"""  # runs far longer than the tests wait


def _children(pid: int) -> set[int]:
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == pid:
            children.add(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited (whoever is to reap it)


@pytest.fixture
def parallel_study(tmp_path):
    """`gradest study run --jobs 2` of SLOW, whose first cell is already finished, once both workers are running a
    cell: (process, first cell, the PIDs of the process's children: the two workers and multiprocessing's resource
    tracker). Whatever is left of them is killed afterwards."""
    from gradest.study import execute
    spec = write_spec(tmp_path, SLOW, "slow.toml")
    first = load_study(spec).cells(None, tmp_path / "res")[0]
    assert execute(first, Counter()) == ("done", "")
    with open(tmp_path / "stderr", "w") as stderr:
        # SIGINT at its default in the study, as on a terminal: a test run started in the background (`cmd &`)
        # inherits it ignored, and Python would then never raise KeyboardInterrupt
        process = subprocess.Popen([sys.executable, "-m", "gradest.cli", "study", "run", str(spec), "--jobs", "2",
                                    "--results", str(tmp_path / "res")], stdout=subprocess.DEVNULL, stderr=stderr,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    children = set()
    try:
        deadline = time.time() + 60
        while len(list((tmp_path / "res" / "train").glob("*/cell.json"))) < 3 and process.poll() is None \
                and time.time() < deadline:
            time.sleep(0.05)
        children = _children(process.pid)
        assert process.poll() is None and len(children) >= 2, (tmp_path / "stderr").read_text()
        yield process, first, children
    finally:
        for pid in [process.pid, *children]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def _gone(pids, seconds=5.0) -> bool:
    deadline = time.time() + seconds
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    return not any(_alive(pid) for pid in pids)


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")


@pytest.mark.slow
@LINUX
def test_workers_die_with_a_killed_study(parallel_study):
    """SIGKILL of `study run --jobs 2` (no chance to clean up): its workers and the resource tracker go with it,
    rather than run the queued cells and then wait forever."""
    process, _, children = parallel_study
    process.kill()
    process.wait()
    assert _gone(children), [pid for pid in children if _alive(pid)]


@pytest.mark.slow
@LINUX
def test_ctrl_c_stops_the_workers_and_keeps_the_finished_cells(parallel_study, tmp_path):
    """SIGINT (Ctrl-C) while both workers are in long cells: "error: aborted" and exit code 1 at once, without
    waiting for those cells; the workers are stopped, the finished cell is intact and the interrupted ones are
    neither finished nor failed (the next run redoes them)."""
    process, first, children = parallel_study
    finished_before = (first.directory / "done.json").read_bytes()
    process.send_signal(signal.SIGINT)
    # SLOW's cells run for minutes: an exit within 60 s did not wait for them (10 s was too tight on a loaded CI box)
    assert process.wait(timeout=60) == 1, (tmp_path / "stderr").read_text()
    assert "error: aborted" in (tmp_path / "stderr").read_text().splitlines()
    assert _gone(children), [pid for pid in children if _alive(pid)]
    done, failed, missing = finished(load_study(tmp_path / "slow.toml"), None, tmp_path / "res")
    assert [cell.hash for cell in done] == [first.hash] and not failed and len(missing) == 2
    assert (first.directory / "done.json").read_bytes() == finished_before
    assert all((cell.directory / "cell.json").is_file() for cell in missing)  # they had started
    _check_intact(tmp_path / "res")


# --------------------------------------------------------------------------------------------------- training
def table_columns(readme: str) -> set[str]:
    """The column names of a train report's tables."""
    return {name.strip() for line in readme.splitlines() if line.startswith("| run ") for name in line.split("|")}


@pytest.mark.slow
def test_train_study_resumes_a_killed_run_from_its_checkpoint(tmp_path, capsys):
    from gradest.study import train_fields
    from gradest.train import Trainer, TrainConfig
    study = load_study(STUDIES / "lm-convergence.toml")
    study.profiles["quick"]["grid"]["variant"] = study.profiles["quick"]["grid"]["variant"][:1]
    (cell,) = study.cells("quick", tmp_path)
    # an attempt killed after step 10 (checkpoint saved there)
    Trainer(TrainConfig(**train_fields(cell.config)), cell.directory / "run").run(until=10)
    capsys.readouterr()
    summary = run_study(study, "quick", results=tmp_path, progress=False)
    assert summary.done == [cell.hash]
    # a captured log (no progress bar off a terminal) has a line per evaluation of the resumed run and per cell
    log = capsys.readouterr().out.splitlines()
    assert [line.split(": train loss")[0] for line in log[:-1]] == [f"cell {cell.hash} (switch, seed 0) step 20/20"]
    assert log[-1] == f"[1/1] cell {cell.hash} done"
    metrics = pd.read_csv(cell.directory / "run" / "metrics.csv")
    assert metrics["step"].tolist() == list(range(1, 21))
    assert metrics["val_loss"].notna().sum() == 2
    out = write_report(study, "quick", tmp_path, tmp_path / "report")
    text = (out / "README.md").read_text()
    assert "| switch " in text and (out / "val_loss.png").stat().st_size > 0
    assert pd.read_csv(out / "curves.csv")["step"].tolist() == [10, 20]
    # the run's routing at the end of training, from its metrics.csv
    assert pd.read_csv(out / "results.csv")[["argmax_fraction", "router_entropy", "max_load"]].notna().all().all()
    assert {"argmax fraction", "router entropy", "max load"} <= table_columns(text)


# ----------------------------------------------------------------------------------------------------- report
def test_report_on_a_fixed_fixture(tmp_path):
    """Hand-written cells with known numbers: the table holds their means ± 95% t half-widths; relative bias is
    the square root of the mean noise-corrected B^2/||g*||^2 over seeds and of its interval (an interval that
    reaches below 0 gives a lower bound of 0, as an unbiased estimator's should)."""
    study = load_study(write_spec(tmp_path))
    values = {"switch": [1.0, 2.0, 3.0], "st(tau=0.5)": [0.25, 0.25, 0.25]}  # B^2 / ||g*||^2 of each seed
    for cell in study.cells(None, tmp_path / "res"):
        label = "switch" if cell.config["estimator"] == "switch" else "st(tau=0.5)"
        seed = cell.config["seed"]
        row = {"problem": "moe-regression", "estimator": label, "target": "exact(k=1)", "wrt": "router",
               "samples": 20, "experts": 3, "tokens": 4, "dim": 8, "out_dim": 4, "classes": 4, "top_k": 1,
               "sharpness": 1.0, "power": 2.0, "center": 0.45, "seed": seed,
               "rel_bias": values[label][seed] ** 0.5, "rel_bias_lo": 0.0, "rel_bias_hi": 9.0,
               "bias_sq": 4 * values[label][seed], "ref_norm": 2.0,
               "variance": 10.0 * (seed + 1), "mse": 2.0, "cos_mean": 0.5, "cos_of_mean": 0.9,
               "sec_per_sample": 1e-3}
        cell.directory.mkdir(parents=True)
        pd.DataFrame([row]).to_csv(cell.directory / "results.csv", index=False)
        (cell.directory / "done.json").write_text(json.dumps({"git": {"commit": "abc123", "dirty": False}}))
    out = write_report(study, None, tmp_path / "res", tmp_path / "out")
    summary = pd.read_csv(out / "summary.csv").set_index("estimator")
    # t(0.975, 2) = 4.3027; sd of 1,2,3 is 1: half-width 4.3027 / sqrt(3) = 2.484
    assert summary.loc["switch", "rel_bias_sq"] == pytest.approx(2.0)
    assert summary.loc["switch", "rel_bias"] == pytest.approx(2.0 ** 0.5)
    assert summary.loc["switch", "rel_bias_hi"] == pytest.approx((2.0 + 2.4841) ** 0.5, abs=1e-3)
    assert summary.loc["switch", "rel_bias_lo"] == 0  # 2 - 2.484 < 0
    assert summary.loc["st(tau=0.5)", "rel_bias_lo"] == pytest.approx(0.5)
    assert summary.loc["switch", "variance"] == pytest.approx(20.0)
    text = (out / "README.md").read_text()
    assert "| 1.414 ± 1.1 " in text and "| 20 ± 25 " in text and "| 0.5 ± 0 " in text
    assert "Lowest mean relative bias: st(tau=0.5) in 1 of 1 configuration" in text
    assert "6 of 6 cells finished" in text and "abc123" in text
    assert len(pd.read_csv(out / "results.csv")) == 6
    for name in ("bias_variance.png", "rel_bias.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `figures` renders it again from its results.csv, without the cells
    (out / "README.md").unlink()
    shutil.rmtree(tmp_path / "res")
    written, skipped = regenerate(tmp_path)
    assert written == [out] and not skipped and (out / "README.md").read_text() == text


PROFILED = SMALL + """
[profiles.full]
description = "every seed"

[profiles.quick]
grid = { seed = [0] }
"""


@pytest.mark.slow
def test_a_report_of_another_profile_never_overwrites_the_committed_one(tmp_path, monkeypatch):
    """The committed report (reports/<study>/) is the full profile's; a quick report goes to
    reports/<study>/quick/ (or --out), and `figures` renders each in place, from its own profile's CSVs."""
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, PROFILED)
    study = load_study("small.toml")
    for profile in ("full", "quick"):
        assert not run_study(study, profile, results="res", progress=False).failed
    assert cli("report", "small.toml", "--results", "res").exit_code == 0
    committed = Path("reports/small")

    def files():
        return {path.name: path.read_bytes() for path in committed.iterdir() if path.is_file()}

    before = files()
    assert {"README.md", "bias_variance.png", "rel_bias.png", "summary.csv", "report.json"} <= set(before)
    result = cli("report", "small.toml", "--profile", "quick", "--results", "res")
    assert result.exit_code == 0 and "report written to reports/small/quick/README.md" in result.output
    assert files() == before  # figures and all
    quick = committed / "quick"
    assert json.loads((quick / "report.json").read_text())["profile"] == "quick"
    assert (pd.read_csv(quick / "summary.csv")["seeds"] == 1).all()
    assert (pd.read_csv(committed / "summary.csv")["seeds"] == 3).all()
    result = cli("report", "small.toml", "--profile", "quick", "--results", "res", "--out", "elsewhere")
    assert result.exit_code == 0 and (tmp_path / "elsewhere" / "README.md").is_file()
    # `figures` rebuilds both reports under reports/ where they are, each from its profile, and nothing else
    (committed / "README.md").unlink()
    quick_readme = (quick / "README.md").read_bytes()
    elsewhere = (tmp_path / "elsewhere" / "README.md").stat().st_mtime_ns
    result = cli("figures")
    assert result.exit_code == 0 and result.output.splitlines() == ["regenerated reports/small/README.md",
                                                                    "regenerated reports/small/quick/README.md"]
    assert (committed / "README.md").read_bytes() == before["README.md"]
    assert (quick / "README.md").read_bytes() == quick_readme
    assert (tmp_path / "elsewhere" / "README.md").stat().st_mtime_ns == elsewhere


@pytest.mark.slow
def test_figures_rebuilds_every_committed_report_from_its_csvs(tmp_path, monkeypatch):
    """On a clean clone (no results cache), `gradest figures` renders every committed report from the data beside
    it (report.json, results.csv, curves.csv) and its spec: every file it writes (README.md, summary.csv, the
    figures) is byte for byte the committed one."""
    shutil.copytree(REPO / "reports", tmp_path / "reports")
    shutil.copytree(STUDIES, tmp_path / "studies")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRADEST_RESULTS", str(tmp_path / "no-results"))

    def files():
        return {path.relative_to(tmp_path / "reports"): path.read_bytes()
                for path in sorted((tmp_path / "reports").rglob("*")) if path.is_file()}

    committed = files()
    reports = sorted(path.parent for path in (tmp_path / "reports").glob("*/report.json"))
    assert len(reports) >= 7
    for report in reports:  # only the data stays
        for path in report.iterdir():
            if path.name not in ("report.json", "results.csv", "curves.csv"):
                path.unlink()
    result = cli("figures")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"regenerated {report.relative_to(tmp_path).as_posix()}/README.md"
                                          for report in reports]
    rebuilt = files()
    assert sorted(rebuilt) == sorted(committed)
    assert [name for name in committed if rebuilt[name] != committed[name]] == []
    assert not (tmp_path / "no-results").exists() and not (tmp_path / "results").exists()


def test_figures_skips_a_report_without_its_data(tmp_path, monkeypatch):
    """A report whose CSVs are gone, or whose report.json an older gradest wrote, is skipped with one line; the
    others are rendered."""
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, PROFILED)
    assert not run_study(load_study("small.toml"), "quick", results="res", progress=False).failed
    for name in ("one", "two", "three"):
        assert cli("report", "small.toml", "--profile", "quick", "--results", "res",
                   "--out", f"reports/{name}").exit_code == 0
    Path("reports/two/results.csv").unlink()
    meta = json.loads(Path("reports/three/report.json").read_text())
    del meta["commits"]
    Path("reports/three/report.json").write_text(json.dumps(meta))
    result = cli("figures")
    assert result.exit_code == 1, result.output  # the others rendered; the skipped ones named, and an error
    assert result.output.splitlines()[:-1] == [
        "regenerated reports/one/README.md",
        "skipped reports/three: reports/three/report.json has no commits or failed cells (an older gradest wrote "
        "it); write the report again with `gradest report small.toml`",
        "skipped reports/two: reports/two/results.csv is missing (`gradest report SPEC` writes it from the results "
        "cache)"]


# ------------------------------------------------------------------------------------------- the shared cache
def test_a_variant_name_is_a_label_not_part_of_the_cell(tmp_path):
    """Two studies that run the same configuration under different names share one cell; each report keeps its
    own label."""
    text = """
    [study]
    name = "{name}"
    kind = "compare"
    [grid]
    variant = [{{ name = "{label}", estimator = "switch" }}]
    seed = [0]
    [settings]
    problem = "moe-regression"
    experts = 3
    tokens = 4
    samples = 20
    """
    one = load_study(write_spec(tmp_path, text.format(name="one", label="plain switch"), "one.toml"))
    two = load_study(write_spec(tmp_path, text.format(name="two", label="baseline"), "two.toml"))
    (a,), (b,) = one.cells(None, tmp_path), two.cells(None, tmp_path)
    assert a.hash == b.hash and a.directory == b.directory == tmp_path / "compare" / a.hash
    assert run_study(one, results=tmp_path, progress=False).done == [a.hash]
    second = Counter()
    assert run_study(two, results=tmp_path, runner=second, progress=False).skipped == 1 and not second.calls


def test_a_cell_finished_by_another_process_meanwhile_is_not_run_again(tmp_path):
    """The lock in `execute`: whoever gets the cell second finds it done (a probe's training run wanted by several
    probe cells, or shards sharing a disk)."""
    from gradest.study import execute
    study = load_study(write_spec(tmp_path))
    cell = study.cells(None, tmp_path)[0]
    first = Counter()
    assert execute(cell, first) == ("done", "") and len(first.calls) == 1
    second = Counter()
    assert execute(cell, second) == ("done", "") and second.calls == []


def test_probe_study_trains_its_model_once_and_probes_it_at_init_and_after(tmp_path):
    """The quick switch-probe profile (two estimators): the training run its `trained` stage needs is one `train`
    cell, computed once, which a training study with the same settings then finds done."""
    study = load_study(STUDIES / "switch-probe.toml")
    study.profiles["quick"]["grid"]["estimator"] = ["switch", "sparsemixer"]
    summary = run_study(study, "quick", results=tmp_path, progress=False)
    assert len(summary.done) == 4 and not summary.failed
    (trained,) = done_cells(tmp_path, "train")
    assert (trained / "run" / "checkpoint.pt").is_file()
    rows = pd.concat(pd.read_csv(p / "results.csv") for p in done_cells(tmp_path, "probe"))
    assert sorted(rows["stage"]) == ["init", "init", "trained", "trained"]
    assert rows["rel_bias"].notna().all() and (rows["reference"] != "").all()
    # the model at init is the training run's model at step 0, not the trained one: the router logits differ
    sharpness = rows.groupby("stage")["sharpness"].first()
    assert sharpness["init"] != sharpness["trained"]
    assert run_study(study, "quick", results=tmp_path, progress=False).skipped == 4
    # the same run asked for by a training study is the cached cell
    probe_config = study.cells("quick", tmp_path)[0].config
    train_spec = f"""
    [study]
    name = "t"
    kind = "train"
    [settings]
    task = "lm"
    experts = {probe_config["experts"]}
    top_k = 1
    seed = 0
    model = {{ n_layer = 2, n_head = 2, d_model = 32, d_ff = 64 }}
    estimator = "switch"
    steps = 10
    warmup = 2
    batch_size = 4
    block_size = 32
    eval_interval = 5
    eval_batches = 1
    checkpoint_interval = 5
    """
    again = run_study(load_study(write_spec(tmp_path, train_spec, "t.toml")), results=tmp_path, progress=False)
    assert again.skipped == 1 and again.done == []


def test_a_trained_probe_needs_its_training_run(tmp_path):
    text = """
    [study]
    name = "p"
    kind = "probe"
    [settings]
    stage = "{stage}"
    train = {train}
    """
    with pytest.raises(GradestError, match="stage 'trained' needs a train table"):
        load_study(write_spec(tmp_path, text.format(stage="trained", train="{}"))).cells(None, tmp_path)
    with pytest.raises(GradestError, match="unknown probe stage 'later'; valid: init, trained"):
        load_study(write_spec(tmp_path, text.format(stage="later", train="{}"))).cells(None, tmp_path)
    with pytest.raises(GradestError, match="a probe's train table: unknown key 'stepz'; valid: task, estimator"):
        load_study(write_spec(tmp_path, text.format(stage="trained", train="{ stepz = 3 }"))).cells(None, tmp_path)


# ------------------------------------------------------------------------------------ training study reports
def test_steps_to_a_loss_interpolates_between_evaluations():
    from gradest.study import steps_to
    curve = pd.DataFrame({"step": [100, 200, 300], "val_loss": [3.0, 2.0, 1.5]})
    assert steps_to(curve, 2.5) == pytest.approx(150.0)
    assert steps_to(curve, 2.0) == pytest.approx(200.0)
    assert steps_to(curve, 1.6) == pytest.approx(280.0)
    assert steps_to(curve, 3.5) == 100.0  # already there at the first evaluation
    assert steps_to(curve, 1.0) == float("inf")


def finish_train_cell(cell, metrics: pd.DataFrame, seconds: float = 10.0, flops: float = 1e9):
    """A train cell finished as a run would leave it (its metrics.csv, then done.json), at a clean commit."""
    (cell.directory / "run").mkdir(parents=True)
    metrics.to_csv(cell.directory / "run" / "metrics.csv", index=False)
    (cell.directory / "done.json").write_text(json.dumps({
        "seconds": seconds, "summary": {"flops_per_update": flops}, "git": {"commit": "abc123", "dirty": False}}))


def test_train_report_ratios_against_the_baseline_on_a_fixed_fixture(tmp_path):
    """Hand-written runs: per seed, `fast` reaches the baseline's final loss at 3/4 of its steps, `slow` never
    does (the baseline reaches slow's final loss at half its steps); time and FLOPs ratios are per seed, then
    averaged with their t-intervals."""
    spec = write_spec(tmp_path, """
    [study]
    name = "fixture"
    kind = "train"
    baseline = "base"
    [grid]
    variant = [{ name = "base", estimator = "switch" }, { name = "fast", estimator = "sparsemixer" },
               { name = "slow", estimator = "first-order" }]
    seed = [0, 1, 2]
    [settings]
    steps = 400
    [study.findings]
    """.replace("[study.findings]\n", ""), "fixture.toml")
    study = load_study(spec)
    curves = {"base": [3.0, 2.5, 2.2, 2.0], "fast": [2.8, 2.2, 2.0, 1.9], "slow": [3.2, 2.8, 2.5, 2.25]}
    seconds = {"base": 40.0, "fast": 44.0, "slow": 36.0}
    flops = {"base": 1e9, "fast": 1e9, "slow": 3e9}
    for cell in study.cells(None, tmp_path / "res"):
        name, seed = cell.config["name"], cell.config["seed"]
        shift = 0.01 * seed
        metrics = pd.DataFrame({"step": [100, 200, 300, 400],
                                "val_loss": [v + shift for v in curves[name]],
                                "train_loss": [v + shift for v in curves[name]],
                                "seconds": [seconds[name] * (1 + 0.1 * seed) * s / 400 for s in (100, 200, 300, 400)]})
        finish_train_cell(cell, metrics, seconds[name] + 5, flops[name])
    out = write_report(study, None, tmp_path / "res", tmp_path / "out")
    summary = pd.read_csv(out / "summary.csv").set_index("label")
    assert summary.loc["fast", "val_loss_diff"] == pytest.approx(-0.1)  # 1.9 - 2.0, paired by seed
    assert summary.loc["fast", "time_ratio"] == pytest.approx(1.1)
    assert summary.loc["slow", "time_ratio"] == pytest.approx(0.9)
    assert summary.loc["slow", "flops_ratio"] == pytest.approx(3.0)
    assert summary.loc["fast", "steps_ratio"] == "0.75 ± 0"  # 2.0 is reached at step 300 of 400, every seed
    assert summary.loc["slow", "steps_ratio"] == "not reached in 3 of 3 seeds"
    # the baseline reaches slow's final 2.25 halfway between its steps 200 (2.5) and 300 (2.2): 283.3 / 400
    assert summary.loc["slow", "baseline_steps_ratio"] == f"{(200 + 100 * 0.25 / 0.3) / 400:.4g} ± 0"
    assert summary.loc["fast", "steps_ratio_mean_curves"] == pytest.approx(0.75)
    text = (out / "README.md").read_text()
    assert "| fast " in text and "not reached in 3 of 3 seeds" in text and "| 3 ± 0 " in text
    for name in ("val_loss.png", "ratios.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_report_groups_by_a_model_setting_with_the_routing_at_the_end(tmp_path):
    """`group_by = ["model.balance_coef"]`: the runs are grouped by that setting (a run that leaves it out has the
    model's default, 0.01) and paired with the baseline within their group. Each run's argmax fraction, router
    entropy and max load are its means over the last 10% of its steps (its last logged value when none is logged
    there), averaged over seeds; a dense run has none. `figures` renders the same report from its CSVs."""
    spec = write_spec(tmp_path, """
    [study]
    name = "balance-fixture"
    kind = "train"
    baseline = "switch"
    group_by = ["model.balance_coef"]
    [grid]
    variant = [{ name = "switch", estimator = "switch", model = { balance_coef = 0.0 } },
               { name = "sparsemixer", estimator = "sparsemixer", model = { balance_coef = 0.0 } },
               { name = "switch", estimator = "switch" },
               { name = "sparsemixer", estimator = "sparsemixer" },
               { name = "dense", estimator = "switch", model = { moe_every = 0 } }]
    seed = [0, 1]
    [settings]
    steps = 20
    """, "balance.toml")
    study = load_study(spec)
    for cell in study.cells(None, tmp_path / "res"):
        name, seed = cell.config["name"], cell.config["seed"]
        balance = cell.config.get("model", {}).get("balance_coef", 0.01)
        final = 2.0 + 0.1 * (name == "sparsemixer") + 0.05 * (balance == 0.0) + 0.01 * seed
        steps = list(range(1, 21))
        metrics = pd.DataFrame({"step": steps, "train_loss": [3.0] * 20,
                                "val_loss": [final + 0.5 if s == 10 else final if s == 20 else None for s in steps],
                                "seconds": [0.5 * s for s in steps]})
        if name != "dense":  # a dense model has no router
            metrics["argmax_fraction"] = [s / 100 + 0.1 * seed for s in steps]  # steps 19 and 20: 0.195 + 0.1 seed
            metrics["router_entropy"] = [s / 10 if s in (5, 10, 15) else None for s in steps]  # last logged: 1.5
            metrics["max_load"] = 1.25
        finish_train_cell(cell, metrics)
    out = write_report(study, None, tmp_path / "res", tmp_path / "out")
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["model.balance_coef"].unique()) == [0.0, 0.01]
    assert len(results) == 10 and (results[results["label"] == "dense"]["model.balance_coef"] == 0.01).all()
    summary = pd.read_csv(out / "summary.csv").set_index(["model.balance_coef", "label"])
    for balance in (0.0, 0.01):
        assert summary.loc[(balance, "sparsemixer"), "val_loss_diff"] == pytest.approx(0.1)  # paired in its group
        assert summary.loc[(balance, "sparsemixer"), "argmax_fraction"] == pytest.approx(0.245)
        assert summary.loc[(balance, "switch"), "router_entropy"] == pytest.approx(1.5)
        assert summary.loc[(balance, "switch"), "max_load"] == pytest.approx(1.25)
    assert pd.isna(summary.loc[(0.01, "dense"), "argmax_fraction"])
    text = (out / "README.md").read_text()
    assert "### model.balance_coef=0.0\n" in text and "### model.balance_coef=0.01\n" in text
    assert {"argmax fraction", "router entropy", "max load"} <= table_columns(text)
    assert "| 0.245 ± 0.64 " in text  # seeds 0.195 and 0.295: half-width t(0.975, 1) x 0.0707 / sqrt(2)
    dense = next(line for line in text.splitlines() if line.startswith("| dense "))
    assert dense.count("| -") == 3  # no routing
    written = {path.name: path.read_bytes() for path in out.iterdir()}
    shutil.rmtree(tmp_path / "res")
    assert regenerate(tmp_path) == ([out], [])
    assert {path.name: path.read_bytes() for path in out.iterdir()} == written


@pytest.mark.slow
def test_cost_and_top2_quick_profiles_run_and_report(tmp_path):
    """The cost study's FLOPs ratios against Switch come out of its cells (a dense-routing reinmax runs every
    expert, the dense baseline has no router), and a top-2 study trains and reports."""
    cost = load_study(STUDIES / "cost.toml")
    assert not run_study(cost, "quick", results=tmp_path, progress=False).failed
    summary = pd.read_csv(write_report(cost, "quick", tmp_path, tmp_path / "cost") / "summary.csv").set_index("label")
    assert summary.loc["switch", "flops_ratio"] == 1
    assert summary.loc["reinmax", "flops_ratio"] > 1.1 and summary.loc["sparsemixer", "flops_ratio"] == 1
    assert summary.loc["dense", "flops_ratio"] < 1
    assert (tmp_path / "cost" / "ratios.png").is_file()
    top2 = load_study(STUDIES / "top2.toml")
    assert not run_study(top2, "quick", results=tmp_path, progress=False).failed
    text = (write_report(top2, "quick", tmp_path, tmp_path / "top2") / "README.md").read_text()
    assert "| sparsemixer-v2* " in text and "| topk " in text


def test_optional_run_settings_reach_the_run_and_leave_other_hashes_alone(tmp_path):
    """schedule, adam_beta2 and label_smoothing (the reference setup's) may be set by a train study; a cell that
    sets one to its default is the same cell (same hash) as one that does not, and a cell's config passes them to
    its TrainConfig."""
    from gradest.study import train_fields
    from gradest.train import TrainConfig
    base = """
    [study]
    name = "optional"
    kind = "train"
    description = "optional run settings"
    [grid]
    seed = [0]
    [settings]
    steps = 5
    """
    plain = load_study(write_spec(tmp_path, base, "plain.toml")).cells(None, tmp_path / "res")[0]
    same = load_study(write_spec(tmp_path, base + '    schedule = "cosine"\n    label_smoothing = 0.0\n',
                                 "same.toml")).cells(None, tmp_path / "res")[0]
    other = load_study(write_spec(tmp_path, base + '    schedule = "inverse-sqrt"\n    adam_beta2 = 0.98\n',
                                  "other.toml")).cells(None, tmp_path / "res")[0]
    assert plain.hash == same.hash != other.hash and "schedule" not in plain.config
    config = TrainConfig(**train_fields(other.config))
    assert (config.schedule, config.adam_beta2) == ("inverse-sqrt", 0.98)


def test_a_preset_fills_what_a_train_spec_does_not_give(tmp_path):
    """`preset = "sparsemixer-reference"` in a train study: the cell holds the preset's settings (so its hash covers
    the run it will be) under the ones the spec gives."""
    spec = write_spec(tmp_path, """
    [study]
    name = "preset"
    kind = "train"
    description = "a preset"
    [grid]
    estimator = ["switch"]
    [settings]
    steps = 5
    preset = "sparsemixer-reference"
    model = { post_ln = false }
    """, "preset.toml")
    (cell,) = load_study(spec).cells(None, tmp_path / "res")
    config = cell.config
    assert config["preset"] == "sparsemixer-reference" and config["schedule"] == "inverse-sqrt"
    assert config["hparams"] == {"jitter_eps": 0.1} and config["weight_decay"] == 0.0
    assert config["model"]["post_ln"] is False and config["model"]["router_bias"] is True


def test_train_report_groups_by_preset_with_todays_defaults_as_a_labelled_arm(tmp_path):
    """`group_by = ["preset"]`: a run without a preset is in the group `preset=none`, and is paired with the baseline
    of its own group. The settings the preset fills (lr, schedule, weight decay, ...) differ between the groups but
    are the group's, so they do not make the labels: the two groups' runs are both `switch` and `sparsemixer`."""
    spec = write_spec(tmp_path, """
    [study]
    name = "preset-fixture"
    kind = "train"
    baseline = "switch"
    group_by = ["preset"]
    [grid]
    variant = [{ name = "switch", estimator = "switch", preset = "sparsemixer-reference" },
               { name = "sparsemixer", estimator = "sparsemixer", preset = "sparsemixer-reference" },
               { name = "switch", estimator = "switch" },
               { name = "sparsemixer", estimator = "sparsemixer" }]
    seed = [0, 1]
    [settings]
    steps = 20
    """, "preset.toml")
    study = load_study(spec)
    for cell in study.cells(None, tmp_path / "res"):
        preset, seed = "preset" in cell.config, cell.config["seed"]
        assert preset == (cell.config["lr"] == 7e-4)  # the preset's settings are the cell's
        final = 2.0 + (0.1 if preset else -0.1) * (cell.config["name"] == "sparsemixer") + 0.01 * seed
        metrics = pd.DataFrame({"step": [10, 20], "train_loss": [3.0, 3.0], "val_loss": [final + 0.5, final],
                                "seconds": [5.0, 10.0]})
        finish_train_cell(cell, metrics)
    out = write_report(study, None, tmp_path / "res", tmp_path / "out")
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["preset"].unique()) == ["none", "sparsemixer-reference"]
    assert sorted(results["label"].unique()) == ["sparsemixer", "switch"]
    summary = pd.read_csv(out / "summary.csv").set_index(["preset", "label"])
    assert summary.loc[("sparsemixer-reference", "sparsemixer"), "val_loss_diff"] == pytest.approx(0.1)
    assert summary.loc[("none", "sparsemixer"), "val_loss_diff"] == pytest.approx(-0.1)
    text = (out / "README.md").read_text()
    assert "### preset=none\n" in text and "### preset=sparsemixer-reference\n" in text


def test_lead_over_training_compares_the_lead_at_the_common_horizon_with_the_final_one(tmp_path):
    """Runs stopped at different steps (a plateau rule): the 'over training' family holds, per arm, the paired
    difference at S = the last step every run reached, and the final difference minus it, computed here by hand."""
    from gradest.study.kinds.train import _tests
    finals, curves = [], []
    # seed s: switch stops at 300 + 100 s, sparsemixer at 400; at step 300 the lead is -0.01 (s + 1) (switch's
    # seed-0 run ends there at 1.9: its lead -0.01 + (1.9 - 2.0)), at the end -0.03 (s + 1)
    for seed in range(3):
        for label, steps, at_300, final in (("switch", 300 + 100 * seed, 2.0, 1.9),
                                            ("sparsemixer", 400, 2.0 - 0.01 * (seed + 1), 1.9 - 0.03 * (seed + 1))):
            cell = f"{label}-{seed}"
            finals.append({"label": label, "seed": seed, "cell": cell, "steps": steps, "val_loss": final})
            curves.append({"cell": cell, "step": 300, "val_loss": at_300 if steps > 300 else final, "label": label,
                           "seed": seed})
            if steps > 300:
                curves.append({"cell": cell, "step": steps, "val_loss": final, "label": label, "seed": seed})
    finals = pd.DataFrame(finals)
    finals["val_loss_diff"] = finals["val_loss"] - finals["seed"].map(
        finals[finals["label"] == "switch"].set_index("seed")["val_loss"])
    text = _tests(finals, pd.DataFrame(curves), [{}], [], "switch", tmp_path)
    assert "#### Tests: over training" in text
    tests = pd.read_csv(tmp_path / "tests.csv")
    over = tests[tests["family"] == "over training"].set_index("comparison")
    at = over.loc["sparsemixer - switch at step 300"]
    change = over.loc["(sparsemixer - switch) final minus at step 300"]
    early = [-0.01 + 0.1, -0.02, -0.03]  # seed 0: sparsemixer 1.99 at step 300 against switch's final 1.9
    final = [-0.03, -0.06, -0.09]
    assert at["mean"] == pytest.approx(sum(early) / 3) and at["seeds"] == 3 and at["lower"] == 2
    assert change["mean"] == pytest.approx((sum(final) - sum(early)) / 3) and change["lower"] == 3
    assert change["holm_p"] >= change["p"] and at["holm_p"] >= at["p"]


def test_lead_at_compares_the_lead_at_that_step_when_every_run_ends_at_the_same_step(tmp_path):
    """Runs that all hit the step cap have no common horizon short of the end: `lead_at` names the step whose lead
    the 'over training' family compares with the final one (by hand: leads -0.05 s at step 1500, -0.06 s at the end);
    without it there is no such family."""
    from gradest.study.kinds.train import _tests
    finals, curves = [], []
    for seed in (1, 2, 3):
        for label, at_1500, final in (("switch", 2.2, 1.9), ("sparsemixer", 2.2 - 0.05 * seed, 1.9 - 0.06 * seed)):
            cell = f"{label}-{seed}"
            finals.append({"label": label, "seed": seed, "cell": cell, "steps": 8000, "val_loss": final,
                           "val_loss_diff": final - 1.9})
            curves += [{"cell": cell, "step": 1500, "val_loss": at_1500}, {"cell": cell, "step": 8000, "val_loss": final}]
    finals, curves = pd.DataFrame(finals), pd.DataFrame(curves)
    assert "over training" not in _tests(finals, curves, [{}], [], "switch", tmp_path)
    text = _tests(finals, curves, [{}], [], "switch", tmp_path, lead_at=1500)
    assert "#### Tests: over training" in text and "the spec's `lead_at`" in text
    over = pd.read_csv(tmp_path / "tests.csv").set_index("comparison")
    assert over.loc["sparsemixer - switch at step 1500", "mean"] == pytest.approx(-0.1)
    assert over.loc["(sparsemixer - switch) final minus at step 1500", "mean"] == pytest.approx(-0.02)


@pytest.mark.parametrize("value", [0, -5, 1.5, "1500", True])
def test_lead_at_must_be_a_step(tmp_path, value):
    spec = tmp_path / "s.toml"
    spec.write_text(f'[study]\nname = "s"\nkind = "train"\nlead_at = {value!r}\n'.replace("'", '"').replace(
        "True", "true") + '[grid]\nseed = [0]\n')
    with pytest.raises(GradestError, match=r"\[study\] lead_at .*must be a step"):
        load_study(spec)


def test_between_groups_compares_the_paired_leads_of_two_groups(tmp_path):
    """The 'between groups' family: an arm's leads over the baseline in two groups that differ in one setting,
    compared by Welch's t with its interval; a seed whose baseline run is missing (a report of unfinished cells)
    has no lead and is left out, not turned into a NaN mean."""
    from gradest.study.kinds.train import _tests
    leads = {0: [-0.01, -0.02, -0.03, -0.02], 1: [-0.05, -0.04, -0.07, -0.06]}
    finals = []
    for group, values in leads.items():
        for seed, lead in enumerate(values):
            finals.append({"g": group, "label": "sparsemixer", "seed": seed, "cell": f"s{group}{seed}",
                           "steps": 100, "val_loss": 2.0 + lead,
                           "val_loss_diff": float("nan") if (group, seed) == (1, 3) else lead})
            if (group, seed) != (1, 3):  # this seed's baseline run has not finished
                finals.append({"g": group, "label": "switch", "seed": seed, "cell": f"b{group}{seed}",
                               "steps": 100, "val_loss": 2.0, "val_loss_diff": 0.0})
    _tests(pd.DataFrame(finals), pd.DataFrame(columns=["cell", "step", "val_loss"]), [{"g": 0}, {"g": 1}], ["g"],
           "switch", tmp_path)
    tests = pd.read_csv(tmp_path / "tests.csv").set_index("family")
    against = tests.loc["against switch"]
    assert list(against["seeds"]) == [4, 3]
    change = tests.loc["between groups"]
    later, earlier = leads[1][:3], leads[0]
    welch = stats.ttest_ind(later, earlier, equal_var=False)
    assert change["group"] == "g=1 vs g=0" and change["seeds"] == 3
    assert change["mean"] == pytest.approx(np.mean(later) - np.mean(earlier))
    assert change["p"] == pytest.approx(welch.pvalue)
    assert (change["lo"], change["hi"]) == pytest.approx(tuple(welch.confidence_interval(0.95)))
