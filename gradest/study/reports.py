"""Reports: `reports/<name>/README.md` with its tables, CSVs and figures (a profile other than the committed one:
`reports/<name>/<profile>/`, see `report_dir`), made in two stages.

- collect (`gradest report`, which needs the results cache): the finished cells of the study's profile become the
  report's data files (a compare or probe study's `results.csv`; a train study's final numbers and `curves.csv`),
  and `report.json` (spec, profile, how many cells finished, failed or were not run, the commits they were
  computed at, the failed cells' errors, and how the report was made).
- render (`gradest figures`, which needs only the report's folder and its spec): `summary.csv`, the figures and
  README.md, from the data files read back from disk. `gradest report` renders them the same way, so a report
  rebuilt from its committed CSVs is byte for byte the one `gradest report` wrote.

What the data files, tables and figures are is the study kind's `report` (`gradest.study.kind`): given the
finished cells it collects them, then renders; given None instead, it renders the data files already in the
report's folder. This module writes what every report has around them, and never names a kind.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd

from gradest.errors import GradestError
from gradest.io import atomic_write_text, run_metadata, write_json
from gradest.study.kind import Sections, cell_kind
from gradest.study.runner import finished
from gradest.study.spec import DEFAULT_PROFILE, Cell, Study, load_study, results_root


def read_json(path: Path) -> dict:
    """A JSON file of a report or a cell; one that does not parse is a one-line error naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise GradestError(f"{Path(path).as_posix()} is not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise GradestError(f"{Path(path).as_posix()} is not a JSON object")
    return data


def read_data(out: Path, name: str, required=(), present=()) -> pd.DataFrame:
    """A data file of the report, as every render reads it (`gradest report` too, so that it renders what
    `gradest figures` will): cell hashes as text, as a hash of digits only is no number. It must have rows and the
    `required` columns, each filled in every row (a file cut short leaves its last row's fields empty), and the
    `present` ones (which may be empty where a number is undefined): a report is never rendered from broken data,
    over the good one."""
    path = Path(out) / name
    if not path.is_file():
        raise GradestError(f"{path.as_posix()} is missing (`gradest report SPEC` writes it from the results cache)")
    try:
        text = path.read_text(encoding="utf-8")
        frame = pd.read_csv(io.StringIO(text), dtype={"cell": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        raise GradestError(f"{path.as_posix()} is not a readable CSV ({str(error).strip()})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not text.endswith("\n") or any(len(row) != len(rows[0]) for row in rows[1:]):  # gradest writes whole rows
        raise GradestError(f"{path.as_posix()} is cut short (a row without all its fields); write it again with "
                           f"`gradest report SPEC`")
    missing = [column for column in [*required, *present] if column not in frame]
    if frame.empty or missing:
        raise GradestError(f"{path.as_posix()} " + (f"lacks the columns {', '.join(missing)}" if missing else
                                                    "has no rows") + "; write it again with `gradest report SPEC`")
    empty = [column for column in required if frame[column].isna().any()]
    if empty:
        raise GradestError(f"{path.as_posix()} has rows without {', '.join(empty)} (cut short?); write it again "
                           f"with `gradest report SPEC`")
    return frame


def _commits(done: list[Cell]) -> str:
    """The commits the cells were computed at, as report.json and the README give them: `4cc45b6abc12`, or
    `abc (3 cells), def (dirty) (2 cells)` when they differ."""
    commits = {}
    for cell in done:
        git = read_json(cell.directory / "done.json").get("git", {})
        label = git.get("commit", "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
        commits[label] = commits.get(label, 0) + 1
    return ", ".join(f"{commit} ({count} cells)" if len(commits) > 1 else commit for commit, count in commits.items())


# --------------------------------------------------------------------------------------------------- the report
def report_dir(study: Study, profile: str | None) -> Path:
    """Where a profile's report goes unless told: `reports/<name>/` for the committed profile (`full`, else the base
    grid when the study defines no `full`), `reports/<name>/<profile>/` for any other, so a quick report never
    overwrites the committed one."""
    out = Path("reports") / study.name
    return out if profile == study.resolve_profile(None) else out / profile


def write_report(study: Study, profile: str | None = None, results=None, out=None, command=None) -> Path:
    """`gradest report`: the finished cells of the profile collected into the data files of the report in `out`
    (default: `report_dir`), report.json with them, then the report rendered from those files, as `render_report`
    does."""
    profile = study.resolve_profile(profile)
    done, failed, missing = finished(study, profile, results)
    if not done:
        raise GradestError(f"no finished cells of study '{study.name}' (profile {profile or 'base'}) in "
                           f"{results_root(results) / study.kind}/; run `gradest study run "
                           f"{study.path or study.name}"
                           f"{f' --profile {profile}' if profile else ''}` first")
    out = Path(out or report_dir(study, profile))
    spec = study.path.as_posix() if study.path else study.name
    # the checkout's state before the report writes into it: at a clean commit, the report's record says clean
    metadata = run_metadata({"study": spec, "profile": profile}, None, command)
    sections = cell_kind(study.kind).report(study, done, out, profile)  # collected, then rendered from the files
    write_json(out / "report.json", {
        "study": spec, "profile": profile, "results": str(results_root(results)),
        "cells": {"done": len(done), "failed": len(failed), "missing": len(missing)}, "commits": _commits(done),
        "failed": [{"cell": cell.hash, "error": read_json(cell.directory / "error.json")["error"]}
                   for cell in failed], **metadata})
    _write_readme(study, out, _read_meta(out), sections)
    return out


def render_report(out) -> Path:
    """`gradest figures`, for one report: its summary.csv, figures and README.md rendered again from the data files
    in `out` and the spec its report.json names, without the results cache. report.json and the data files are left
    as they are."""
    out = Path(out)
    meta = _read_meta(out)
    study = load_study(meta["study"])
    sections = cell_kind(study.kind).report(study, None, out, meta["profile"])
    _write_readme(study, out, meta, sections)
    return out


def _read_meta(out: Path) -> dict:
    """A report's report.json, which has what its README says of the cells (written by `write_report`)."""
    meta = read_json(out / "report.json")
    if "commits" not in meta or "failed" not in meta:
        raise GradestError(f"{(out / 'report.json').as_posix()} has no commits or failed cells (an older gradest "
                           f"wrote it); write the report again with `gradest report {meta.get('study', 'SPEC')}`")
    return meta


def _write_readme(study: Study, out: Path, meta: dict, sections: Sections) -> None:
    """README.md: the study's description and findings, the sections, and what report.json (`meta`) says of the
    cells (how many finished, the commits they were computed at, the failed ones' errors); the figures the report
    no longer has removed."""
    paragraph, tables, figures, data = sections
    for stale in set(out.glob("*.png")) - {out / name for name in figures}:
        stale.unlink()
    spec, profile, cells = meta["study"], meta["profile"], meta["cells"]
    status = f"{cells['done']} of {sum(cells.values())} cells finished"
    if cells["failed"] or cells["missing"]:
        status += (f" ({cells['failed']} failed, {cells['missing']} not run: the numbers cover the finished cells "
                   f"only)")
    option = "" if profile == study.resolve_profile(None) else f" --profile {profile}"
    text = "\n\n".join([
        f"# {study.name}",
        study.description.strip(),
        *([f"**What the numbers show** (profile `{DEFAULT_PROFILE}`). {study.findings.strip()}"]
          if study.findings.strip() and profile == DEFAULT_PROFILE else []),
        paragraph,
        f"Study `{spec}`, profile `{profile or 'base'}`, kind `{study.kind}`; {status}; cells computed at "
        f"commit {meta['commits']}. Regenerate the tables and figures from the CSVs with `gradest figures`; "
        f"recompute the cells with `gradest study run {spec}{option}` then `gradest report {spec}{option}`.",
        "## Tables",
        tables,
        "## Figures",
        "\n\n".join(f"![{name}]({name})" for name in figures),
        "## Data",
        data,
    ]) + "\n"
    if meta["failed"]:
        text += "\n## Failed cells\n\n" + "\n".join(f"- `{failed['cell']}`: {failed['error']}"
                                                      for failed in meta["failed"]) + "\n"
    atomic_write_text(out / "README.md", text)


def regenerate(reports="reports") -> tuple[list[Path], list[str]]:
    """`gradest figures`: every report under `reports` (each `<study>/` or `<study>/<profile>/` with a report.json)
    rendered again from its own data files (`render_report`): (written, skipped with the reason)."""
    written, skipped = [], []
    folders = sorted({meta.parent for pattern in ("*/report.json", "*/*/report.json")
                      for meta in Path(reports).glob(pattern)})
    for folder in folders:
        try:
            written.append(render_report(folder))
        except GradestError as error:
            skipped.append(f"{folder}: {error}")
    return written, skipped
