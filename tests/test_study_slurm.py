"""Studies on a cluster: `gradest study run --executor slurm` submits the unfinished cells as a submitit job array,
a cell per task, into the same cache with the same atomic, resumable cells as a local run.

No Slurm here: the slurm executor is driven against fake `sbatch`, `srun` and `squeue` commands on PATH (the array
script submitit writes, the job ids it reads back, which jobs are still queued), and the tasks themselves run
under submitit's local cluster (`--executor submitit-local`): a task killed half-way leaves no half cell, and the
next submission runs only the cells not finished. Bad options are one line, exit 2, with nothing submitted or
written. The executors are a registry, and the core package never imports submitit."""

from __future__ import annotations

import ast
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gradest.errors import GradestError
from gradest.io import atomic_write, atomic_write_text
from gradest.study import (EXECUTORS, Executor, ExecutorOption, execute, load_study, register_executor, run_study,
                           unregister_executor)
from gradest.study.runner import RunSummary
from helpers import REPO, SMALL, assert_one_line_error, cli, write_spec

submitit = pytest.importorskip("submitit")

FAKE_SBATCH = """#!/bin/sh
# a fake sbatch: keeps the script it is given, answers as sbatch does (or refuses, as $FAKE_SLURM/refuse says)
if [ -f "$FAKE_SLURM/refuse" ]; then cat "$FAKE_SLURM/refuse" >&2; exit 1; fi
n=$(ls "$FAKE_SLURM" | grep -c '^sbatch-')
cp "$1" "$FAKE_SLURM/sbatch-$n.sh"
echo "Submitted batch job $((4242 + n))"
"""
FAKE_SQUEUE = """#!/bin/sh
# a fake squeue: the jobs listed in $FAKE_SLURM/queue are still queued or running
cat "$FAKE_SLURM/queue" 2>/dev/null
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, srun and squeue on PATH: the folder where the scripts sbatch was given land (sbatch-N.sh, N from
    0), and where `queue` lists the jobs squeue reports."""
    folder = tmp_path / "fake-slurm"
    folder.mkdir()
    bin_ = tmp_path / "fake-bin"
    bin_.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "squeue": FAKE_SQUEUE, "srun": "#!/bin/sh\nexit 0\n"}.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod((bin_ / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    return folder


def scripts(folder: Path) -> list[str]:
    return [path.read_text() for path in sorted(folder.glob("sbatch-*.sh"))]


def queued(results: Path, kind="compare") -> dict:
    return {path.parent.name: json.loads(path.read_text()) for path in (results / kind).glob("*/queued.json")}


def ok(config, directory):
    atomic_write_text(directory / "results.csv", "x\n1\n")
    return {"ok": True}


# ------------------------------------------------------------------------------------------- slurm, faked
def test_slurm_submits_an_array_records_it_and_resubmits_only_the_missing_cells(tmp_path, fake_slurm):
    spec, results = write_spec(tmp_path), tmp_path / "res"
    ran = cli("study", "run", spec, "--executor", "slurm", "--partition", "gpu", "--time", "1:30:00",
              "--cpus-per-task", "4", "--gpus-per-task", "1", "--array-parallelism", "2", "--account", "acct",
              "--qos", "high", "--mem", "16G", "--sbatch", "mail-type=END", "--sbatch", "exclusive",
              "--setup", "source venv/bin/activate", "--results", results)
    assert ran.exit_code == 0, ran.output
    assert "6 cells, 0 already done, 6 submitted (job 4242)" in ran.output
    (script,) = scripts(fake_slurm)
    for line in ["--partition=gpu", "--time=90", "--cpus-per-task=4", "--gpus-per-task=1", "--array=0-5%2",
                 "--account=acct", "--qos=high", "--mem=16G", "--mail-type=END", "--job-name=gradest-small"]:
        assert f"#SBATCH {line}\n" in script, line
    assert "#SBATCH --exclusive\n" in script and "\nsource venv/bin/activate\n" in script
    # each cell records its submission: its task of the array, and the threads it runs with (--cpus-per-task)
    records = queued(results)
    assert sorted(record["job"] for record in records.values()) == [f"4242_{i}" for i in range(6)]
    assert {record["threads"] for record in records.values()} == {4}
    assert {record["executor"] for record in records.values()} == {"slurm"}
    (fake_slurm / "queue").write_text("".join(f"4242_{i}\n" for i in range(6)) + "999_1\n")
    status = cli("study", "status", spec, "--results", results)
    assert status.exit_code == 0, status.output
    lines = status.output.splitlines()
    assert lines[0] == "study small (profile base): 0 of 6 cells done, 0 failed, 6 queued, 0 to run"
    assert lines[1].split() == ["arm", "done", "failed", "queued", "to", "run"]
    assert "queued 6 cell(s) in job 4242 (--executor slurm" in status.output and "no job" not in status.output

    # submitted again while the array is queued: nothing to submit
    again = cli("study", "run", spec, "--executor", "slurm", "--results", results)
    assert again.exit_code == 0 and "6 already queued" in again.output and len(scripts(fake_slurm)) == 1

    # the array ran partly, then was killed: two cells done, one failed, three lost with their tasks
    study = load_study(spec)
    cells = study.cells(None, results)
    for cell in cells[:2]:
        assert execute(cell, ok) == ("done", "")
    assert execute(cells[2], lambda config, directory: 1 / 0)[0] == "failed"
    (fake_slurm / "queue").write_text("")
    status = cli("study", "status", spec, "--results", results)
    assert status.output.splitlines()[0] == ("study small (profile base): 2 of 6 cells done, 1 failed, 3 queued, "
                                             "0 to run")
    assert "3 queued cell(s) are in no job still queued or running" in status.output
    assert "failed " + cells[2].hash in status.output
    before = {cell.hash: (cell.directory / "done.json").read_bytes() for cell in cells[:2]}
    again = cli("study", "run", spec, "--executor", "slurm", "--results", results)
    assert again.exit_code == 0, again.output
    assert "6 cells, 2 already done, 4 submitted (job 4243)" in again.output
    assert "#SBATCH --array=0-3%4\n" in scripts(fake_slurm)[1]  # only the 4 cells not finished
    records = queued(results)
    assert sorted(records[cell.hash]["job"] for cell in cells[2:]) == [f"4243_{i}" for i in range(4)]
    assert {cell.hash: (cell.directory / "done.json").read_bytes() for cell in cells[:2]} == before
    status = cli("study", "status", spec, "--results", results)  # the failed cell is queued again
    assert status.output.splitlines()[0] == ("study small (profile base): 2 of 6 cells done, 0 failed, 4 queued, "
                                             "0 to run")


def test_a_cell_on_a_gpu_needs_gpus_per_task(tmp_path, fake_slurm):
    """The submitting machine need not have the cells' GPU (a login node), but each task needs one."""
    spec = write_spec(tmp_path, """
        [study]
        name = "gpu"
        kind = "train"
        [settings]
        estimator = "switch"
        device = "cuda"
    """, "gpu.toml")
    refused = cli("study", "run", spec, "--executor", "slurm", "--results", tmp_path / "res")
    assert_one_line_error(refused, "device cuda", "--gpus-per-task is 0")
    assert not (tmp_path / "res").exists() and not scripts(fake_slurm)
    ran = cli("study", "run", spec, "--executor", "slurm", "--gpus-per-task", "1", "--results", tmp_path / "res")
    assert ran.exit_code == 0, ran.output
    assert "#SBATCH --gpus-per-task=1\n" in scripts(fake_slurm)[0]
    assert [record["job"] for record in queued(tmp_path / "res", "train").values()] == ["4242"]  # one cell: no array


@pytest.mark.parametrize("args, words", [
    (["--executor", "nope"], ["unknown executor 'nope'", "valid: local, slurm, submitit-local"]),
    (["--executor", "slurm", "--time", "abc"], ["--time", "'abc'", "[D-]HH:MM[:SS]"]),
    (["--executor", "slurm", "--time", "0"], ["--time", "'0'", "at least a minute"]),
    (["--executor", "slurm", "--gpus-per-task", "-1"], ["--gpus-per-task", "integer >= 0", "'-1'"]),
    (["--executor", "slurm", "--cpus-per-task", "two"], ["--cpus-per-task", "integer >= 1", "'two'"]),
    (["--executor", "slurm", "--array-parallelism", "0"], ["--array-parallelism", "integer >= 1", "'0'"]),
    (["--executor", "slurm", "--mem", "lots"], ["--mem", "'lots'", "16G"]),
    (["--executor", "slurm", "--partition", "a b"], ["--partition", "'a b'", "without spaces"]),
    (["--executor", "slurm", "--sbatch", "array=0-3"], ["--sbatch array", "set by gradest"]),
    (["--executor", "slurm", "--sbatch", "Bad Key"], ["--sbatch", "'Bad Key'", "KEY=VALUE"]),
    (["--executor", "slurm", "--jobs", "2"], ["--jobs is an option of --executor local", "not of --executor slurm"]),
    (["--partition", "gpu"], ["--partition is an option of --executor slurm", "not of --executor local"]),
    (["--executor", "submitit-local", "--qos", "high"], ["--qos is an option of --executor slurm"]),
    (["--jobs", "0"], ["--jobs must be an integer from 1 to 1,024, got '0'"]),
    (["--jobs", str(2 ** 63)], ["--jobs must be an integer from 1 to 1,024"]),
])
def test_bad_executor_options_are_one_line_and_nothing_is_submitted(tmp_path, fake_slurm, args, words):
    refused = cli("study", "run", write_spec(tmp_path), *args, "--results", tmp_path / "res")
    assert_one_line_error(refused, *words)
    assert not (tmp_path / "res").exists() and not scripts(fake_slurm)


def test_no_submitit_no_sbatch_or_a_refusing_sbatch_are_one_line(tmp_path, fake_slurm, monkeypatch):
    spec, results = write_spec(tmp_path), tmp_path / "res"
    (fake_slurm / "refuse").write_text("sbatch: error: invalid partition specified: nope\n")
    refused = cli("study", "run", spec, "--executor", "slurm", "--partition", "nope", "--results", results)
    assert_one_line_error(refused, "submitting the array failed, nothing was submitted", "invalid partition")
    assert not queued(results)
    monkeypatch.setenv("PATH", os.defpath)  # no sbatch
    refused = cli("study", "run", spec, "--executor", "slurm", "--results", results)
    assert_one_line_error(refused, "needs sbatch", "--executor submitit-local or local")
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    refused = cli("study", "run", spec, "--executor", "slurm", "--results", results)
    assert_one_line_error(refused, "need submitit", "pip install 'gradest[slurm]'")
    assert not queued(results)


# -------------------------------------------------------------------------------- submitit's local cluster
# SMALL's switch arm only: three cells, one task each
THREE = SMALL.replace('estimator = ["switch", "st:tau=0.5"]\n', "").replace(
    "[settings]\n", '[settings]\nestimator = "switch"\n')


def killable(config, directory):
    """A cell's runner in a task of the array (imported there from this file): it logs its start and end, and
    SIGKILLs its own task half-way through writing its outputs when a `kill-<seed>` file says so (once)."""
    log = Path(os.environ["GRADEST_TEST_LOG"])
    with open(log, "a") as handle:
        handle.write(f"start {directory.name}\n")

    def write(handle):  # atomically, as the real runners write their outputs
        handle.write(b"x\n")
        handle.flush()
        marker = log.with_name(f"kill-{config['seed']}")
        if marker.exists():
            marker.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        handle.write(b"1\n")

    atomic_write(directory / "results.csv", write)
    with open(log, "a") as handle:
        handle.write(f"end {directory.name}\n")
    return {"ok": 1}


@pytest.mark.slow
def test_a_killed_task_leaves_no_half_cell_and_the_next_submission_runs_only_it(tmp_path, monkeypatch):
    """Under submitit's local cluster (real task processes): the task of seed 1 is SIGKILLed half-way through its
    outputs. The other cells finish, with the threads --cpus-per-task gives them; that one is neither finished
    nor failed, has no half file, and is shown queued in a job no longer running; submitting again runs it and
    only it."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    log = tmp_path / "log"
    monkeypatch.setenv("GRADEST_TEST_LOG", str(log))
    (tmp_path / "kill-1").write_text("")
    spec, results = write_spec(tmp_path, THREE), tmp_path / "res"
    study = load_study(spec)
    summary = run_study(study, results=results, executor="submitit-local", runner=killable, progress=False,
                        options={"cpus_per_task": 2, "wait": True, "time": 5})
    assert len(summary.submitted) == 3 and len(summary.done) == 2 and not summary.failed
    ((killed, message),) = summary.unfinished
    assert "ended without finishing it" in message
    cells = {cell.hash: cell for cell in study.cells(None, results)}
    cell = cells[killed]
    assert cell.config["seed"] == 1 and not cell.done and not cell.failed
    assert not (cell.directory / "results.csv").exists()  # the half-written file is only a hidden temporary
    assert [path.name.startswith(".results.csv.") for path in cell.directory.glob("*.tmp")] == [True]
    finished = [c for c in cells.values() if c.done]
    assert {json.loads((c.directory / "done.json").read_text())["environment"]["threads"] for c in finished} == {2}
    status = cli("study", "status", spec, "--results", results)
    assert status.output.splitlines()[0] == ("study small (profile base): 2 of 3 cells done, 0 failed, 1 queued, "
                                             "0 to run")
    assert "1 queued cell(s) are in no job still queued or running (killed" in status.output
    assert status.output.rstrip().endswith(killed)

    before = {c.hash: (c.directory / "done.json").read_bytes() for c in finished}
    again = run_study(study, results=results, executor="submitit-local", runner=killable, progress=False,
                      options={"cpus_per_task": 2, "wait": True, "time": 5})
    assert (again.skipped, again.submitted, again.done, again.failed, again.unfinished) == (2, [killed], [killed], [],
                                                                                           [])
    starts, ends = ([line.split()[1] for line in log.read_text().splitlines() if line.startswith(word)]
                    for word in ("start", "end"))
    assert sorted(ends) == sorted(cells) and starts.count(killed) == 2 and len(starts) == 4
    assert {c.hash: (c.directory / "done.json").read_bytes() for c in finished} == before
    assert (cell.directory / "results.csv").read_text() == "x\n1\n"
    status = cli("study", "status", spec, "--results", results)
    assert status.output.splitlines()[0] == "study small (profile base): 3 of 3 cells done, 0 failed, 0 to run"


# ---------------------------------------------------------------------------------------------- the registry
def test_an_executor_is_one_registration_with_its_options(tmp_path):
    """A throwaway executor, registered here, is an `--executor` choice and its option a `gradest study run`
    option, checked like the others; the registry refuses a taken name."""
    seen = {}

    def inline(cells, options, threads, **context):
        seen.update(options=options, threads=threads)
        summary = RunSummary(total=len(cells), skipped=0)
        for cell in cells:
            summary.done.append(cell.hash) if execute(cell, ok)[0] == "done" else None
        return summary

    def volume(value):
        if value not in ("low", "high"):
            raise GradestError(f"--volume must be low or high, got {value!r}")
        return value

    register_executor(Executor("inline", "in this process", inline,
                               options=(ExecutorOption("volume", volume, "low", "how loud"),),
                               threads=lambda options: 3))
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_executor(EXECUTORS["inline"])
        assert "inline: how loud" in cli("study", "run", "--help").output
        spec = write_spec(tmp_path)
        ran = cli("study", "run", spec, "--executor", "inline", "--volume", "high", "--results", tmp_path / "res")
        assert ran.exit_code == 0, ran.output
        assert "6 cells, 0 already done, 6 run, 0 failed" in ran.output
        assert seen == {"options": {"volume": "high"}, "threads": 3}
        assert_one_line_error(cli("study", "run", spec, "--executor", "inline", "--volume", "max"), "'max'")
        assert_one_line_error(cli("study", "run", spec, "--volume", "high"), "--volume is an option of --executor "
                                                                             "inline")
    finally:
        unregister_executor("inline")


def test_only_the_slurm_executor_imports_submitit_and_lazily():
    """submitit is an extra (`gradest[slurm]`): the one import of it is inside a function of the slurm executor's
    module, run only when that executor is."""
    imports = []
    for path in sorted((REPO / "gradest").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        lazy = {id(inner) for function in functions for inner in ast.walk(function)}
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "submitit" for name in names):
                imports.append((path.relative_to(REPO).as_posix(), id(node) in lazy))
    assert imports == [("gradest/study/executors/slurm.py", True)]


@pytest.mark.slow
def test_the_core_package_never_imports_submitit():
    code = ("import sys, gradest.cli, gradest.study; from gradest.study import EXECUTORS; "
            "assert 'slurm' in EXECUTORS and 'submitit' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
