"""Declarative studies: a grid of cells run once each, cached by a hash of their configuration (issue #4 §1).

- `spec`: a study spec (`studies/NAME.toml`) read and checked, its profiles, and its cells: each one's resolved
  configuration, its hash (`cell_hash`, the cache key) and its directory `RESULTS/<kind>/<hash>/`; shards.
- `runner`: the registry of cell kinds (`CELL_KINDS`: "compare", "probe", "train", each with its settings, checks,
  runner and report), and the runner of a study's cells: cached, atomic, resumable, in parallel workers.
- `reports`: `reports/<name>/README.md` (another profile's: `reports/<name>/<profile>/`), its CSVs and figures:
  the finished cells collected into the CSVs (`write_report`), and the tables, figures and README rendered from
  the CSVs alone (`render_report`, `regenerate`).

The names other code uses are re-exported here: `from gradest.study import load_study, run_study, write_report`.
"""

from gradest.study.spec import (DEFAULT_PROFILE, FORMAT, LABEL_KEYS, PROFILES, RESULTS_ENV, STAGES, Cell, Study,
                                canonical, cell_hash, load_study, make_cell, merge, parse_shard, parse_study,
                                probe_train_config, problem_fields, resolve, results_root, shard, train_fields)
from gradest.study.runner import (CELL_KINDS, CellKind, RunSummary, execute, finished, register_cell_kind, status_text,
                                  run_compare, run_probe, run_study, run_train)
from gradest.study.reports import (is_reference_row, regenerate, render_report, report_dir, steps_to,
                                   update_seconds, write_report)

__all__ = ["DEFAULT_PROFILE", "FORMAT", "LABEL_KEYS", "PROFILES", "RESULTS_ENV", "STAGES", "Cell", "Study",
           "canonical", "cell_hash", "load_study", "make_cell", "merge", "parse_shard", "parse_study",
           "probe_train_config", "problem_fields", "resolve", "results_root", "shard", "train_fields",
           "CELL_KINDS", "CellKind", "RunSummary", "execute", "finished", "register_cell_kind", "run_compare",
           "run_probe", "run_study", "run_train",
           "is_reference_row", "regenerate", "render_report", "report_dir", "steps_to", "update_seconds",
           "write_report"]
