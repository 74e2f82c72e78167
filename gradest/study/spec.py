"""Study specs: a spec read and checked, its profiles, and its cells (each resolved, hashed, and placed in the cache).

A spec (`studies/NAME.toml`) has a `[study]` table (name, kind, description), a `[grid]` of lists whose cartesian
product gives the cells, fixed `[settings]`, and `[profiles.quick|full|paper]` tables whose `grid` and `settings`
override the base ones (a key a profile sets in `settings` leaves the grid, and the other way round; tables such as
`model` and `hparams` are merged key by key). The grid key `variant` is special: a list of tables, each merged into
the cell as a whole, for arms that differ in several settings at once (the dense baseline of a training study).

What differs between the kinds of cell (their settings and defaults, their checks) is looked up in the registry of
`runner.CELL_KINDS`; the per-kind defaults and checks it refers to are defined here.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gradest.errors import GradestError

FORMAT = 1  # bump when a cell's outputs change meaning: every cell is then run again
PROFILES = ("quick", "full", "paper")
DEFAULT_PROFILE = "full"
RESULTS_ENV = "GRADEST_RESULTS"
TOP_KEYS = ("study", "grid", "settings", "profiles")
# findings: what the numbers show, in words; baseline: the run label (train studies) that ratios are taken against;
# group_by: the settings (`model.balance_coef` for a model setting) whose values group a train study's report
STUDY_KEYS = ("name", "kind", "description", "findings", "baseline", "group_by")
LABEL_KEYS = ("name",)  # settings that only label a cell: not hashed
PROFILE_KEYS = ("grid", "settings", "description")
PROBLEM_DEFAULTS = {"poly": {"experts": 2}}  # as `gradest compare`: ReinMax's polynomial programming is binary
STAGES = ("init", "trained")  # a probe's model: its training run's at initialisation, or trained
DEVICE_TYPES = ("cpu", "cuda", "mps")


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
    # train studies: the settings whose values group the report's runs (the baseline is paired within a group);
    # empty: the grid's keys other than those that make arms (variant, seed, estimator, ...)
    group_by: list = dataclasses.field(default_factory=list)

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
        defaults = _kinds()[self.kind].defaults()
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
            try:
                cell = make_cell(self.kind, config, results, given)
            except GradestError as error:  # name the cell: the grid values that make it
                label = ", ".join(f"{key}={canonical(value)}" for key, value in zip(keys, combination))
                raise GradestError(f"study '{self.name}' (profile {profile or 'base'}), "
                                   f"{f'cell [{label}]' if label else 'its cell'}: {error}") from None
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
    """Fill the defaults that depend on other settings, and check the configuration once, before any runs: every
    setting's type (`check_types`), then the kind's checks (its configs' own, e.g. ProblemConfig's)."""
    kind = _kinds()[kind]
    check_types(config, kind.defaults())
    return kind.resolve(dict(config), given)


# settings whose default None means "unset": the type a spec may set them to (TOML has no null)
OPTIONAL_TYPES = {"name": str, "omega": bool, "capacity_factor": float, "preset": str, "top_k": int,
                  "device": str}
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table"}


def check_types(table: dict, defaults: dict, prefix: str = ""):
    """Each setting has the type of its default (an integer may stand for a number, true is not an integer), so
    `samples = "lots"` is an error before any cell runs. Keys that only label a cell are not checked."""
    for key, value in table.items():
        if key not in defaults:
            if key in LABEL_KEYS:
                continue
            raise GradestError(f"unknown key '{prefix}{key}'; valid: {', '.join(prefix + k for k in defaults)}")
        if value is None and defaults[key] is None:  # left unset
            continue
        expected = OPTIONAL_TYPES[key] if defaults[key] is None else type(defaults[key])
        numeric = (int, float) if expected is float else (expected,)
        if not isinstance(value, numeric) or (isinstance(value, bool) and expected is not bool):
            raise GradestError(f"{prefix}{key} must be {TYPE_NAMES[expected]}, got {value!r}")


def check_range(config: dict, key: str, low: int, high: int | None = None, why: str = ""):
    value = config[key]
    if value < low or (high is not None and value > high):
        valid = f"in {low}..{high}" if high is not None else f">= {low}"
        raise GradestError(f"{key} must be {valid}{why}, got {value!r}")


def check_choice(config: dict, key: str, valid, what: str | None = None):
    if config[key] not in valid:
        raise GradestError(f"unknown {what or key} '{config[key]}'; valid: {', '.join(valid)}")


def problem_fields(config: dict) -> dict:
    from gradest.problems import ProblemConfig
    return {f.name: config[f.name] for f in dataclasses.fields(ProblemConfig) if f.name != "seed"}


# Run settings a train cell's config holds only when they differ from these defaults, so that adding them left every
# earlier cell's hash as it was (TrainConfig.settings() leaves them out the same way).
TRAIN_OPTIONAL = {"schedule": "cosine", "adam_beta2": 0.999, "label_smoothing": 0.0, "preset": None}


def train_fields(config: dict) -> dict:
    """The run settings of a train cell's config (TrainConfig's flat settings: `TrainConfig(**train_fields(...))`)."""
    from gradest.config import TrainConfig
    keys = [*TrainConfig().settings(), *(key for key in TRAIN_OPTIONAL if key in config)]
    return {key: config[key] for key in keys}


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
    kinds = _kinds()
    if kind not in kinds:
        raise GradestError(f"unknown study kind '{kind}'{source}; valid: {', '.join(kinds)}")
    valid = list(kinds[kind].defaults())
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
    group_by = study.get("group_by", [])
    if not isinstance(group_by, list) or not all(isinstance(key, str) and key.split(".")[0] in valid
                                                 for key in group_by):
        raise GradestError(f"[study] group_by{source} must be a list of settings (`model.NAME` for a model "
                           f"setting), got {group_by!r}")
    return Study(name=study["name"], kind=kind, description=study.get("description", ""), grid=grid,
                 settings=settings, profiles=profiles, path=path, findings=study.get("findings", ""),
                 baseline=study.get("baseline", ""), group_by=group_by)


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


# -------------------------------------------------------------------------------------------------------- kinds
# Each kind's settings with their defaults, and its `resolve` (the checks `make_cell` runs before anything does):
# registered, with the kind's runner and report, in `runner.CELL_KINDS`.
def _kinds() -> dict:
    """The registry of cell kinds, `runner.CELL_KINDS` (imported when needed: the runner imports this module)."""
    from gradest.study.runner import CELL_KINDS
    return CELL_KINDS


def _compare_defaults() -> dict:
    from gradest.problems import ProblemConfig
    fields = {f.name: f.default for f in dataclasses.fields(ProblemConfig) if f.name not in ("seed",)}
    return {**fields, "estimator": "all", "samples": 2000, "wrt": "router", "seed": 0, "hparams": {}}


def _probe_defaults() -> dict:
    return {"task": "lm", "estimator": "all", "experts": 4, "top_k": 1, "samples": 256, "seed": 0, "wrt": "router",
            "layer": 0, "draws": 64, "reference": "auto", "batch_size": 2, "seq_len": 8, "score": "sequence",
            "data_seed": 0, "hparams": {}, "model": {}, "train": {}, "stage": "init"}


def _hf_probe_defaults() -> dict:
    """An hf-probe cell: `gradest compare --problem hf` on one MoE layer of a Hugging Face model, built at random
    initialisation from `hf` (a tiny model of that architecture, or a full-size one named in gradest.hf.NAMED) with
    `hf_settings` over its config; estimator: `all` or a comma-separated list of estimator specs; top_k unset: the
    model's own k; device unset: the CPU (a cell leaves it out,
    so that its hash is the one it had before cells had a device)."""
    return {"hf": "mixtral", "hf_settings": {}, "estimator": "all", "top_k": None, "samples": 256, "seed": 0,
            "wrt": "router", "layer": 0, "draws": 64, "reference": "auto", "batch_size": 2, "seq_len": 8,
            "score": "sequence", "data_seed": 0, "hparams": {}, "device": None}


def _resolve_hf_probe(config: dict, given=()) -> dict:
    """The model (its config built, its MoE blocks counted on the meta device: nothing is allocated), the layer,
    the estimators and the probe's options."""
    import torch
    from gradest import hf
    from gradest.probe import PROBE_WRT, REFERENCES, SCORES, probe_estimators
    valid = [*hf.SUPPORTED, *hf.NAMED]
    check_choice(config, "hf", valid, "Hugging Face model")
    for key, choices, what in (("wrt", PROBE_WRT, "gradient target for the probe"),
                               ("reference", REFERENCES, "reference"), ("score", SCORES, "score")):
        check_choice(config, key, choices, what)
    for key, low in (("samples", 3), ("draws", 3), ("batch_size", 1), ("seq_len", 1), ("layer", 0)):
        check_range(config, key, low)
    with torch.device("meta"):
        model = hf.model_from_config(hf.built_config(config["hf"], config["top_k"], config["hf_settings"]))
    blocks = hf.moe_blocks(model)
    check_range(config, "layer", 0, len(blocks) - 1, why=" (an index into the model's MoE blocks)")
    _, block, arch = blocks[0]
    router = arch.router_of(block)
    n, k = arch.family.experts(router), config["top_k"] or arch.family.native_k(router)
    if config["top_k"] is not None:
        check_range(config, "top_k", 1, n)
    probe_estimators(config["estimator"], k, config["hparams"], config["batch_size"])  # "all", or a comma list
    if config["device"] is None:
        del config["device"]
    else:
        _check_device_type(config["device"])
    return config


def _train_defaults() -> dict:
    from gradest.config import TrainConfig
    return {"name": None, **TrainConfig().settings(), **TRAIN_OPTIONAL}


def _resolve_compare(config: dict, given=()) -> dict:
    """A synthetic problem configuration: the problem's own defaults for the keys the spec does not set, then the
    problem (`ProblemConfig`), the estimator spec, the samples and the gradient target checked."""
    from gradest.estimators import expand_estimators
    from gradest.measure import WRT
    from gradest.problems import PROBLEMS, ProblemConfig
    check_choice(config, "problem", PROBLEMS)
    for key, value in PROBLEM_DEFAULTS.get(config["problem"], {}).items():
        if key not in given:  # poly's default is 2 categories, as in `gradest compare`
            config[key] = value
    problem = ProblemConfig(**problem_fields(config), seed=config["seed"])
    estimators = "all" if config["estimator"] == "all" else [config["estimator"]]
    expand_estimators(estimators, PROBLEMS[problem.problem].kind, problem.top_k, config["hparams"])
    check_range(config, "samples", 3, why=" (bias and variance need them)")
    check_choice(config, "wrt", WRT, "gradient target")
    return config


def _resolve_probe(config: dict, given=()) -> dict:
    """The probe's options (as `probe.probe` and `probe.switch_probe` check them when it runs), the estimators, the
    model's settings and MoE layers, the stage and the `train` table (that training run resolved as a cell of its
    own)."""
    from gradest.probe import PROBE_WRT, REFERENCES, SCORES, TASK_PROBLEM, probe_estimators
    for key, valid, what in (("task", TASK_PROBLEM, "task"), ("stage", STAGES, "probe stage"),
                             ("wrt", PROBE_WRT, "gradient target for the probe"),
                             ("reference", REFERENCES, "reference"), ("score", SCORES, "score")):
        check_choice(config, key, valid, what)
    check_range(config, "experts", 2, why=" (routing needs a choice)")
    check_range(config, "top_k", 1, config["experts"])
    for key, low in (("samples", 3), ("draws", 3), ("batch_size", 1), ("seq_len", 1), ("layer", 0)):
        check_range(config, key, low)
    probe_estimators(config["estimator"] if config["estimator"] == "all" else [config["estimator"]],
                     config["top_k"], config["hparams"], config["batch_size"])
    if config["stage"] == "trained" and not config["train"]:
        raise GradestError("probe stage 'trained' needs a train table (the run whose model is probed)")
    if config["train"]:
        valid = {key: value for key, value in _train_defaults().items() if key != "name"}
        try:
            check_types(config["train"], valid)
            resolve("train", probe_train_config(config))
        except GradestError as error:
            raise GradestError(f"a probe's train table: {error}") from None
    model = _probe_model(config)
    layers = sum(model.is_moe(i) for i in range(model.n_layer)) + \
        sum(model.is_moe(i) for i in range(model.n_encoder_layer))
    if not layers:
        raise GradestError("the probed model has no MoE layer (moe_every=0 is the dense baseline)")
    check_range(config, "layer", 0, layers - 1, why=" (an index into the model's MoE layers)")
    check_range(config, "seq_len", 1, model.block_size, why=" (the model's block_size)")
    if model.capacity_factor is not None:
        raise GradestError("the probe needs a model with capacity_factor unset (a capacity limit would couple the "
                           "copies of the batch the probe runs in one pass)")
    return config


def _check_device_type(name: str):
    """A device torch knows (whether this machine has it is checked when the cells run: `runner._check_devices`)."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise GradestError(f"unknown device '{name}'; valid: {', '.join(DEVICE_TYPES)}, cuda:N")


def _resolve_train(config: dict, given=()) -> dict:
    """A `TrainConfig` (its settings and its model's checked) that builds its estimator, on a device torch knows.
    A `preset` fills the settings the spec does not give (gradest.presets), so the cell holds, and its hash covers,
    the settings the run will have."""
    from gradest.presets import apply_preset
    from gradest.config import TrainConfig
    if config.get("preset"):
        spec = {key: config[key] for key in ("task", "estimator", *given) if key in config and key != "preset"}
        config = {**config, **apply_preset(config["preset"], spec)}
    TrainConfig(**train_fields(config)).build_estimator()
    _check_device_type(config["device"])
    return {key: value for key, value in config.items()
            if not (key in TRAIN_OPTIONAL and value == TRAIN_OPTIONAL[key])}


def _model_defaults() -> dict:
    from gradest.model import SwitchConfig
    return {f.name: f.default for f in dataclasses.fields(SwitchConfig)}


def _probe_model(config: dict):
    """The SwitchConfig (checked) of a probe cell's model: the tiny one `probe.switch_probe` builds (`TINY`), or
    that of the training run of its `train` table."""
    from gradest.model import SwitchConfig
    from gradest.probe import TINY
    from gradest.config import TrainConfig
    train = probe_train_config(config)
    if train is None:
        check_types(config["model"], _model_defaults(), "model.")
        return SwitchConfig(**{**TINY[config["task"]], "experts": config["experts"], "block_size": config["seq_len"],
                               **config["model"]})
    return TrainConfig(**train_fields(train)).model


def probe_train_config(config: dict) -> dict | None:
    """The training run a probe cell's model comes from: its `train` table over the train defaults and the probe's
    task, experts, top-k, seed and model (so it is the same cell as that run in a train study). None (an empty
    table): the tiny model of `probe.TINY`, updated by `model`."""
    if not config["train"]:
        return None
    base = {**_train_defaults(), "task": config["task"], "experts": config["experts"], "top_k": config["top_k"],
            "seed": config["seed"], "model": config["model"]}
    return merge(base, config["train"])
