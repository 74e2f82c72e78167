"""Study specs: a spec read and checked, its profiles, and its cells (each resolved, hashed, and placed in the cache).

A spec (`studies/NAME.toml`) has a `[study]` table (name, kind, description), a `[grid]` of lists whose cartesian
product gives the cells, fixed `[settings]`, and `[profiles.quick|full|paper]` tables whose `grid` and `settings`
override the base ones (a key a profile sets in `settings` leaves the grid, and the other way round; tables such as
`model` and `hparams` are merged key by key). The grid key `variant` is special: a list of tables, each merged into
the cell as a whole, for arms that differ in several settings at once (the dense baseline of a training study).

What differs between the kinds of cell (their settings and defaults, their checks) is looked up in the registry of
kinds (`gradest.study.kind`); this module never names one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gradest.errors import GradestError
from gradest.estimators.base import MAX_INT
from gradest.study.kind import cell_kind

FORMAT = 1  # bump when a cell's outputs change meaning: every cell is then run again
PROFILES = ("quick", "full", "paper")
DEFAULT_PROFILE = "full"
RESULTS_ENV = "GRADEST_RESULTS"
QUEUED = "queued.json"  # a cell's record of its submission to a queue (`Cell.submission`)
TOP_KEYS = ("study", "grid", "settings", "profiles")
# findings: what the numbers show, in words; baseline: the run label (train studies) that ratios are taken against;
# group_by: the settings (`model.balance_coef` for a model setting) whose values group a train study's report;
# lead_at: the step at which a train study's report compares each arm's lead over the baseline with its final lead
STUDY_KEYS = ("name", "kind", "description", "findings", "baseline", "group_by", "lead_at")
LABEL_KEYS = ("name",)  # settings that only label a cell: not hashed
PROFILE_KEYS = ("grid", "settings", "description")


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
    def submission(self) -> dict | None:
        """The record of the cell's submission to a queue (`queued.json`, written by an executor such as slurm's),
        while it stands: the cell is not finished, nor has it failed since it was submitted. None otherwise."""
        if self.done:
            return None
        try:
            record = json.loads((self.directory / QUEUED).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        error = self.directory / "error.json"
        if not isinstance(record, dict):
            return None
        if error.is_file() and error.stat().st_mtime_ns >= record.get("submitted_ns", 0):  # it failed since
            return None
        return record

    @property
    def queued(self) -> bool:
        """Submitted and not finished (nor failed) since: waiting in a queue, running, or lost with its job."""
        return self.submission is not None

    @property
    def failed(self) -> bool:
        return not self.done and (self.directory / "error.json").is_file() and not self.queued


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
    # train studies: the step whose lead over the baseline the "over training" tests compare with the final one;
    # None: the last evaluation every run reached, where runs stop at different steps (a plateau rule)
    lead_at: int | None = None

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
        defaults = cell_kind(self.kind).defaults()
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
    config = resolve_cell(kind, config, given)
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


def resolve_cell(kind: str, config: dict, given=()) -> dict:
    """Fill the defaults that depend on other settings, and check the configuration once, before any runs: every
    setting's type (`check_types`), then the kind's checks (its configs' own, e.g. ProblemConfig's)."""
    kind = cell_kind(kind)
    check_types(config, kind.defaults(), kind.optional_types())
    return kind.resolve(dict(config), given)


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table"}


def check_types(table: dict, defaults: dict, optional_types: dict | None = None, prefix: str = ""):
    """Each setting has the type of its default (an integer may stand for a number, true is not an integer), so
    `samples = "lots"` is an error before any cell runs; a setting whose default is None ("unset") has the type
    `optional_types` gives it (one it does not give is checked by the kind's `resolve`). Keys that only label a
    cell are not checked."""
    for key, value in table.items():
        if key not in defaults:
            if key in LABEL_KEYS:
                continue
            raise GradestError(f"unknown key '{prefix}{key}'; valid: {', '.join(prefix + k for k in defaults)}")
        # None (no TOML value: a configuration resolved before, e.g. a preset's grad_clip) is the kind's to check
        if value is None or (defaults[key] is None and key not in (optional_types or {})):
            continue
        expected = optional_types[key] if defaults[key] is None else type(defaults[key])
        numeric = (int, float) if expected is float else (expected,)
        if not isinstance(value, numeric) or (isinstance(value, bool) and expected is not bool):
            raise GradestError(f"{prefix}{key} must be {TYPE_NAMES[expected]}, got {value!r}")


def check_range(config: dict, key: str, low: int, high: int | None = None, why: str = ""):
    """An integer setting in low..high (every integer below 2**63: gradest.estimators.base.MAX_INT)."""
    value = config[key]
    if value < low or value > (MAX_INT if high is None else high):
        valid = f"in {low}..{high}" if high is not None else f">= {low}" + (" and below 2**63" if value > low else "")
        raise GradestError(f"{key} must be {valid}{why}, got {value!r}")


def check_choice(config: dict, key: str, valid, what: str | None = None):
    if config[key] not in valid:
        raise GradestError(f"unknown {what or key} '{config[key]}'; valid: {', '.join(valid)}")


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
    except UnicodeDecodeError as error:
        raise GradestError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                           f"{error.start}); valid: a TOML study spec, saved as UTF-8") from None
    except OSError as error:  # a directory, no permission, a symlink loop
        raise GradestError(f"cannot read the study spec {path}: {error.strerror or error}") from None
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
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", study["name"]):  # its report is reports/<name>/
        raise GradestError(f"[study] name {study['name']!r}{source} is not a plain name; valid: letters, digits, "
                           f"'.', '_' and '-', starting with a letter or digit (no '/' or '..')")
    kind = study["kind"]
    valid = list(cell_kind(kind, source).defaults())
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
    lead_at = study.get("lead_at")
    if lead_at is not None and (isinstance(lead_at, bool) or not isinstance(lead_at, int) or lead_at < 1):
        raise GradestError(f"[study] lead_at{source} must be a step (an integer >= 1), got {lead_at!r}")
    return Study(name=study["name"], kind=kind, description=study.get("description", ""), grid=grid,
                 settings=settings, profiles=profiles, path=path, findings=study.get("findings", ""),
                 baseline=study.get("baseline", ""), group_by=group_by, lead_at=lead_at)


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
