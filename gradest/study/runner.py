"""Running cells: the cached, atomic, resumable runner of a study's cells, whatever their kind (each kind's `run`,
looked up in `gradest.study.kind`, computes one cell's outputs in its directory).

Cache: `RESULTS/<kind>/<hash>/` where hash is the sha256 of the canonical JSON of the cell's full configuration
(kind, every resolved setting, FORMAT; not a variant's `name`, which is only its label). The cache is shared by
the studies: the same run in two studies (the Switch arm of `lm-convergence` and of `ablations`) is computed once,
and a probe of a trained model trains (or reuses) the `train` cell of its `train` table. A cell directory holds
`cell.json`, the outputs, and `done.json`, written last: a cell is finished iff `done.json` exists. A failing cell
writes `error.json` and is retried on the next run. Every file is written atomically and one process at a time
runs a cell (a lock file), so a run killed at any moment leaves no half file, and re-running finishes each cell
exactly once.

Where the cells run is an executor (`gradest.study.executor`, one module of `executors/` each): `local` runs them
here, in parallel worker processes that die with the runner's process (Ctrl-C stops them at once, their cells
stay unfinished); `slurm` submits them as a job array, each task running its cell through `execute` as well, and
records each submission in the cell (`queued.json`, see `Cell.submission`) for `gradest study status`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gradest.devices import check_device
from gradest.errors import GradestError, one_line
from gradest.study.executor import DEFAULT_EXECUTOR, get_executor, parse_options
from gradest.study.kind import cell_kind
from gradest.study.spec import FORMAT, Cell, Study, parse_shard, results_root, shard


# ------------------------------------------------------------------------------------------------------ running
def execute(cell: Cell, runner: Callable[[dict, Path], dict] | None = None, command=None,
            wait: bool = True) -> tuple[str, str]:
    """Run one cell: cell.json, the runner's outputs, then done.json last (or error.json). ("done" | "failed",
    message). Only Exceptions are recorded: an interrupt (KeyboardInterrupt, a kill) leaves the cell unfinished,
    to be run again. Another process running the cell is waited for, then its result taken; with `wait=False`
    the answer is ("busy", message) at once instead (a queued task, which should not hold its allocation idle)."""
    directory = cell.directory
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        # one process at a time runs a cell: a probe's training run may be wanted by several probe cells (and
        # shards on a shared disk); whoever comes second finds it done
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return "busy", f"another process is running cell {cell.hash} (it holds {directory}/.lock)"
        if cell.done:
            return "done", ""
        return _execute(cell, runner, command)


def _execute(cell: Cell, runner, command) -> tuple[str, str]:
    from gradest.io import run_metadata, write_json
    directory = cell.directory
    write_json(directory / "cell.json", {"kind": cell.kind, "format": FORMAT, "hash": cell.hash,
                                         "config": cell.config})
    start = time.perf_counter()
    try:
        summary = (runner or cell_kind(cell.kind).run)(cell.config, directory)
    except Exception as error:  # noqa: BLE001 - recorded; the other cells go on
        message = one_line(f"{type(error).__name__}: {error}")
        write_json(directory / "error.json", {"error": message, "traceback": traceback.format_exc(),
                                              "seconds": time.perf_counter() - start,
                                              **run_metadata(cell.config, cell.config.get("seed"), command)})
        return "failed", message
    seconds = time.perf_counter() - start
    (directory / "error.json").unlink(missing_ok=True)
    write_json(directory / "done.json", {"summary": summary, "seconds": seconds, "hash": cell.hash,
                                         **run_metadata(cell.config, cell.config.get("seed"), command)})
    return "done", ""


def _check_devices(cells: list[Cell], where: str):
    """Every device the cells ask for (a train or probe cell's, its train table's) is on this machine: a paper
    profile's "cuda" on a laptop fails here, before any cell runs."""
    def devices(config: dict):
        for key, value in config.items():
            if key == "device" and isinstance(value, str):
                yield value
            elif isinstance(value, dict):
                yield from devices(value)

    for cell in cells:
        for device in devices(cell.config):
            try:
                check_device(device)
            except GradestError as error:
                raise GradestError(f"{where}: cell {cell.hash}: {error}") from None


@dataclass
class RunSummary:
    total: int
    skipped: int
    done: list = field(default_factory=list)
    failed: list = field(default_factory=list)  # (hash, message)
    ran: bool = True  # the cells were run to their end here (not only submitted)
    queued: int = 0  # submitted before and still in the queue: not submitted again
    submitted: list = field(default_factory=list)  # hashes of the cells submitted now
    job: str = ""  # the submission's job (array) ids
    logs: str = ""  # where the submission's logs go
    unfinished: list = field(default_factory=list)  # (hash, message): its task ended without finishing it

    def text(self, name: str, profile: str | None) -> str:
        line = f"study {name} (profile {profile or 'base'}): {self.total} cells, {self.skipped} already done"
        if self.queued:
            line += f", {self.queued} already queued"
        if self.job or self.submitted:
            line += f", {len(self.submitted)} submitted" + (f" (job {self.job})" if self.job else "")
        if self.ran:
            line += f", {len(self.done)} run, {len(self.failed)} failed"
            if self.unfinished:
                line += f", {len(self.unfinished)} not finished"
        for digest, message in self.failed:
            line += f"\n  failed {digest}: {message}"
        for digest, message in self.unfinished:
            line += f"\n  not finished {digest}: {message}"
        if self.logs:
            line += f"\nlogs in {self.logs}"
        return line


@contextlib.contextmanager
def cell_progress(summary: RunSummary, count: int, label: str, shown: bool = True):
    """A progress bar over `count` cells and a function `record(cell, status, message)` that counts each one in
    `summary` ("done", "failed", or "unfinished": its process ended without finishing it) and prints a line for it
    (the bar is hidden off a terminal)."""
    from tqdm import tqdm
    bar = tqdm(total=count, desc=f"{label} cells", file=sys.stderr, disable=None if shown else True, leave=False,
               dynamic_ncols=True)

    def record(cell, status, message):
        {"done": lambda: summary.done.append(cell.hash), "failed": lambda: summary.failed.append((cell.hash, message)),
         "unfinished": lambda: summary.unfinished.append((cell.hash, message))}[status]()
        bar.update(1)
        bar.set_postfix(failed=len(summary.failed))
        finished = len(summary.done) + len(summary.failed) + len(summary.unfinished)
        with tqdm.external_write_mode():  # a line per cell: the bar is hidden off a terminal
            print(f"[{finished}/{count}] cell {cell.hash} {status}" + (f": {message}" if message else ""), flush=True)

    try:
        yield record
    finally:
        bar.close()


def run_study(study: Study, profile: str | None = None, results=None, jobs: int | None = None,
              shard_spec: str | None = None, runner: Callable[[dict, Path], dict] | None = None,
              progress: bool = True, command=None, threads: int | None = None, executor: str = DEFAULT_EXECUTOR,
              options: dict | None = None) -> RunSummary:
    """Run every unfinished cell of the profile (of this shard) with `executor` (`gradest.study.executor`; its
    `options` by name, `jobs` being the local executor's); finished cells are skipped. Every cell runs with
    `threads` torch threads (default: the executor's, 1 locally, --cpus-per-task on Slurm), however many run at
    once: the thread count changes a run's last bits (a sum split over more threads is added in another order), so
    a study fixes it, and each cell records it (`done.json`'s environment). Everything is checked (the options,
    every cell) before anything runs, is submitted or is written."""
    chosen = get_executor(executor)
    options = parse_options(chosen, {**(options or {}), **({"jobs": jobs} if jobs is not None else {})})
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise GradestError(f"threads must be an integer >= 1, got {threads!r}")
    profile = study.resolve_profile(profile)
    index, count = parse_shard(shard_spec)
    cells = shard(study.cells(profile, results_root(results)), index, count)
    todo = [cell for cell in cells if not cell.done]
    summary = chosen.run(todo, options, threads or chosen.threads(options), runner=runner, command=command,
                         progress=progress, where=f"study '{study.name}' (profile {profile or 'base'})",
                         results=results_root(results), label=study.name)
    summary.total, summary.skipped = len(cells), len(cells) - len(todo)
    return summary


# ------------------------------------------------------------------------------------------------------ status
def finished(study: Study, profile: str | None, results=None) -> tuple[list[Cell], list[Cell], list[Cell]]:
    """(done, failed, missing) cells of the profile."""
    cells = study.cells(profile, results_root(results))
    done = [c for c in cells if c.done]
    failed = [c for c in cells if c.failed]
    missing = [c for c in cells if not c.done and not c.failed]
    return done, failed, missing


def status_text(study: Study, profile: str | None, results=None) -> str:
    """`gradest study status`: how many of the profile's cells are done, failed, queued (submitted to a queue and
    not finished since) and still to run, in all and per arm (the variant's name, else its estimator, and the
    study's `group_by` values), each failure's error, and the jobs the queued cells are in (those whose job is no
    longer queued or running, where the executor can tell: killed, or out of time)."""
    from tabulate import tabulate
    cells = study.cells(profile, results_root(results))
    states = {cell.hash: "done" if cell.done else "queued" if cell.queued else "failed" if cell.failed else "to run"
              for cell in cells}
    columns = ["done", "failed", *(["queued"] if "queued" in states.values() else []), "to run"]
    arms = {}
    for cell in cells:
        arm = (cell.config.get("name") or cell.config.get("estimator") or cell.kind,
               *(_dotted(cell.config, key) for key in study.group_by))
        arms.setdefault(arm, dict.fromkeys(columns, 0))[states[cell.hash]] += 1
    counts = {column: sum(arm[column] for arm in arms.values()) for column in columns}

    def group(item):  # numbers in order, then names
        return [(0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value)) for value in item[0][1:]]
    rows = sorted(arms.items(), key=group)  # by group; within one, the arms in the cells' order
    table = tabulate([[*arm, *counts.values()] for arm, counts in rows],
                     headers=["arm", *study.group_by, *columns], tablefmt="simple")
    queued = f"{counts['queued']} queued, " if "queued" in counts else ""
    lines = [f"study {study.name} (profile {profile or 'base'}): {counts['done']} of {len(cells)} cells done, "
             f"{counts['failed']} failed, {queued}{counts['to run']} to run", table]
    for cell in cells:
        if states[cell.hash] == "failed":
            error = json.loads((cell.directory / "error.json").read_text()).get("error", "")
            lines.append(f"failed {cell.hash}: {error}")
    lines += _queued_lines([cell for cell in cells if states[cell.hash] == "queued"])
    return "\n".join(lines)


def _queued_lines(cells: list[Cell]) -> list[str]:
    """What `status_text` says of the queued cells: the jobs they were submitted in, and those no longer queued or
    running (asked of each cell's executor)."""
    jobs = {}
    for cell in cells:
        record = cell.submission
        key = (record.get("executor", "?"), str(record.get("array", record.get("job", "?"))))
        jobs.setdefault(key, []).append((cell, record))
    lines, lost = [], []
    for (name, array), queued in jobs.items():
        record = queued[0][1]
        lines.append(f"queued {len(queued)} cell(s) in job {array} (--executor {name}, submitted "
                     f"{record.get('submitted', '?')}; logs in {record.get('logs', '?')})")
        try:
            active = get_executor(name).active([str(r.get("job")) for _, r in queued])
        except GradestError:  # an executor this gradest does not have
            active = None
        if active is not None:
            lost += [cell for cell, r in queued if str(r.get("job")) not in active]
    if lost:
        lines.append(f"{len(lost)} queued cell(s) are in no job still queued or running (killed, out of time or "
                     f"memory? see the logs): `gradest study run` submits them again: "
                     + ", ".join(cell.hash for cell in lost))
    return lines


def _dotted(config: dict, key: str):
    """A cell's value of a setting named by a dotted path (`model.balance_coef`), or "default" where it leaves the
    setting out."""
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return "default"
        value = value[part]
    return value
