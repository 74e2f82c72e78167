"""The study-kind contract: a new kind of study is one module that registers itself, and every part of gradest
sees it. A throwaway kind is registered from this file and taken through a spec, `gradest study run`,
`gradest study status`, `gradest report` and `gradest figures`; the registry refuses a second kind under a taken
name; and the package's imports have no circle (a kind may import the study machinery, never the other way)."""

from __future__ import annotations

import ast
import re
import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradest.errors import GradestError
from gradest.io import atomic_write_text
from gradest.statistics import aggregate_seeds, plus_minus
from gradest.study import CELL_KINDS, CellKind, load_study, parse_study, register_cell_kind, unregister_cell_kind
from gradest.study.reports import read_data
from gradest.study.spec import check_range

from helpers import cli

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- a throwaway kind
def coin_defaults() -> dict:
    return {"p": 0.5, "flips": 100, "seed": 0}


def coin_resolve(config: dict, given=()) -> dict:
    if not 0 <= config["p"] <= 1:
        raise GradestError(f"p must be in [0, 1], got {config['p']!r}")
    check_range(config, "flips", 1)
    return config


def coin_run(config: dict, directory: Path) -> dict:
    heads = int((np.random.default_rng(config["seed"]).random(config["flips"]) < config["p"]).sum())
    atomic_write_text(directory / "results.csv", pd.DataFrame([{**config, "heads": heads}]).to_csv(index=False))
    return {"heads": heads}


def coin_report(study, done, out: Path, profile=None):
    if done is not None:
        rows = pd.concat([pd.read_csv(cell.directory / "results.csv") for cell in done], ignore_index=True)
        atomic_write_text(out / "results.csv", rows.to_csv(index=False))
    rows = read_data(out, "results.csv")
    rows["fraction"] = rows["heads"] / rows["flips"]
    summary = aggregate_seeds(rows, ["p"], ["fraction"])
    table = "\n".join(f"- p={r['p']}: {plus_minus(r['fraction'], r['fraction_lo'], r['fraction_hi'], r['seeds'])}"
                      for _, r in summary.iterrows())
    return f"{len(rows)} runs of coin flips.", table, [], "- [results.csv](results.csv): every run"


COIN = CellKind("coin", defaults=coin_defaults, resolve=coin_resolve, run=coin_run, report=coin_report)


@pytest.fixture
def coin_kind():
    register_cell_kind(COIN)
    try:
        yield COIN
    finally:
        unregister_cell_kind(COIN.name)



def test_a_throwaway_kind_runs_a_study_and_its_report(coin_kind, tmp_path):
    spec = tmp_path / "coins.toml"
    spec.write_text(textwrap.dedent("""
        [study]
        name = "coins"
        kind = "coin"
        description = "Fractions of heads."
        [grid]
        p = [0.25, 0.75]
        seed = [0, 1, 2]
        [settings]
        flips = 400
    """))
    results, out = tmp_path / "results", tmp_path / "report"
    ran = cli("study", "run", spec, "--results", results)
    assert ran.exit_code == 0, ran.output
    assert "6 cells, 0 already done, 6 run, 0 failed" in ran.output
    finished = list((results / "coin").glob("*/done.json"))
    assert len(finished) == 6
    # every cell runs with the study's thread count (default 1, whatever --jobs is) and records it
    assert {json.loads(path.read_text())["environment"]["threads"] for path in finished} == {1}
    status = cli("study", "status", spec, "--results", results)
    assert status.exit_code == 0 and "6 of 6 cells done" in status.output

    reported = cli("report", spec, "--results", results, "--out", out)
    assert reported.exit_code == 0, reported.output
    readme = (out / "README.md").read_text()
    assert "# coins" in readme and "6 runs of coin flips." in readme and "kind `coin`" in readme
    rows = pd.read_csv(out / "results.csv")
    assert sorted(rows["p"].unique()) == [0.25, 0.75] and len(rows) == 6
    # each p's fraction of heads: 400 flips, so within 5 binomial standard errors of p (a deterministic seed)
    for p, group in rows.groupby("p"):
        assert abs(group["heads"].sum() / group["flips"].sum() - p) < 5 * np.sqrt(p * (1 - p) / 1200)

    again = cli("study", "run", spec, "--results", results)  # cached
    assert "6 already done, 0 run" in again.output
    before = readme
    figures = cli("figures", "--reports", tmp_path)  # rendered again from the CSVs alone
    assert figures.exit_code == 0 and "regenerated" in figures.output
    assert (out / "README.md").read_text() == before

    bad = tmp_path / "bad.toml"
    bad.write_text(spec.read_text().replace("p = [0.25, 0.75]", "p = [1.5]"))
    refused = cli("study", "run", bad, "--results", results)
    assert refused.exit_code == 2 and "p must be in [0, 1], got 1.5" in refused.output
    typo = tmp_path / "typo.toml"
    typo.write_text(spec.read_text().replace("flips = 400", "flipz = 400"))
    with pytest.raises(GradestError, match="unknown key 'flipz'.*valid: p, flips, seed"):
        load_study(typo)


def test_the_registry_refuses_a_taken_name_and_names_the_kinds(coin_kind):
    with pytest.raises(ValueError, match="already registered"):
        register_cell_kind(COIN)
    assert {"compare", "probe", "hf-probe", "train", "coin"} <= set(CELL_KINDS)
    spec = {"study": {"name": "x", "kind": "dice"}}
    from gradest.study import parse_study
    with pytest.raises(GradestError, match="unknown study kind 'dice'; valid: .*coin"):
        parse_study(spec)


# ---------------------------------------------------------------------------------------------- import graph
def _imports(path: Path, package: Path) -> set[str]:
    """The gradest modules a file imports, anywhere in it (a lazy import inside a function counts)."""
    module = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package
                parts = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("gradest")}


def test_no_import_circle_in_the_package():
    """Modules import one way: following the imports (lazy ones included, a package's __init__ aside, which only
    gathers its modules) never comes back to where it started."""
    package = ROOT / "gradest"
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        if name.endswith("__init__"):
            continue
        graph[name] = {target for target in _imports(path, package)
                       if target in modules and not target.endswith("__init__") and target != name}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_readme_layout_names_every_module():
    """README's Layout table names every module of the package (a package row may name its modules by file name),
    and every path it names exists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ")] if "\n## " in layout else layout
    rows = [line for line in layout.splitlines() if line.startswith("| `")]
    for module in sorted((ROOT / "gradest").rglob("*.py")):
        if module.name == "__init__.py":
            continue
        relative = module.relative_to(ROOT).as_posix()
        package = module.parent.relative_to(ROOT).as_posix() + "/"
        named = any(f"`{relative}`" in row or (f"`{package}`" in row or f"`{package.split('/')[-2]}/`" in row)
                    and f"`{module.name}`" in row for row in rows)
        assert named, f"README's Layout does not name {relative}"
    for path in {p for row in rows for p in re.findall(r"`(gradest/[\w/.]+|tests/|benchmarks/)`", row)}:
        assert (ROOT / path).exists(), f"README's Layout names {path}, which does not exist"


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "two words"])
def test_a_study_name_must_be_plain(name):
    """A study's report goes to reports/<name>/: a name with a path in it would write elsewhere."""
    with pytest.raises(GradestError, match="is not a plain name"):
        parse_study({"study": {"name": name, "kind": "compare"}})


def test_a_bad_device_is_named_before_the_directory(tmp_path):
    """`gradest run --device cuda:99` into a directory that already holds a run names the device, not the run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    result = cli("run", "--estimator", "switch", "--device", "cuda:99", "--out", out)
    assert result.exit_code == 2 and "cuda:99" in result.output and "already holds a run" not in result.output
