"""The registry of study kinds: what differs between a study of synthetic problems, a probe and a training study.

A kind is one module of `gradest/study/kinds/` that builds a `CellKind` and registers it; every module there is
imported when `gradest.study` is, so a new kind is one new file. The spec parser, the cell runner and the report
writer look a kind up by the name a spec gives (`[study] kind`) and never name one themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

from gradest.errors import GradestError

# (summary paragraph, tables markdown, figure files, data files list): the sections of a study's report
Sections = tuple[str, str, list[str], str]


@dataclass(frozen=True)
class CellKind:
    """A kind of cell, looked up by its name instead of branching on it.

      name            the study kind, and the cache's directory of these cells (`RESULTS/<name>/<hash>/`);
      defaults        every setting of such a cell with its default value (the keys a spec may set);
      resolve         (config, given) -> config: fills the defaults that depend on other settings (`given`: the keys
                      the spec sets) and checks the configuration (one-line GradestErrors), before anything runs;
      run             (config, directory) -> summary: computes the cell's outputs in its directory; the summary goes
                      in done.json;
      report          (study, finished cells or None, out, profile) -> Sections: the study's report, its data files
                      and figures written in `out`; given None, rendered from the data files already in `out`
                      (`gradest figures`);
      optional_types  () -> {setting: type}: the type a spec may give a setting whose default None means "unset"
                      (TOML has no null);
      check_memory    (config) -> None: refuses (a one-line GradestError) a cell whose estimated peak memory
                      (gradest.memory) exceeds this machine's, when `study run` starts, before any cell runs.
    """

    name: str
    defaults: Callable[[], dict]
    resolve: Callable[[dict, Collection[str]], dict]
    run: Callable[[dict, Path], dict]
    report: Callable[..., Sections]
    optional_types: Callable[[], dict] = dict
    check_memory: Callable[[dict], None] = lambda config: None


CELL_KINDS: dict[str, CellKind] = {}


def register_cell_kind(kind: CellKind) -> CellKind:
    """Add a kind of cell under its (new) name: studies of that kind then parse, run and report."""
    if kind.name in CELL_KINDS:
        raise ValueError(f"a cell kind '{kind.name}' is already registered")
    CELL_KINDS[kind.name] = kind
    return kind


def unregister_cell_kind(name: str) -> None:
    CELL_KINDS.pop(name, None)


def cell_kind(name: str, where: str = "") -> CellKind:
    """The kind registered under `name`; an unknown one is a one-line error naming the valid kinds."""
    if name not in CELL_KINDS:
        raise GradestError(f"unknown study kind '{name}'{where}; valid: {', '.join(CELL_KINDS)}")
    return CELL_KINDS[name]
