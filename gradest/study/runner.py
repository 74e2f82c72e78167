"""Running cells: the registry of cell kinds, and the cached, atomic, resumable runner of a study's cells.

Kinds: "compare" (one cell = a synthetic problem configuration x an estimator spec x a seed: the rows of
`measure.compare`), "probe" (`probe.switch_probe`: task x estimator x experts x top-k x seed; with a `train` table
the probed model is that training run's, at `stage` "init" or "trained", the run being a `train` cell of its own),
"train" (one `TrainConfig`, trained in the cell's directory and resumed from its checkpoint if killed) and
"hf-probe" (`gradest.hf.probe.hf_probe` on one MoE layer of a Hugging Face model built at random initialisation).

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
from typing import Callable, Collection

from gradest.devices import check_device
from gradest.errors import GradestError, one_line
from gradest.study.spec import (FORMAT, Cell, Study, _compare_defaults, _hf_probe_defaults, _probe_defaults,
                                _resolve_compare, _resolve_hf_probe, _resolve_probe, _resolve_train, _train_defaults,
                                make_cell, parse_shard, probe_train_config, problem_fields, results_root, shard,
                                train_fields)


# ------------------------------------------------------------------------------------------------------ runners
def run_compare(config: dict, directory: Path) -> dict:
    from gradest.measure import compare
    from gradest.problems import ProblemConfig
    from gradest.io import atomic_write_text
    problem = ProblemConfig(**problem_fields(config), seed=config["seed"])
    estimators = "all" if config["estimator"] == "all" else [config["estimator"]]
    df = compare([problem], estimators, samples=config["samples"], wrt=config["wrt"], seed=config["seed"],
                 settings=config["hparams"])
    atomic_write_text(directory / "results.csv", df.to_csv(index=False))
    return {"rows": len(df), "rel_bias": df["rel_bias"].tolist(), "mse": df["mse"].tolist()}


def run_probe(config: dict, directory: Path) -> dict:
    """The probe of `probe.switch_probe`, on the tiny model or, with a `train` table, on that run's model at
    initialisation (stage "init") or after training (stage "trained": the train cell is run first unless cached)."""
    from gradest.probe import switch_probe
    from gradest.io import atomic_write_text
    from gradest.train import Trainer, TrainConfig
    estimators = "all" if config["estimator"] == "all" else [config["estimator"]]
    train, trainer, model = probe_train_config(config), None, config["model"] or None
    if train is not None:
        model = None  # the run's model settings are in its TrainConfig
        cell = make_cell("train", train, directory.parent.parent)
        if config["stage"] == "trained":
            status, message = execute(cell)
            if status == "failed":
                raise GradestError(f"the training run of this probe (cell {cell.hash}) failed: {message}")
            if not (cell.directory / "run" / "checkpoint.pt").is_file():
                raise GradestError(f"the trained model's checkpoint is missing from {cell.directory}/run; delete "
                                   f"that cell's directory to train it again")
            trainer = Trainer.resume(cell.directory / "run")
        else:
            import torch
            with torch.random.fork_rng(devices=[]):  # a Trainer seeds the global RNG
                trainer = Trainer(TrainConfig(**train_fields(train)), cell.directory / "run")
    df = switch_probe(config["task"], estimators=estimators, samples=config["samples"], seed=config["seed"],
                      trainer=trainer, layer=config["layer"], batch_size=config["batch_size"],
                      seq_len=config["seq_len"], experts=config["experts"], top_k=config["top_k"], config=model,
                      reference=config["reference"], draws=config["draws"], wrt=config["wrt"],
                      settings=config["hparams"], score=config["score"], data_seed=config["data_seed"])
    df.insert(df.columns.get_loc("layer") + 1, "stage", config["stage"] if train is not None else "init")
    atomic_write_text(directory / "results.csv", df.to_csv(index=False))
    return {"rows": len(df), "rel_bias": df["rel_bias"].tolist(), "mse": df["mse"].tolist()}


def run_hf_probe(config: dict, directory: Path) -> dict:
    """`gradest compare --problem hf` on the cell's model (`gradest.hf.models.load_model`: built by name at random
    initialisation, seeded by `seed`); its rows' problem is `hf-<hf>`. The cell's time and its process's peak memory
    (resident set) are columns and in the summary: the full-size models' cost is part of what such a study reports."""
    import resource
    from gradest.hf.models import NAMED, load_model
    from gradest.hf.probe import hf_probe, model_batch
    from gradest.io import atomic_write_text
    start = time.perf_counter()
    k = None if config["hf"] in NAMED else config["top_k"]  # a full-size model routes its own k
    model = load_model(config["hf"], k=k, seed=config["seed"], settings=config["hf_settings"])
    model = model.to(config.get("device", "cpu"))
    built = time.perf_counter() - start
    df = hf_probe(model, model_batch(model, config["batch_size"], config["seq_len"], config["data_seed"]),
                  config["layer"], config["estimator"], config["samples"], wrt=config["wrt"],
                  reference=config["reference"], draws=config["draws"], seed=config["seed"], top_k=config["top_k"],
                  settings=config["hparams"], score=config["score"])
    parameters = sum(p.numel() for p in model.parameters())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kilobytes on Linux; host memory
    seconds = time.perf_counter() - start
    df["problem"] = f"hf-{config['hf']}"
    df["parameters"], df["cell_seconds"], df["build_seconds"], df["peak_rss_gb"] = parameters, seconds, built, peak_gb
    atomic_write_text(directory / "results.csv", df.to_csv(index=False))
    return {"rows": len(df), "parameters": parameters, "seconds": seconds, "peak_rss_gb": peak_gb,
            "rel_bias": df["rel_bias"].tolist(), "reference_se": df["reference_se"].tolist()}


def run_train(config: dict, directory: Path) -> dict:
    """A Trainer run in `directory/run`, continued from its checkpoint when a previous attempt was killed."""
    from gradest.train import Trainer, TrainConfig
    out = directory / "run"
    if (out / "checkpoint.pt").is_file():
        trainer = Trainer.resume(out)
    else:
        trainer = Trainer(TrainConfig(**train_fields(config)), out)
    start = time.perf_counter()
    name = f"cell {directory.name} ({config.get('name') or config['estimator']}, seed {config['seed']})"

    def on_eval(row):  # one line per evaluation, as `gradest run` prints: a study's captured log shows each run go
        print(f"{name} {trainer.evaluation_line(row, time.perf_counter() - start)}", flush=True)

    try:
        metrics = trainer.run(on_eval=on_eval)
    finally:
        trainer.close()
    final = metrics.iloc[-1]
    summary = {"steps": int(final["step"]), "train_loss": float(final["train_loss"]),
               "val_loss": float(final["val_loss"]), "train_seconds": float(final["seconds"]),
               "sec_per_update": float(final["seconds"]) / max(1, int(final["step"])),
               "flops_per_update": trainer.flops_per_update()}
    for key in ("bleu_val", "bleu_test"):
        if key in final:
            summary[key] = float(final[key])
    return summary


# -------------------------------------------------------------------------------------------------------- kinds
@dataclass(frozen=True)
class CellKind:
    """A kind of cell: everything that differs between "compare", "probe" and "train" cells, looked up by the kind's
    name (a study's `kind`) instead of branching on it.

      name      the study kind, and the cache's directory of these cells (`RESULTS/<name>/<hash>/`);
      defaults  every setting of such a cell with its default value (the keys a spec may set);
      resolve   (config, given) -> config: fills the defaults that depend on other settings (`given`: the keys the
                spec sets) and checks the configuration (one-line GradestErrors), before anything runs;
      run       (config, directory) -> summary: computes the cell's outputs in its directory; the summary goes in
                done.json;
      report    (study, finished cells or None, out, profile) -> (paragraph, tables, figure files, data): the
                sections of the study's report, its CSVs and figures written in `out`; given None, rendered from
                the data files already in `out` (`gradest figures`).
    """

    name: str
    defaults: Callable[[], dict]
    resolve: Callable[[dict, Collection[str]], dict]
    run: Callable[[dict, Path], dict]
    report: Callable[[Study, list[Cell], Path, str | None], tuple[str, str, list[str], str]]


CELL_KINDS: dict[str, CellKind] = {}


def register_cell_kind(kind: CellKind) -> CellKind:
    """Add a kind of cell under its (new) name: studies of that kind then parse, run and report."""
    if kind.name in CELL_KINDS:
        raise ValueError(f"a cell kind '{kind.name}' is already registered")
    CELL_KINDS[kind.name] = kind
    return kind


def _report(name: str) -> Callable:
    """The report function `reports.<name>`, imported when called (the reports module imports this one)."""
    def report(study, done, out, profile=None):
        from gradest.study import reports
        return getattr(reports, name)(study, done, out, profile)
    return report


register_cell_kind(CellKind("compare", defaults=_compare_defaults, resolve=_resolve_compare, run=run_compare,
                            report=_report("_compare_report")))
register_cell_kind(CellKind("probe", defaults=_probe_defaults, resolve=_resolve_probe, run=run_probe,
                            report=_report("_probe_report")))
register_cell_kind(CellKind("train", defaults=_train_defaults, resolve=_resolve_train, run=run_train,
                            report=_report("_train_report")))
register_cell_kind(CellKind("hf-probe", defaults=_hf_probe_defaults, resolve=_resolve_hf_probe, run=run_hf_probe,
                            report=_report("_probe_report")))


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
        summary = (runner or CELL_KINDS[cell.kind].run)(cell.config, directory)
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


def _init_worker(parent: int):
    """A worker process: one torch thread; it dies with the study's process (else, that one killed, it would run
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
    torch.set_num_threads(1)


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
              command=None) -> RunSummary:
    """Run every unfinished cell of the profile (of this shard); finished cells are skipped."""
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
            for cell in todo:
                record(cell, *execute(cell, runner, command))
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                                        initargs=(os.getpid(),)) as pool:
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
