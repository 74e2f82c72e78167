"""Running cells: the cached, atomic, resumable runner of a study's cells, whatever their kind (each kind's `run`,
looked up in `gradest.study.kind`, computes one cell's outputs in its directory).

Cache: `RESULTS/<kind>/<hash>/` where hash is the sha256 of the canonical JSON of the cell's full configuration
(kind, every resolved setting, FORMAT; not a variant's `name`, which is only its label). The cache is shared by
the studies: the same run in two studies (the Switch arm of `lm-convergence` and of `ablations`) is computed once,
and a probe of a trained model trains (or reuses) the `train` cell of its `train` table. A cell directory holds
`cell.json`, the outputs, and `done.json`, written last: a cell is finished iff `done.json` exists. A failing cell
writes `error.json` and is retried on the next run. Every file is written atomically and one process at a time
runs a cell (a lock file), so a run killed at any moment leaves no half file, and re-running finishes each cell
exactly once. Parallel cells run in worker processes that die with the runner's process, and Ctrl-C stops them at
once (their cells stay unfinished).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gradest.devices import check_device
from gradest.errors import GradestError, one_line
from gradest.study.kind import cell_kind
from gradest.study.spec import FORMAT, Cell, Study, parse_shard, results_root, shard



# ------------------------------------------------------------------------------------------------------ running
def execute(cell: Cell, runner: Callable[[dict, Path], dict] | None = None, command=None) -> tuple[str, str]:
    """Run one cell: cell.json, the runner's outputs, then done.json last (or error.json). ("done" | "failed",
    message). Only Exceptions are recorded: an interrupt (KeyboardInterrupt, a kill) leaves the cell unfinished,
    to be run again."""
    directory = cell.directory
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        # one process at a time runs a cell: a probe's training run may be wanted by several probe cells (and
        # shards on a shared disk); whoever comes second finds it done
        fcntl.flock(lock, fcntl.LOCK_EX)
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


def _init_worker(parent: int, threads: int):
    """A worker process: `threads` torch threads (the study's, see `run_study`); it dies with the study's process (else, that one killed, it would run
    the queued cells and then wait forever), and leaves Ctrl-C to it (which stops the workers, `_stop_workers`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the kernel sends SIGTERM when the parent dies
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    else:  # elsewhere a watchdog thread notices the parent is gone (the worker is re-parented)
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the worker asked to die with it
        os._exit(1)
    import torch
    torch.set_num_threads(threads)


def _stop_workers(pool: concurrent.futures.ProcessPoolExecutor):
    """Cancel the queued cells and end the running ones now, instead of waiting for them (as leaving the pool's
    `with` would): their cells stay unfinished (no done.json), to be run again."""
    for process in list((pool._processes or {}).values()):  # no public way before Python 3.14's terminate_workers
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


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

    def text(self, name: str, profile: str | None) -> str:
        line = (f"study {name} (profile {profile or 'base'}): {self.total} cells, {self.skipped} already done, "
                f"{len(self.done)} run, {len(self.failed)} failed")
        for digest, message in self.failed:
            line += f"\n  failed {digest}: {message}"
        return line


def run_study(study: Study, profile: str | None = None, results=None, jobs: int = 1, shard_spec: str | None = None,
              runner: Callable[[dict, Path], dict] | None = None, progress: bool = True,
              command=None, threads: int = 1) -> RunSummary:
    """Run every unfinished cell of the profile (of this shard); finished cells are skipped. Every cell runs with
    `threads` torch threads, however many run at once (`jobs`): the thread count changes a run's last bits (a sum
    split over more threads is added in another order), so a study fixes it, and each cell records it
    (`done.json`'s environment)."""
    profile = study.resolve_profile(profile)
    index, count = parse_shard(shard_spec)
    cells = shard(study.cells(profile, results_root(results)), index, count)
    todo = [cell for cell in cells if not cell.done]
    _check_devices(todo, f"study '{study.name}' (profile {profile or 'base'})")
    summary = RunSummary(total=len(cells), skipped=len(cells) - len(todo))
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc=f"{study.name} cells", file=sys.stderr, disable=None if progress else True,
               leave=False, dynamic_ncols=True)

    def record(cell, status, message):
        (summary.done.append(cell.hash) if status == "done" else summary.failed.append((cell.hash, message)))
        bar.update(1)
        bar.set_postfix(failed=len(summary.failed))
        finished = len(summary.done) + len(summary.failed)
        with tqdm.external_write_mode():  # a line per cell: the bar is hidden off a terminal
            print(f"[{finished}/{len(todo)}] cell {cell.hash} {status}" + (f": {message}" if message else ""),
                  flush=True)

    try:
        if jobs <= 1 or len(todo) <= 1:
            import torch
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for cell in todo:
                    record(cell, *execute(cell, runner, command))
            finally:
                torch.set_num_threads(previous)
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                                        initargs=(os.getpid(), threads)) as pool:
                try:
                    futures = {pool.submit(execute, cell, runner, command): cell for cell in todo}
                    for future in concurrent.futures.as_completed(futures):
                        record(futures[future], *future.result())
                except BaseException:  # Ctrl-C (KeyboardInterrupt), a worker that died
                    _stop_workers(pool)
                    raise
    except concurrent.futures.process.BrokenProcessPool:
        raise GradestError("a worker process died (killed or out of memory); run the study again to finish "
                           "the remaining cells") from None
    finally:
        bar.close()
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
    """`gradest study status`: how many of the profile's cells are done, failed and still to run, in all and per
    arm (the variant's name, else its estimator, and the study's `group_by` values), and each failure's error."""
    from tabulate import tabulate
    cells = study.cells(profile, results_root(results))
    arms = {}
    for cell in cells:
        arm = (cell.config.get("name") or cell.config.get("estimator") or cell.kind,
               *(_dotted(cell.config, key) for key in study.group_by))
        state = "done" if cell.done else "failed" if cell.failed else "to run"
        arms.setdefault(arm, {"done": 0, "failed": 0, "to run": 0})[state] += 1
    failed = [cell for cell in cells if cell.failed]
    done = sum(counts["done"] for counts in arms.values())

    def group(item):  # numbers in order, then names
        return [(0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value)) for value in item[0][1:]]
    rows = sorted(arms.items(), key=group)  # by group; within one, the arms in the cells' order
    table = tabulate([[*arm, *counts.values()] for arm, counts in rows],
                     headers=["arm", *study.group_by, "done", "failed", "to run"], tablefmt="simple")
    lines = [f"study {study.name} (profile {profile or 'base'}): {done} of {len(cells)} cells done, "
             f"{len(failed)} failed, {len(cells) - done - len(failed)} to run", table]
    for cell in failed:
        error = json.loads((cell.directory / "error.json").read_text()).get("error", "")
        lines.append(f"failed {cell.hash}: {error}")
    return "\n".join(lines)


def _dotted(config: dict, key: str):
    """A cell's value of a setting named by a dotted path (`model.balance_coef`), or "default" where it leaves the
    setting out."""
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return "default"
        value = value[part]
    return value
