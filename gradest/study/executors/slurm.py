"""`--executor slurm`: the unfinished cells submitted as one Slurm job array through submitit, a cell per task;
`--executor submitit-local`: the same array run by submitit on this machine (every cell at once), to try it.

Each task runs its cell through `gradest.study.runner.execute`, as the local runner does: the same cache, the same
atomic files with done.json last, so a task killed at any point (scancel, out of time or memory, a lost node)
leaves no half cell, and the next submission runs only the cells not finished. A task whose cell another process
is running (a task of an earlier array, a local run) ends at once instead of waiting for it. Each task runs with
`threads` torch threads (default --cpus-per-task), which its done.json records, as a local run does.

A submission is recorded in each of its cells (`queued.json`: the executor, the job id, when, the logs, the
threads), written atomically once sbatch has answered; `gradest study status` shows those cells as queued until
they finish or fail, and a second submission leaves alone the cells whose job is still queued or running
(`squeue`), and submits the others again. submitit is imported only here, when one of these executors runs
(`pip install 'gradest[slurm]'`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import io
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from gradest.errors import GradestError, one_line
from gradest.study.executor import Executor, ExecutorOption, positive_int, register_executor
from gradest.study.kind import cell_kind
from gradest.study.runner import RunSummary, _check_devices, cell_progress, execute
from gradest.study.spec import QUEUED, Cell

LOGS = ".submitit"  # the default folder of the submissions' scripts and logs, in the results cache
RESERVED_SBATCH = ("array", "output", "error")  # submitit writes them: the array of cells, the logs it reads back


# ------------------------------------------------------------------------------------------------------ options
def slurm_minutes(value) -> int:
    """A time limit as Slurm writes one (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S), or a number of minutes, in
    whole minutes (seconds rounded up)."""
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if isinstance(value, bool) or match is None:
        minutes = None
    else:
        days, parts = match.group(1), [int(part) for part in match.groups()[1:] if part is not None]
        if days is not None:  # D-H, D-H:M, D-H:M:S
            hours, rest = parts[0], parts[1:] + [0] * (3 - len(parts))
            seconds = ((int(days) * 24 + hours) * 60 + rest[0]) * 60 + rest[1]
        else:  # M, M:S, H:M:S
            seconds = {1: lambda: parts[0] * 60, 2: lambda: parts[0] * 60 + parts[1],
                       3: lambda: (parts[0] * 60 + parts[1]) * 60 + parts[2]}[len(parts)]()
        minutes = math.ceil(seconds / 60)
    if not minutes:
        raise GradestError(f"--time must be a time limit as Slurm writes one (minutes, or [D-]HH:MM[:SS], e.g. 90, "
                           f"1:30:00 or 2-00:00:00), at least a minute, got {value!r}")
    return minutes


def slurm_name(flag: str):
    def parse(value):
        if not isinstance(value, str) or not re.fullmatch(r"[^\s]+", value):
            raise GradestError(f"--{flag} must be a name without spaces, got {value!r}")
        return value
    return parse


def slurm_memory(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"\d+[KMGT]?", value.strip(), re.IGNORECASE):
        raise GradestError(f"--mem must be memory per node as Slurm writes it (e.g. 16G, 4000M), got {value!r}")
    return value.strip().upper()


def sbatch_argument(value) -> tuple[str, object]:
    """`KEY=VALUE` (or a flag `KEY`): an sbatch option submitit has no parameter for (`mail-type=END`,
    `exclusive`), written as `#SBATCH --KEY=VALUE`."""
    text = str(value).strip()
    key, equals, argument = text.removeprefix("--").partition("=")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", key) or "\n" in argument or (equals and not argument):
        raise GradestError(f"--sbatch must be an sbatch option as KEY=VALUE or KEY (e.g. mail-type=END, exclusive), "
                           f"got {value!r}")
    if key in RESERVED_SBATCH:
        raise GradestError(f"--sbatch {key}=... is set by gradest (the array of cells and its logs); valid: any "
                           f"other sbatch option")
    return key, argument if equals else True


def setup_line(value) -> str:
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise GradestError(f"--setup must be one shell command (e.g. 'source ~/venv/bin/activate'), got {value!r}")
    return value


def folder(value) -> Path:
    if not str(value).strip():
        raise GradestError(f"--logs must be a folder, got {value!r}")
    return Path(value)


CPUS = ExecutorOption("cpus_per_task", positive_int("cpus_per_task"), 1,
                      "CPUs of each task; its cell's torch threads unless --threads says "
                      "[default: 1]", metavar="N")
GPUS = ExecutorOption("gpus_per_task", positive_int("gpus_per_task", 0), 0,
                      "GPUs of each task (a cell on device cuda needs one) [default: 0]",
                      metavar="N")
TIME = ExecutorOption("time", slurm_minutes, 60, "time limit of each task, minutes or "
                      "[D-]HH:MM[:SS]; a cell still running then is recorded as failed (timed out) and runs again "
                      "on the next submission [default: 60]", metavar="TIME")
PARTITION = ExecutorOption("partition", slurm_name("partition"), None, "the partition", metavar="NAME")
ACCOUNT = ExecutorOption("account", slurm_name("account"), None, "the account charged", metavar="NAME")
QOS = ExecutorOption("qos", slurm_name("qos"), None, "the quality of service", metavar="NAME")
CONSTRAINT = ExecutorOption("constraint", slurm_name("constraint"), None, "node features (sbatch "
                            "--constraint)", metavar="FEATURES")
MEM = ExecutorOption("mem", slurm_memory, None, "memory per node, e.g. 16G [default: the partition's]",
                     metavar="SIZE")
PARALLELISM = ExecutorOption("array_parallelism", positive_int("array_parallelism"), None,
                             "the most tasks of the array running at once [default: submitit's, 256]",
                             metavar="N")
SBATCH = ExecutorOption("sbatch", sbatch_argument, (), "any other sbatch option, KEY=VALUE or KEY "
                        "(e.g. --sbatch mail-type=END); repeatable", metavar="KEY=VALUE", multiple=True)
SETUP = ExecutorOption("setup", setup_line, (), "a shell command run before each task "
                       "(e.g. 'module load cuda'); repeatable", metavar="COMMAND", multiple=True)
LOGS_OPTION = ExecutorOption("logs", folder, None, f"the folder of the submissions' "
                             f"scripts and logs [default: RESULTS/{LOGS}/]", metavar="DIR")
NAME = ExecutorOption("job_name", slurm_name("job-name"), None, "the job's name [default: "
                      "gradest-<study>]", metavar="NAME")
WAIT = ExecutorOption("wait", bool, False, "wait for the array to end and print each "
                      "cell's outcome, as a local run does", switch=True)


# --------------------------------------------------------------------------------------------------- the tasks
class CellFailed(RuntimeError):
    """A task's cell failed (its error.json says why): the task fails, so that Slurm's accounting shows it."""


def run_cell(cell: Cell, run, threads: int, command) -> str:
    """One task of the array: its cell with `threads` torch threads, through `execute` (atomic, resumable). "done",
    or "busy" when another process is running the cell; a failed cell raises CellFailed."""
    import torch
    torch.set_num_threads(threads)
    status, message = execute(cell, run, command, wait=False)
    if status == "failed":
        raise CellFailed(message)
    return status


# ------------------------------------------------------------------------------------------------- submitting
def _submitit():
    try:
        import submitit
    except ImportError:
        raise GradestError("the slurm and submitit-local executors need submitit, which is not installed; valid: "
                           "pip install 'gradest[slurm]', or --executor local") from None
    return submitit


def _check_gpus(cells: list[Cell], gpus: int, where: str):
    """A cell on a GPU needs --gpus-per-task: a task sees only the GPUs its allocation has."""
    if gpus:
        return
    for cell in cells:
        devices = [value for key, value in _items(cell.config) if key == "device" and isinstance(value, str)]
        for device in devices:
            if device.startswith("cuda"):
                raise GradestError(f"{where}: cell {cell.hash} runs on device {device}, but --gpus-per-task is 0; "
                                   f"valid: --gpus-per-task 1 (or more)")


def _items(config: dict):
    for key, value in config.items():
        yield key, value
        if isinstance(value, dict):
            yield from _items(value)


def _parameters(cluster: str, options: dict, label: str) -> dict:
    """AutoExecutor's parameters: the shared ones, and the slurm_ ones (which the local cluster leaves aside)."""
    parameters = {"name": options.get("job_name") or f"gradest-{label}", "timeout_min": options["time"],
                  "cpus_per_task": options["cpus_per_task"], "nodes": 1, "tasks_per_node": 1}
    if cluster == "local":
        return {**parameters, "gpus_per_node": options["gpus_per_task"],
                **({"local_setup": list(options["setup"])} if options["setup"] else {})}
    slurm = {"gpus_per_task": options["gpus_per_task"] or None, "partition": options["partition"],
             "account": options["account"], "qos": options["qos"], "constraint": options["constraint"],
             "mem": options["mem"], "array_parallelism": options["array_parallelism"],
             "setup": list(options["setup"]) or None, "additional_parameters": dict(options["sbatch"]) or None}
    return {**parameters, **{f"slurm_{key}": value for key, value in slurm.items() if value is not None}}


def submit(cluster: str, cells: list[Cell], options: dict, threads: int, *, runner=None, command=None,
           progress=True, where="", results=None, label="study") -> RunSummary:
    """Submit the unfinished `cells` (those whose job is not still queued or running) as one array: everything is
    checked first, then sbatch (or the local cluster) is asked, then each cell's queued.json is written."""
    submitit = _submitit()
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise GradestError("--executor slurm needs sbatch, which is not on PATH (not a Slurm login node?); valid: "
                           "--executor submitit-local or local on this machine")
    _check_gpus(cells, options["gpus_per_task"], where)
    if cluster == "local":  # the tasks run here: the devices must be here
        _check_devices(cells, where)
    summary = RunSummary(total=len(cells), skipped=0, ran=bool(options["wait"]))
    executor = EXECUTORS_BY_CLUSTER[cluster]
    records = {cell.hash: cell.submission for cell in cells}
    active = executor.active([str(record.get("job")) for record in records.values() if record]) or set()
    waiting = [cell for cell in cells if records[cell.hash] and str(records[cell.hash].get("job")) in active]
    summary.queued = len(waiting)
    todo = [cell for cell in cells if cell not in waiting]
    if not todo:
        return summary
    # absolute paths: a task may start elsewhere than here
    todo = [dataclasses.replace(cell, directory=cell.directory.resolve()) for cell in todo]
    runs = [runner or cell_kind(cell.kind).run for cell in todo]  # resolved here: a kind registered at run time too
    logs = (options["logs"] or Path(results or ".") / LOGS).resolve()
    parameters = _parameters(cluster, options, label)
    submitted_ns, when = time.time_ns(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        # (submitit prints a refusing sbatch's stderr, which the one-line error below has)
        with contextlib.redirect_stderr(io.StringIO()):
            auto = submitit.AutoExecutor(folder=logs / "%j", cluster=cluster)
            auto.update_parameters(**parameters)
            jobs = auto.map_array(run_cell, todo, runs, [threads] * len(todo), [command] * len(todo))
    except Exception as error:  # noqa: BLE001 - sbatch's refusal (a bad partition, account, ...), in one line
        raise GradestError(f"{where}: submitting the array failed, nothing was submitted: "
                           f"{one_line(f'{type(error).__name__}: {error}')}") from None
    arrays = sorted({job.job_id.split("_")[0] for job in jobs})
    summary.job, summary.logs = ", ".join(arrays), f"{logs}/"
    from gradest.io import write_json
    for cell, job in zip(todo, jobs):
        write_json(cell.directory / QUEUED, {
            "executor": executor.name, "job": job.job_id, "array": job.job_id.split("_")[0], "submitted": when,
            "submitted_ns": submitted_ns, "threads": threads, "logs": str(logs), "log": str(job.paths.stdout),
            "options": {key: (str(value) if isinstance(value, Path) else value) for key, value in options.items()}})
        summary.submitted.append(cell.hash)
    if options["wait"]:
        _wait(list(zip(todo, jobs)), summary, label, progress)
    return summary


def _wait(pairs: list, summary: RunSummary, label: str, progress: bool):
    """Until every task has ended: each cell's outcome, read from the cache (done, failed, or unfinished: its task
    ended without finishing it, killed or out of time)."""
    with cell_progress(summary, len(pairs), label, progress) as record:
        while pairs:
            ended = [(cell, job) for cell, job in pairs if job.done()]
            for cell, job in ended:
                pairs.remove((cell, job))
                if cell.done:
                    record(cell, "done", "")
                elif cell.failed:
                    error = cell.directory / "error.json"
                    record(cell, "failed", json.loads(error.read_text(encoding="utf-8")).get("error", ""))
                else:
                    try:
                        busy = job.result() == "busy"
                    except Exception:  # noqa: BLE001 - killed, out of time: no result
                        busy = False
                    record(cell, "unfinished", f"another process is running it (task {job.job_id} left it)" if busy
                           else f"its task (job {job.job_id}) ended without finishing it; its log: {job.paths.stderr}")
            if pairs and not ended:
                time.sleep(0.5)


# ------------------------------------------------------------------------------------ which jobs are still there
def slurm_active(jobs: list[str]) -> set | None:
    """The jobs (array tasks `123_4`, or jobs `123`) still queued or running: squeue's list of this user's jobs,
    one line per array task. None when squeue cannot be asked."""
    if not jobs:
        return set()
    try:
        output = subprocess.run(["squeue", "--noheader", "--array", "--format=%i", f"--user={_user()}"],
                                capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line.strip() for line in output.splitlines() if line.strip()} & set(jobs)


def _user() -> str:
    import getpass
    return getpass.getuser()


def local_active(jobs: list[str]) -> set:
    """submitit-local's jobs are processes (the job id is the pid of its controller): those still running."""
    alive = set()
    for job in jobs:
        try:
            pid = int(job)
            if Path("/proc").is_dir():  # not a zombie, nor another process under a reused pid
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z" and b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    alive.add(job)
            else:
                os.kill(pid, 0)
                alive.add(job)
        except (ValueError, OSError, IndexError):
            continue
    return alive


SLURM = register_executor(Executor(
    "slurm", "a Slurm job array through submitit, a cell per task", functools.partial(submit, "slurm"),
    options=(PARTITION, TIME, CPUS, GPUS, MEM, ACCOUNT, QOS, CONSTRAINT, PARALLELISM, SBATCH, SETUP, NAME, LOGS_OPTION,
             WAIT),
    threads=lambda options: options["cpus_per_task"], active=slurm_active))
SUBMITIT_LOCAL = register_executor(Executor(
    "submitit-local", "the same array run by submitit on this machine, every cell at once (to try it)",
    functools.partial(submit, "local"), options=(TIME, CPUS, GPUS, SETUP, LOGS_OPTION, WAIT),
    threads=lambda options: options["cpus_per_task"], active=local_active))
EXECUTORS_BY_CLUSTER = {"slurm": SLURM, "local": SUBMITIT_LOCAL}
