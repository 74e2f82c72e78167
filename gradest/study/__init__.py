"""Declarative studies: a grid of cells run once each, cached by a hash of their configuration.

- `kind`: the registry of study kinds (`CELL_KINDS`); each kind is one module of `kinds/` (compare, probe,
  hf-probe, train) holding its settings and defaults, its checks, its runner and its report.
- `spec`: a study spec (`studies/NAME.toml`) read and checked, its profiles, and its cells: each one's resolved
  configuration, its hash (`cell_hash`, the cache key) and its directory `RESULTS/<kind>/<hash>/`; shards.
- `runner`: the runner of a study's cells: cached, atomic, resumable, wherever they run; `gradest study status`.
- `executor`: the registry of executors (`EXECUTORS`), where the cells run: each is one module of `executors/`
  (local: on this machine, in parallel workers; slurm: a Slurm job array through submitit, and submitit-local).
- `reports`: `reports/<name>/README.md` (another profile's: `reports/<name>/<profile>/`): the kind's data files,
  tables and figures, and what every report has around them (`write_report`, `render_report`, `regenerate`).

The names other code uses are re-exported here: `from gradest.study import load_study, run_study, write_report`.
"""

from gradest.study.kind import CELL_KINDS, CellKind, cell_kind, register_cell_kind, unregister_cell_kind
from gradest.study.executor import (EXECUTORS, Executor, ExecutorOption, get_executor, register_executor,
                                    unregister_executor)
from gradest.study.spec import (DEFAULT_PROFILE, FORMAT, LABEL_KEYS, PROFILES, RESULTS_ENV, Cell, Study, canonical,
                                cell_hash, load_study, make_cell, merge, parse_shard, parse_study, resolve_cell,
                                results_root, shard)
from gradest.study.runner import RunSummary, execute, finished, run_study, status_text
from gradest.study.reports import regenerate, render_report, report_dir, write_report
from gradest.study import kinds  # noqa: F401 - registers every kind
from gradest.study import executors  # noqa: F401 - registers every executor
from gradest.study.kinds.compare import is_reference_row
from gradest.study.kinds.probe import probe_train_config
from gradest.study.kinds.train import steps_to, train_fields, update_seconds

__all__ = ["CELL_KINDS", "CellKind", "cell_kind", "register_cell_kind", "unregister_cell_kind",
           "EXECUTORS", "Executor", "ExecutorOption", "get_executor", "register_executor", "unregister_executor",
           "DEFAULT_PROFILE", "FORMAT", "LABEL_KEYS", "PROFILES", "RESULTS_ENV", "Cell", "Study", "canonical",
           "cell_hash", "load_study", "make_cell", "merge", "parse_shard", "parse_study", "resolve_cell", "results_root",
           "shard", "RunSummary", "execute", "finished", "run_study", "status_text", "regenerate", "render_report",
           "report_dir", "write_report", "is_reference_row", "probe_train_config", "steps_to", "train_fields",
           "update_seconds"]
