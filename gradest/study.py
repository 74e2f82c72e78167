"""Declarative studies: a grid of cells run once each, cached by a hash of their configuration (issue #4 §1).

A spec (`studies/NAME.toml`) has a `[study]` table (name, kind, description), a `[grid]` of lists whose cartesian
product gives the cells, fixed `[settings]`, and `[profiles.quick|full|paper]` tables whose `grid` and `settings`
override the base ones (a key a profile sets in `settings` leaves the grid, and the other way round; tables such as
`model` and `hparams` are merged key by key). The grid key `variant` is special: a list of tables, each merged into
the cell as a whole, for arms that differ in several settings at once (the dense baseline of a training study).

Kinds: "compare" (one cell = a synthetic problem configuration x an estimator spec x a seed: the rows of
`measure.compare`), "probe" (`probe.switch_probe`: task x estimator x experts x top-k x seed; with a `train` table
the probed model is that training run's, at `stage` "init" or "trained", the run being a `train` cell of its own)
and "train" (one `TrainConfig`, trained in the cell's directory and resumed from its checkpoint if killed).

Cache: `RESULTS/<kind>/<hash>/` where hash is the sha256 of the canonical JSON of the cell's full configuration
(kind, every resolved setting, FORMAT; not a variant's `name`, which is only its label). The cache is shared by
the studies: the same run in two studies (the Switch arm of `lm-convergence` and of `ablations`) is computed once,
and a probe of a trained model trains (or reuses) the `train` cell of its `train` table. A cell directory holds
`cell.json`, the outputs, and `done.json`, written last: a cell is finished iff `done.json` exists. A failing cell
writes `error.json` and is retried on the next run. Every file is written atomically and one process at a time
runs a cell (a lock file), so a run killed at any moment leaves no half file, and re-running finishes each cell
exactly once.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
import traceback

import numpy as np
import pandas as pd
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gradest.errors import GradestError, one_line

FORMAT = 1  # bump when a cell's outputs change meaning: every cell is then run again
KINDS = ("compare", "probe", "train")
PROFILES = ("quick", "full", "paper")
DEFAULT_PROFILE = "full"
RESULTS_ENV = "GRADEST_RESULTS"
TOP_KEYS = ("study", "grid", "settings", "profiles")
# findings: what the numbers show, in words; baseline: the run label (train studies) that ratios are taken against
STUDY_KEYS = ("name", "kind", "description", "findings", "baseline")
LABEL_KEYS = ("name",)  # settings that only label a cell: not hashed
PROFILE_KEYS = ("grid", "settings", "description")
PROBLEM_DEFAULTS = {"poly": {"experts": 2}}  # as `gradest compare`: ReinMax's polynomial programming is binary


def _compare_defaults() -> dict:
    from gradest.problems import ProblemConfig
    fields = {f.name: f.default for f in dataclasses.fields(ProblemConfig) if f.name not in ("seed",)}
    return {**fields, "estimator": "all", "samples": 2000, "wrt": "router", "seed": 0, "hparams": {}}


def _probe_defaults() -> dict:
    return {"task": "lm", "estimator": "all", "experts": 4, "top_k": 1, "samples": 256, "seed": 0, "wrt": "router",
            "layer": 0, "draws": 64, "reference": "auto", "batch_size": 2, "seq_len": 8, "score": "sequence",
            "data_seed": 0, "hparams": {}, "model": {}, "train": {}, "stage": "init"}


def _train_defaults() -> dict:
    from gradest.train import TrainConfig
    defaults = {}
    for f in dataclasses.fields(TrainConfig):
        defaults[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return {"name": None, **defaults}


DEFAULTS: dict[str, Callable[[], dict]] = {"compare": _compare_defaults, "probe": _probe_defaults,
                                          "train": _train_defaults}


# --------------------------------------------------------------------------------------------------------- spec
@dataclass
class Cell:
    """One unit of work: its resolved configuration (hashed) and where its results live."""

    kind: str
    config: dict
    hash: str
    directory: Path

    @property
    def done(self) -> bool:
        return (self.directory / "done.json").is_file()

    @property
    def failed(self) -> bool:
        return not self.done and (self.directory / "error.json").is_file()


@dataclass
class Study:
    name: str
    kind: str
    description: str
    grid: dict
    settings: dict
    profiles: dict
    path: Path | None = None
    findings: str = ""  # a person's reading of the full profile's numbers; the report opens with it
    baseline: str = ""  # train studies: ratios (time, FLOPs, steps to its final loss) are against this run

    @property
    def profile_names(self) -> list[str]:
        return list(self.profiles)

    def resolve_profile(self, profile: str | None) -> str | None:
        """The profile to use: the one asked for (which must exist), else `full` if defined, else none."""
        if profile is None:
            return DEFAULT_PROFILE if DEFAULT_PROFILE in self.profiles else None
        if profile not in self.profiles:
            valid = ", ".join(self.profiles) or "(none: this study defines no profiles)"
            raise GradestError(f"unknown profile '{profile}' for study '{self.name}'; valid: {valid}")
        return profile

    def layout(self, profile: str | None) -> tuple[dict, dict]:
        """(grid, settings) of a profile: the base ones with the profile's overrides."""
        grid, settings = copy.deepcopy(self.grid), copy.deepcopy(self.settings)
        override = self.profiles.get(profile, {}) if profile else {}
        p_grid, p_settings = override.get("grid", {}), override.get("settings", {})
        for key, value in p_settings.items():
            grid.pop(key, None)
            settings[key] = merge(settings.get(key), value)
        for key, values in p_grid.items():
            settings.pop(key, None)
            grid[key] = copy.deepcopy(values)
        return grid, settings

    def cells(self, profile: str | None, results: Path) -> list[Cell]:
        """Every cell of the profile, sorted by hash (the order shards split), each configuration once."""
        grid, settings = self.layout(profile)
        defaults = DEFAULTS[self.kind]()
        base = merge(defaults, settings)
        cells = {}
        keys = list(grid)
        given = set(settings) | set(keys) | {k for v in grid.get("variant", []) for k in v}
        for combination in itertools.product(*(grid[key] for key in keys)):
            config = copy.deepcopy(base)
            for key, value in zip(keys, combination):
                if key == "variant":
                    for k, v in value.items():
                        config[k] = merge(config.get(k), v)
                else:
                    config[key] = merge(config.get(key), value)
            cell = make_cell(self.kind, config, results, given)
            cells[cell.hash] = cell
        return [cells[digest] for digest in sorted(cells)]


def make_cell(kind: str, config: dict, results, given=()) -> Cell:
    """The cell of a configuration: resolved and checked, hashed, and where its results live."""
    config = resolve(kind, config, given)
    digest = cell_hash(kind, config)
    return Cell(kind, config, digest, Path(results) / kind / digest)


def merge(old, new):
    """`new`, except that a table updates a table key by key (recursively)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = copy.deepcopy(old)
        for key, value in new.items():
            out[key] = merge(out.get(key), value)
        return out
    return copy.deepcopy(new)


def resolve(kind: str, config: dict, given=()) -> dict:
    """Fill the defaults that depend on other settings, and check the configuration once, before any runs."""
    config = dict(config)
    if kind == "compare":
        from gradest.measure import expand_estimators
        from gradest.problems import PROBLEMS, ProblemConfig
        if config["problem"] not in PROBLEMS:
            raise GradestError(f"unknown problem '{config['problem']}'; valid: {', '.join(PROBLEMS)}")
        for key, value in PROBLEM_DEFAULTS.get(config["problem"], {}).items():
            if key not in given:  # poly's default is 2 categories, as in `gradest compare`
                config[key] = value
        problem = ProblemConfig(**problem_fields(config), seed=config["seed"])
        estimators = "all" if config["estimator"] == "all" else [config["estimator"]]
        expand_estimators(estimators, PROBLEMS[problem.problem].kind, problem.top_k, config["hparams"])
    elif kind == "probe":
        from gradest.probe import probe_estimators
        probe_estimators(config["estimator"] if config["estimator"] == "all" else [config["estimator"]],
                         config["top_k"], config["hparams"])
        if config["stage"] not in STAGES:
            raise GradestError(f"unknown probe stage '{config['stage']}'; valid: {', '.join(STAGES)}")
        if not isinstance(config["train"], dict):
            raise GradestError(f"a probe's train must be a table of training settings, got {config['train']!r}")
        if config["stage"] == "trained" and not config["train"]:
            raise GradestError("probe stage 'trained' needs a train table (the run whose model is probed)")
        if config["train"]:
            valid = [key for key in _train_defaults() if key != "name"]
            _check_keys(config["train"], valid, "a probe's train table")
            resolve("train", probe_train_config(config))
    elif kind == "train":
        from gradest.train import TrainConfig
        TrainConfig(**train_fields(config)).build_estimator()
    return config


def problem_fields(config: dict) -> dict:
    from gradest.problems import ProblemConfig
    return {f.name: config[f.name] for f in dataclasses.fields(ProblemConfig) if f.name != "seed"}


def train_fields(config: dict) -> dict:
    from gradest.train import TrainConfig
    return {f.name: config[f.name] for f in dataclasses.fields(TrainConfig)}


def canonical(data) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def cell_hash(kind: str, config: dict) -> str:
    hashed = {key: value for key, value in config.items() if key not in LABEL_KEYS}
    return hashlib.sha256(canonical({"format": FORMAT, "kind": kind, "config": hashed}).encode()).hexdigest()[:16]


def load_study(path) -> Study:
    """Read and check a spec; every problem is a one-line GradestError naming what is valid."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GradestError(f"no study spec at {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise GradestError(f"{path} is not valid TOML: {error}") from None
    return parse_study(data, path)


def _check_keys(table: dict, valid, where: str):
    if not isinstance(table, dict):
        raise GradestError(f"{where} must be a table")
    for key in table:
        if key not in valid:
            raise GradestError(f"unknown key '{key}' in {where}; valid: {', '.join(valid)}")


def parse_study(data: dict, path: Path | None = None) -> Study:
    source = f" in {path}" if path else ""
    _check_keys(data, TOP_KEYS, f"the spec{source}")
    study = data.get("study", {})
    _check_keys(study, STUDY_KEYS, f"[study]{source}")
    for key in ("name", "kind"):
        if not isinstance(study.get(key), str) or not study.get(key):
            raise GradestError(f"[study] needs a {key}{source}")
    kind = study["kind"]
    if kind not in KINDS:
        raise GradestError(f"unknown study kind '{kind}'{source}; valid: {', '.join(KINDS)}")
    valid = list(DEFAULTS[kind]())
    grid_valid = valid + ["variant"]

    def check_grid(grid: dict, where: str):
        _check_keys(grid, grid_valid, where)
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise GradestError(f"{where} {key} must be a non-empty list, got {values!r}")
            if key == "variant":
                for value in values:  # a variant may be named (a label only, see LABEL_KEYS)
                    _check_keys(value, valid + [k for k in LABEL_KEYS if k not in valid], f"a variant of {where}")

    def check_settings(settings: dict, where: str):
        _check_keys(settings, valid, where)
        for key, value in settings.items():
            if isinstance(value, list):
                raise GradestError(f"{where} {key} is a list; lists of values go in the grid")

    grid, settings = data.get("grid", {}), data.get("settings", {})
    check_grid(grid, f"[grid]{source}")
    check_settings(settings, f"[settings]{source}")
    profiles = data.get("profiles", {})
    _check_keys(profiles, PROFILES, f"[profiles]{source}")
    for name, profile in profiles.items():
        _check_keys(profile, PROFILE_KEYS, f"[profiles.{name}]{source}")
        check_grid(profile.get("grid", {}), f"[profiles.{name}.grid]{source}")
        check_settings(profile.get("settings", {}), f"[profiles.{name}.settings]{source}")
    return Study(name=study["name"], kind=kind, description=study.get("description", ""), grid=grid,
                 settings=settings, profiles=profiles, path=path, findings=study.get("findings", ""),
                 baseline=study.get("baseline", ""))


def results_root(results=None) -> Path:
    return Path(results or os.environ.get(RESULTS_ENV) or "results")


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise GradestError(f"--shard must look like i/N (0 <= i < N), got '{text}'") from None
    if count < 1 or not 0 <= index < count:
        raise GradestError(f"--shard must look like i/N with 0 <= i < N, got '{text}'")
    return index, count


def shard(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """The cells whose position in the hash-sorted list is index mod count."""
    return [cell for position, cell in enumerate(cells) if position % count == index]


# ------------------------------------------------------------------------------------------------------ runners
def run_compare(config: dict, directory: Path) -> dict:
    from gradest.measure import compare
    from gradest.problems import ProblemConfig
    from gradest.report import atomic_write_text
    problem = ProblemConfig(**problem_fields(config), seed=config["seed"])
    estimators = "all" if config["estimator"] == "all" else [config["estimator"]]
    df = compare([problem], estimators, samples=config["samples"], wrt=config["wrt"], seed=config["seed"],
                 settings=config["hparams"])
    atomic_write_text(directory / "results.csv", df.to_csv(index=False))
    return {"rows": len(df), "rel_bias": df["rel_bias"].tolist(), "mse": df["mse"].tolist()}


STAGES = ("init", "trained")


def probe_train_config(config: dict) -> dict | None:
    """The training run a probe cell's model comes from: its `train` table over the train defaults and the probe's
    task, experts, top-k, seed and model (so it is the same cell as that run in a train study). None (an empty
    table): the tiny model of `probe.TINY`, updated by `model`."""
    if not config["train"]:
        return None
    base = {**_train_defaults(), "task": config["task"], "experts": config["experts"], "top_k": config["top_k"],
            "seed": config["seed"], "model": config["model"]}
    return merge(base, config["train"])


def run_probe(config: dict, directory: Path) -> dict:
    """The probe of `probe.switch_probe`, on the tiny model or, with a `train` table, on that run's model at
    initialisation (stage "init") or after training (stage "trained": the train cell is run first unless cached)."""
    from gradest.probe import switch_probe
    from gradest.report import atomic_write_text
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


def run_train(config: dict, directory: Path) -> dict:
    """A Trainer run in `directory/run`, continued from its checkpoint when a previous attempt was killed."""
    from gradest.train import Trainer, TrainConfig
    out = directory / "run"
    if (out / "checkpoint.pt").is_file():
        trainer = Trainer.resume(out)
    else:
        trainer = Trainer(TrainConfig(**train_fields(config)), out)
    try:
        metrics = trainer.run()
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


RUNNERS: dict[str, Callable[[dict, Path], dict]] = {"compare": run_compare, "probe": run_probe, "train": run_train}



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
    from gradest.report import run_metadata, write_json
    directory = cell.directory
    write_json(directory / "cell.json", {"kind": cell.kind, "format": FORMAT, "hash": cell.hash,
                                         "config": cell.config})
    start = time.perf_counter()
    try:
        summary = (runner or RUNNERS[cell.kind])(cell.config, directory)
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


def _init_worker():
    import torch
    torch.set_num_threads(1)


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
    summary = RunSummary(total=len(cells), skipped=len(cells) - len(todo))
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc=f"{study.name} cells", file=sys.stderr, disable=None if progress else True,
               leave=False, dynamic_ncols=True)

    def record(cell, status, message):
        (summary.done.append(cell.hash) if status == "done" else summary.failed.append((cell.hash, message)))
        bar.update(1)
        bar.set_postfix(failed=len(summary.failed))

    try:
        if jobs <= 1 or len(todo) <= 1:
            for cell in todo:
                record(cell, *execute(cell, runner, command))
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker) as pool:
                futures = {pool.submit(execute, cell, runner, command): cell for cell in todo}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        record(futures[future], *future.result())
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
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


# ------------------------------------------------------------------------------------------------------ reports
METRICS = ["rel_bias", "bias_sq", "variance", "mse", "cos_mean", "cos_of_mean", "sec_per_sample"]
COMPARE_KEYS = ["problem", "experts", "tokens", "dim", "out_dim", "classes", "power", "center", "top_k",
                "sharpness", "wrt", "samples", "estimator", "target"]
PROBE_KEYS = ["problem", "experts", "tokens", "top_k", "stage", "layer", "batch_size", "seq_len", "wrt", "samples",
              "reference", "estimator", "target"]
TRAIN_METRICS = ["val_loss", "train_loss", "bleu_val", "bleu_test", "sec_per_update", "seconds"]


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _varying(configs: list[dict], skip=("seed",)) -> list[str]:
    keys = dict.fromkeys(key for config in configs for key in config)
    return [key for key in keys if key not in skip
            and len({canonical(config.get(key)) for config in configs}) > 1]


def _commits(done: list[Cell]) -> str:
    commits = {}
    for cell in done:
        git = _read_json(cell.directory / "done.json").get("git", {})
        label = git.get("commit", "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
        commits[label] = commits.get(label, 0) + 1
    return ", ".join(f"{commit} ({count} cells)" if len(commits) > 1 else commit for commit, count in commits.items())


def _winners(table: pd.DataFrame, groups: list, metric: str) -> str:
    """'st in 3 of 4 configurations, sparsemixer in 1': which estimator (exact excluded) has the lowest mean."""
    counts = {}
    for _, rows in groups:
        rows = rows[~rows["estimator"].astype(str).str.startswith("exact")].dropna(subset=[metric])
        if len(rows):
            best = rows.loc[rows[metric].idxmin(), "estimator"]
            counts[best] = counts.get(best, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} in {count} of {len(groups)} configuration{'s' * (len(groups) > 1)}"
                     for name, count in ranked) or "none"


def _estimator_report(study: Study, done: list[Cell], out: Path) -> tuple[str, str, list[str]]:
    """(summary paragraph, tables markdown, figure files) of a compare or probe study."""
    from gradest.report import (aggregate_seeds, atomic_savefig, atomic_write_text, bias_interval_figure,
                                bias_variance_figure, configuration_label, metric_vs_experts_figure, plus_minus,
                                stage_figure)
    frames = []
    for cell in done:
        frame = pd.read_csv(cell.directory / "results.csv")
        frame["cell"] = cell.hash
        frames.append(frame)
    raw = pd.concat(frames, ignore_index=True)
    keys = [key for key in (COMPARE_KEYS if study.kind == "compare" else PROBE_KEYS) if key in raw]
    # Relative bias over seeds: averaging each seed's sqrt(max(B^2, 0)) would be biased upwards (an unbiased
    # estimator's interval would exclude 0); the noise-corrected B^2 / ||g*||^2 is unbiased per seed, so average
    # that and take the square root of its mean and interval.
    raw["rel_bias_sq"] = raw["bias_sq"] / raw["ref_norm"].pow(2)
    summary = aggregate_seeds(raw, keys, METRICS + ["rel_bias_sq"] + (["sharpness"] if "sharpness" not in keys
                                                                       else []))
    several = summary["seeds"] > 1
    for suffix in ("", "_lo", "_hi"):
        summary.loc[several, "rel_bias" + suffix] = np.sqrt(summary.loc[several, "rel_bias_sq" + suffix].clip(lower=0))
    order = [key for key in ("problem", "experts", "top_k", "sharpness", "stage", "layer") if key in keys]
    summary = summary.sort_values(order, kind="stable", ignore_index=True)  # estimators keep their order
    atomic_write_text(out / "results.csv", raw.to_csv(index=False))
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    config_keys = [key for key in keys if key not in ("estimator", "target")]
    # (the probe's reference, enumeration or Rao-Blackwell, follows from each estimator's objective: a column)
    extra = [key for key in config_keys
             if key not in ("problem", "experts", "tokens", "top_k", "sharpness", "reference")
             and summary[key].nunique(dropna=False) > 1]
    summary["configuration"] = [configuration_label(row) + "".join(f", {key}={row[key]}" for key in extra)
                                for _, row in summary.iterrows()]
    groups = list(summary.groupby("configuration", sort=False))
    tables = []
    for label, rows in groups:
        table = pd.DataFrame({
            "estimator": rows["estimator"], "target": rows["target"],
            **({"reference": rows["reference"]} if "reference" in rows else {}), "seeds": rows["seeds"],
            **{name: [plus_minus(r[m], r[f"{m}_lo"], r[f"{m}_hi"], r["seeds"]) for _, r in rows.iterrows()]
               for name, m in (("relative bias", "rel_bias"), ("variance", "variance"), ("MSE", "mse"),
                               ("cos(mean, exact)", "cos_of_mean"), ("s/sample", "sec_per_sample"))}})
        tables.append(f"### {label}\n\n{table.to_markdown(index=False)}")
    figure_frame = summary.copy()
    figure_frame["problem"] = [row["problem"] + "".join(f", {key}={row[key]}" for key in extra)
                               for _, row in summary.iterrows()]
    files = []
    if "experts" in summary and summary["experts"].nunique() > 1:  # the study's overview: metrics against n
        for name, metric, label, log in (("rel_bias_vs_experts.png", "rel_bias", "relative bias", True),
                                         ("cosine_vs_experts.png", "cos_of_mean", "cos(mean, exact)", False),
                                         ("cost_vs_experts.png", "sec_per_sample", "seconds per sample", True)):
            atomic_savefig(metric_vs_experts_figure(summary, metric, label, log), out / name, dpi=100)
            files.append(name)
    if "stage" in summary and summary["stage"].nunique() > 1:  # the probe at initialisation and after training
        atomic_savefig(stage_figure(summary), out / "rel_bias_by_stage.png", dpi=100)
        files.append("rel_bias_by_stage.png")
    for name, draw in (("bias_variance.png", bias_variance_figure), ("rel_bias.png", bias_interval_figure)):
        atomic_savefig(draw(figure_frame), out / name, dpi=110)
        files.append(name)
    seeds = sorted(raw["seed"].unique()) if "seed" in raw else []
    paragraph = (f"{len(groups)} configuration{'s' * (len(groups) != 1)} x {summary['estimator'].nunique()} "
                 f"estimators x {len(seeds)} seed{'s' * (len(seeds) != 1)} (means over seeds, 95% t-intervals; "
                 f"relative bias is the square root of the mean noise-corrected B^2/||g*||^2 and of its interval). "
                 f"Lowest mean MSE against the exact gradient (exact itself excluded): "
                 f"{_winners(summary, groups, 'mse')}. Lowest mean relative bias: "
                 f"{_winners(summary, groups, 'rel_bias')}.")
    best = summary[~summary["estimator"].astype(str).str.startswith("exact")].dropna(subset=["rel_bias"])
    if len(best):
        lo, hi = best.loc[best["rel_bias"].idxmin()], best.loc[best["rel_bias"].idxmax()]
        paragraph += (f" Relative bias ranges from {lo['rel_bias']:.3g} ({lo['estimator']}, {lo['configuration']}) "
                      f"to {hi['rel_bias']:.3g} ({hi['estimator']}, {hi['configuration']}).")
    data = ("- [results.csv](results.csv): every row of every finished cell (one per estimator, configuration and "
            "seed)\n- [summary.csv](summary.csv): means over seeds with 95% t-intervals (`_lo`, `_hi`), the "
            "tables' numbers")
    return paragraph, "\n\n".join(tables), files, data


NOT_GROUPS = ("variant", "seed", "estimator", "hparams", "omega", "name")  # grid keys that make arms, not groups


def _train_label(config: dict, varying: list[str]) -> str:
    """A run's label: the variant's name (else the estimator), plus the settings that vary beside it. A named
    variant's own settings (e.g. the dense baseline's `model`) are what its name says, so they are not repeated."""
    name = config.get("name") or config["estimator"]
    skip = {"name", "estimator"} | ({"model", "hparams", "omega", "top_k", "experts"} if config.get("name") else set())
    extra = [key for key in varying if key not in skip]
    return name + "".join(f", {key}={canonical(config[key]) if isinstance(config[key], dict) else config[key]}"
                          for key in extra)


def update_seconds(metrics: pd.DataFrame) -> float:
    """A run's time per update: the median over its updates (from the cumulative `seconds` column), which a pause
    caused by other work on the machine does not move, as it would the mean."""
    seconds = np.diff(metrics["seconds"].to_numpy(float), prepend=0.0)
    steps = np.diff(metrics["step"].to_numpy(float), prepend=0.0)
    return float(np.median(seconds / np.maximum(steps, 1)))


def steps_to(curve: pd.DataFrame, target: float) -> float:
    """The first step at which a run's validation loss reaches `target`, interpolated linearly between its
    evaluations (the step of the first evaluation if that one already does); inf if it never does."""
    steps, values = curve["step"].to_numpy(float), curve["val_loss"].to_numpy(float)
    reached = np.flatnonzero(values <= target)
    if not len(reached):
        return math.inf
    i = reached[0]
    if i == 0:
        return float(steps[0])
    return float(steps[i - 1] + (steps[i] - steps[i - 1]) * (values[i - 1] - target) / (values[i - 1] - values[i]))


def _in_group(frame: pd.DataFrame, group: dict) -> np.ndarray:
    mask = np.ones(len(frame), bool)
    for key, value in group.items():
        mask &= (frame[key] == value).to_numpy()
    return mask


def _group_name(row, keys: list[str]) -> str:
    return ", ".join(f"{key}={row[key]}" for key in keys) or "all runs"


def _baseline_ratios(finals: pd.DataFrame, curves: pd.DataFrame, group_keys: list[str],
                     baseline: str) -> pd.DataFrame:
    """Per run: its final validation loss minus the baseline's, time per update and FLOPs per update over the
    baseline's (same group and seed: the same initialisation and data order), the steps it
    takes to reach the baseline's final validation loss over the baseline's steps (inf: never reached), and the
    other way round, the steps the baseline takes to reach the run's final loss over its steps. A
    reference run (one present in a single group, such as the dense baseline) is compared in its group."""
    finals = finals.copy()
    for column in ("val_loss_diff", "time_ratio", "flops_ratio", "steps_ratio", "baseline_steps_ratio"):
        finals[column] = np.nan
    keyed = {}
    for _, row in finals[finals["label"] == baseline].iterrows():
        keyed[(*(row[k] for k in group_keys), row["seed"])] = row
    for index, row in finals.iterrows():
        base = keyed.get((*(row[k] for k in group_keys), row["seed"]))
        if base is None:
            continue
        finals.loc[index, "val_loss_diff"] = row["val_loss"] - base["val_loss"]  # paired: same init and data
        finals.loc[index, "time_ratio"] = row["sec_per_update"] / base["sec_per_update"]
        if "flops_per_update" in finals and np.isfinite(row["flops_per_update"]):
            finals.loc[index, "flops_ratio"] = row["flops_per_update"] / base["flops_per_update"]
        curve = curves[curves["cell"] == row["cell"]]
        finals.loc[index, "steps_ratio"] = steps_to(curve, base["val_loss"]) / base["steps"]
        base_curve = curves[curves["cell"] == base["cell"]]
        finals.loc[index, "baseline_steps_ratio"] = steps_to(base_curve, row["val_loss"]) / base["steps"]
    return finals


def _steps_cell(rows: pd.Series) -> str:
    """The per-seed steps ratio: mean ± half-width when every seed reached the target, else how many did not."""
    from gradest.report import mean_interval, plus_minus
    values = rows.dropna().to_numpy(float)
    if not len(values):
        return "-"
    finite = values[np.isfinite(values)]
    if len(finite) == len(values):
        return plus_minus(*mean_interval(finite))
    text = f"not reached in {len(values) - len(finite)} of {len(values)} seeds"
    return text + (f" (reached: {', '.join(f'{v:.2f}' for v in finite)})" if len(finite) else "")


def _mean_curve_ratio(curves: pd.DataFrame, finals: pd.DataFrame, label: str, group: dict, baseline: str) -> float:
    """The steps ratio of the mean curves over seeds: the steps the seed-mean validation curve of `label` takes to
    reach the seed-mean final loss of the baseline, over the baseline's steps."""
    base = finals[_in_group(finals, group) & (finals["label"] == baseline).to_numpy()]
    run = curves[_in_group(curves, group) & (curves["label"] == label).to_numpy()]
    if base.empty or run.empty:
        return float("nan")
    mean_curve = run.groupby("step", as_index=False)["val_loss"].mean()
    return steps_to(mean_curve, float(base["val_loss"].mean())) / float(base["steps"].max())


def _train_runs(done: list[Cell], group_keys: list[str], label_keys: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(finals, curves): one row per run with its final numbers, and its validation curve, both labelled."""
    finals, curves = [], []
    for cell in done:
        label = _train_label(cell.config, label_keys)
        metrics = pd.read_csv(cell.directory / "run" / "metrics.csv")
        summary = _read_json(cell.directory / "done.json")
        final = metrics.iloc[-1]
        groups = {key: cell.config[key] for key in group_keys}
        row = {**groups, "label": label, "seed": cell.config["seed"], "cell": cell.hash, "steps": int(final["step"]),
               "val_loss": final["val_loss"], "train_loss": final["train_loss"],
               "sec_per_update": update_seconds(metrics), "seconds": summary["seconds"],
               "flops_per_update": summary["summary"].get("flops_per_update", np.nan)}
        for key in ("bleu_val", "bleu_test"):
            if key in metrics:
                row[key] = final[key]
        finals.append(row)
        points = metrics.dropna(subset=["val_loss"])[["step", "val_loss", "train_loss"]].copy()
        for key, value in {"cell": cell.hash, **groups, "label": label, "seed": cell.config["seed"]}.items():
            points[key] = value
        curves.append(points)
    finals = pd.DataFrame(finals)
    if finals["flops_per_update"].notna().any():
        finals["gflops_per_update"] = finals["flops_per_update"] / 1e9
    return finals, pd.concat(curves, ignore_index=True)


def _train_figures(study: Study, summary: pd.DataFrame, curves: pd.DataFrame, group_rows: list[dict],
                   group_keys: list[str], references: set, baseline: str, convergence: bool, out: Path) -> list[str]:
    """Validation curves (a panel per group; a reference run in every panel), and the metrics against n when n
    varies, else the ratios against the baseline."""
    from gradest.report import atomic_savefig, curves_figure, metric_vs_experts_figure, ratios_figure
    panels = {}
    for group in group_rows:
        mask = _in_group(curves, group) | curves["label"].isin(references).to_numpy()
        panels[_group_name(group, group_keys)] = {label: frame for label, frame in
                                                  curves[mask].groupby("label", sort=False)}
    atomic_savefig(curves_figure(panels), out / "val_loss.png", dpi=110)
    figures = ["val_loss.png"]
    if "experts" in group_keys:
        frame = summary.copy()
        others = [key for key in group_keys if key != "experts"]
        frame["problem"] = [_group_name(r, others) if others else study.name for _, r in frame.iterrows()]
        frame["estimator"] = frame["label"]
        spread = [frame[~frame["label"].isin(references)]]
        for label in references:  # a reference (n-independent) run drawn flat across n
            row = frame[frame["label"] == label]
            spread += [row.assign(experts=n) for n in sorted(frame["experts"].unique())]
        frame = pd.concat(spread, ignore_index=True)
        for name, metric, ylabel, log in (("val_loss_vs_experts.png", "val_loss", "final validation loss", False),
                                          ("val_loss_diff_vs_experts.png", "val_loss_diff",
                                           f"final validation loss - {baseline}'s (paired)", False),
                                          ("time_ratio_vs_experts.png", "time_ratio",
                                           f"time per update / {baseline}'s", True),
                                          ("flops_ratio_vs_experts.png", "flops_ratio",
                                           f"FLOPs per update / {baseline}'s", True)):
            wanted = {"val_loss": convergence or not baseline, "val_loss_diff": convergence}.get(metric, bool(baseline))
            if wanted and metric in frame and frame[metric].notna().any():
                atomic_savefig(metric_vs_experts_figure(frame, metric, ylabel, log), out / name, dpi=100)
                figures.append(name)
    elif baseline:
        metrics = [m for m in (("val_loss_diff",) if convergence else ()) + ("time_ratio", "flops_ratio")
                   if m in summary and summary[m].notna().any()]
        atomic_savefig(ratios_figure(summary, baseline, metrics), out / "ratios.png", dpi=100)
        figures.append("ratios.png")
    return figures


def _train_report(study: Study, done: list[Cell], out: Path, profile: str | None = None):
    from gradest.report import aggregate_seeds, atomic_write_text, plus_minus
    varying = _varying([cell.config for cell in done], skip=("seed", "name"))
    grid, _ = study.layout(profile)
    group_keys = [key for key in grid if key not in NOT_GROUPS and key in varying]
    finals, curves = _train_runs(done, group_keys, [key for key in varying if key not in group_keys])
    group_rows = finals[group_keys].drop_duplicates().sort_values(group_keys).to_dict("records") if group_keys \
        else [{}]
    label_groups = finals.groupby("label")[group_keys].apply(lambda g: len(g.drop_duplicates())) if group_keys \
        else pd.Series(dtype=int)
    references = {label for label, count in label_groups.items() if count == 1 and len(group_rows) > 1}
    baseline = study.baseline if study.baseline in set(finals["label"]) else ""
    if baseline:
        finals = _baseline_ratios(finals, curves, group_keys, baseline)
    metric_names = [m for m in TRAIN_METRICS + ["gflops_per_update", "val_loss_diff", "time_ratio", "flops_ratio"]
                    if m in finals]
    summary = aggregate_seeds(finals, group_keys + ["label"], metric_names)
    summary = summary.sort_values(group_keys + ["val_loss"], kind="stable", ignore_index=True)
    # steps to the baseline's loss need learning curves: not for short timing runs with one evaluation
    convergence = bool(baseline) and curves.groupby("cell").size().min() >= 3
    if convergence:
        def runs_of(r):
            return finals[_in_group(finals, {k: r[k] for k in group_keys}) & (finals["label"] == r["label"]).to_numpy()]
        summary["steps_ratio"] = [_steps_cell(runs_of(r)["steps_ratio"]) for _, r in summary.iterrows()]
        summary["baseline_steps_ratio"] = [_steps_cell(runs_of(r)["baseline_steps_ratio"])
                                           for _, r in summary.iterrows()]
        summary["steps_ratio_mean_curves"] = [
            _mean_curve_ratio(curves, finals, r["label"], {k: r[k] for k in group_keys}, baseline)
            for _, r in summary.iterrows()]
    atomic_write_text(out / "results.csv", finals.to_csv(index=False))
    atomic_write_text(out / "curves.csv", curves.to_csv(index=False))
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    columns = {"final validation loss": "val_loss"}
    if convergence:
        columns[f"minus {baseline}'s (paired by seed)"] = "val_loss_diff"
    columns["final train loss"] = "train_loss"
    if "bleu_test" in summary:
        columns.update({"BLEU val": "bleu_val", "BLEU test": "bleu_test"})
    columns["s/update (median)"] = "sec_per_update"
    if baseline:
        columns[f"time/update vs {baseline}"] = "time_ratio"
    if "gflops_per_update" in summary:
        columns["GFLOPs/update"] = "gflops_per_update"
        if baseline:
            columns[f"FLOPs vs {baseline}"] = "flops_ratio"
    columns["total s"] = "seconds"
    tables, ranked = [], []
    for group in group_rows:
        rows = summary[_in_group(summary, group)]
        table = pd.DataFrame({"run": rows["label"], "seeds": rows["seeds"],
                              **{name: [plus_minus(r[m], r[f"{m}_lo"], r[f"{m}_hi"], r["seeds"])
                                        for _, r in rows.iterrows()] for name, m in columns.items()}})
        if convergence:
            table.insert(4, f"steps to {baseline}'s final loss (ratio, per seed)", rows["steps_ratio"].tolist())
            table.insert(5, "(ratio, mean curves)", [f"{v:.3g}" if np.isfinite(v) else "not reached"
                                                     for v in rows["steps_ratio_mean_curves"]])
            table.insert(6, f"{baseline}'s steps to this run's final loss (ratio)",
                         rows["baseline_steps_ratio"].tolist())
        heading = f"### {_group_name(group, group_keys)}" if group_keys else "### Final numbers"
        tables.append(f"{heading}\n\n{table.to_markdown(index=False)}")
        ranked.append((f"{_group_name(group, group_keys)}: " if group_keys else "") + "; ".join(
            f"{r['label']} {plus_minus(r['val_loss'], r['val_loss_lo'], r['val_loss_hi'], r['seeds'])}"
            for _, r in rows.iterrows()))
    figures = _train_figures(study, summary, curves, group_rows, group_keys, references, baseline, convergence, out)
    steps = sorted(finals["steps"].unique())
    paragraph = (f"{finals['label'].nunique()} arms{f' x {len(group_rows)} groups' if group_keys else ''} x up to "
                 f"{int(summary['seeds'].max())} seed(s), {'/'.join(str(s) for s in steps)} steps. Final validation "
                 f"loss (nats per token, mean ± 95% t-interval half-width over seeds), lowest first: "
                 + " | ".join(ranked) + ".")
    if baseline:
        paragraph += f" Ratios are against `{baseline}` in the same group and seed."
    if convergence:
        paragraph += (f" The steps ratio is the first step (interpolated between evaluations) at which a run's "
                      f"validation loss reaches `{baseline}`'s final one, over `{baseline}`'s steps: below 1 is "
                      f"faster (the paper's \"2x faster\" is 0.5). A run that never reaches it is slower; the next "
                      f"column says how much: the fraction of its steps `{baseline}` needed to reach that run's "
                      f"final loss. `{baseline}` itself can score below 1 when its curve dips under its final "
                      f"value earlier.")
    data = ("- [results.csv](results.csv): final numbers of every finished run (one row per seed)\n"
            "- [curves.csv](curves.csv): validation (and train) loss at every evaluation of every run\n"
            "- [summary.csv](summary.csv): means over seeds with 95% t-intervals (`_lo`, `_hi`), the table's numbers")
    return paragraph, "\n\n".join(tables), figures, data


def write_report(study: Study, profile: str | None = None, results=None, out=None, command=None) -> Path:
    """reports/<name>/README.md with tables, figures and the CSVs, from the finished cells of the profile."""
    from gradest.report import atomic_write_text, run_metadata, write_json
    profile = study.resolve_profile(profile)
    done, failed, missing = finished(study, profile, results)
    if not done:
        raise GradestError(f"no finished cells of study '{study.name}' (profile {profile or 'base'}) in "
                           f"{results_root(results) / study.kind}/; run `gradest study run "
                           f"{study.path or study.name}"
                           f"{f' --profile {profile}' if profile else ''}` first")
    out = Path(out or Path("reports") / study.name)
    if study.kind == "train":
        paragraph, tables, figures, data = _train_report(study, done, out, profile)
    else:
        paragraph, tables, figures, data = _estimator_report(study, done, out)
    for stale in set(out.glob("*.png")) - {out / name for name in figures}:  # a figure this report no longer has
        stale.unlink()
    total = len(done) + len(failed) + len(missing)
    status = f"{len(done)} of {total} cells finished"
    if failed or missing:
        status += f" ({len(failed)} failed, {len(missing)} not run: the numbers cover the finished cells only)"
    spec = study.path.as_posix() if study.path else study.name
    text = "\n\n".join([
        f"# {study.name}",
        study.description.strip(),
        *([f"**What the numbers show** (profile `{DEFAULT_PROFILE}`). {study.findings.strip()}"]
          if study.findings.strip() and profile == DEFAULT_PROFILE else []),
        paragraph,
        f"Study `{spec}`, profile `{profile or 'base'}`, kind `{study.kind}`; {status}; cells computed at "
        f"commit {_commits(done)}. Regenerate with `gradest report {spec}"
        f"{f' --profile {profile}' if profile else ''}` (or `gradest figures`).",
        "## Tables",
        tables,
        "## Figures",
        "\n\n".join(f"![{name}]({name})" for name in figures),
        "## Data",
        data,
    ]) + "\n"
    if failed:
        text += "\n## Failed cells\n\n" + "\n".join(
            f"- `{cell.hash}`: {_read_json(cell.directory / 'error.json')['error']}" for cell in failed) + "\n"
    atomic_write_text(out / "README.md", text)
    write_json(out / "report.json", {"study": spec, "profile": profile, "results": str(results_root(results)),
                                     "cells": {"done": len(done), "failed": len(failed), "missing": len(missing)},
                                     **run_metadata({"study": spec, "profile": profile}, None, command)})
    return out


def regenerate(reports="reports", results=None, command=None) -> tuple[list[Path], list[str]]:
    """Every report under `reports` (one with a report.json) rebuilt from the cached results: (written, skipped
    with the reason)."""
    written, skipped = [], []
    for meta_path in sorted(Path(reports).glob("*/report.json")):
        meta = _read_json(meta_path)
        try:
            study = load_study(meta["study"])
            written.append(write_report(study, meta.get("profile"), results, meta_path.parent, command))
        except GradestError as error:
            skipped.append(f"{meta_path.parent}: {error}")
    return written, skipped
