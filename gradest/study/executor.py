"""The registry of executors: where a study's unfinished cells run (`gradest study run --executor NAME`).

An executor is one module of `gradest/study/executors/` that builds an `Executor` and registers it; every module
there is imported when `gradest.study` is, so a new executor is one new file. Its options (`ExecutorOption`) are
declared with it: `gradest study run` shows them all and checks that each one given belongs to the executor chosen;
the runner looks an executor up by its name and never names one itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gradest.errors import GradestError


@dataclass(frozen=True)
class ExecutorOption:
    """An option of an executor.

      name     its name in Python (`cpus_per_task`); on the command line `--cpus-per-task`;
      parse    value as given (text from the command line, or a Python value) -> the checked value; a bad one is a
               one-line GradestError naming the value and what is valid (before anything is submitted or written);
      default  its value when not given (not parsed);
      help     the command line's help text;
      metavar  the command line's name for its value;
      multiple given any number of times (a list);
      switch   an on/off flag (`--wait`): True when given.
    """

    name: str
    parse: Callable[[object], object]
    default: object = None
    help: str = ""
    metavar: str = "VALUE"
    multiple: bool = False
    switch: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Executor:
    """Where cells run.

      name         `--executor NAME`;
      description  one line, for `--help`;
      run          (cells, options, threads, *, runner, command, progress, where, results) -> RunSummary: runs (or
                   submits) the unfinished cells given, each with `threads` torch threads, through
                   `gradest.study.runner.execute` (atomic, resumable); `options`: every option of the executor,
                   parsed (`parse_options`); `where`: the study and profile, to name in errors;
      options      its options;
      threads      (options) -> the torch threads of each cell when `--threads` is not given;
      active       (job ids) -> those still queued or running, or None where the executor cannot tell: a cell whose
                   submission (queued.json) names one of them is not submitted again.
    """

    name: str
    description: str
    run: Callable[..., object]
    options: tuple[ExecutorOption, ...] = ()
    threads: Callable[[dict], int] = lambda options: 1
    active: Callable[[list[str]], set | None] = lambda jobs: None


EXECUTORS: dict[str, Executor] = {}
DEFAULT_EXECUTOR = "local"


def register_executor(executor: Executor) -> Executor:
    """Add an executor under its (new) name: `gradest study run --executor NAME` then uses it."""
    if executor.name in EXECUTORS:
        raise ValueError(f"an executor '{executor.name}' is already registered")
    EXECUTORS[executor.name] = executor
    return executor


def unregister_executor(name: str) -> None:
    EXECUTORS.pop(name, None)


def get_executor(name: str) -> Executor:
    """The executor registered under `name`; an unknown one is a one-line error naming the valid ones."""
    if name not in EXECUTORS:
        raise GradestError(f"unknown executor '{name}'; valid: {', '.join(EXECUTORS)}")
    return EXECUTORS[name]


def all_options() -> dict[str, tuple[ExecutorOption, list[str]]]:
    """Every executor's options by name, each with the executors that have it (an option two executors share is
    the same `ExecutorOption`)."""
    options = {}
    for executor in EXECUTORS.values():
        for option in executor.options:
            options.setdefault(option.name, (option, []))[1].append(executor.name)
    return options


def given(value) -> bool:
    """Whether an option was given: None, False (a switch left off) and an empty list are not."""
    return value is not None and value is not False and value != () and value != []


def parse_options(executor: Executor, options: dict | None) -> dict:
    """Every option of `executor`: the given ones (`options`, by name) parsed and checked, the others at their
    defaults. An option of another executor, or of none, is a one-line error."""
    known = all_options()
    mine = {option.name: option for option in executor.options}
    parsed = {name: option.default for name, option in mine.items()}
    for name, value in (options or {}).items():
        if not given(value):
            continue
        if name not in mine:
            flag = "--" + name.replace("_", "-")
            if name in known:
                owners = ", ".join(known[name][1])
                raise GradestError(f"{flag} is an option of --executor {owners}, not of --executor {executor.name}")
            raise GradestError(f"unknown executor option {flag}; valid for --executor {executor.name}: "
                               f"{', '.join(option.flag for option in executor.options) or '(none)'}")
        option = mine[name]
        if option.multiple:
            parsed[name] = [option.parse(item) for item in ([value] if isinstance(value, str) else value)]
        else:
            parsed[name] = True if option.switch else option.parse(value)
    return parsed


# ------------------------------------------------------------------------------------ options' parsers
def positive_int(name: str, low: int = 1, high: int = 2 ** 63 - 1):
    """An ExecutorOption's parse: an integer from `low` to `high` (text from the command line, or an int)."""
    def parse(value):
        try:
            number = int(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
            valid = f">= {low} (below 2**63)" if high == 2 ** 63 - 1 else f"from {low} to {high:,}"
            raise GradestError(f"--{name.replace('_', '-')} must be an integer {valid}, got {value!r}")
        return number
    return parse
