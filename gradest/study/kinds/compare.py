"""The `compare` study kind: `gradest compare` on a grid of synthetic problems, one cell per problem configuration,
estimator spec and seed (the rows of `measure.compare`).

Its report (shared by the probe kinds, which configure its rows by their own columns) has the estimators' bias,
variance, MSE and cost per configuration: means over seeds with 95% t-intervals, and the figures of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from gradest.estimators import REGISTRY, expand_estimators
from gradest.figures import (atomic_savefig, bias_interval_figure, bias_variance_figure, metric_vs_experts_figure,
                             stage_figure)
from gradest.io import atomic_write_text
from gradest.measure import METRICS, WRT, compare, configuration_label
from gradest.problems import PROBLEM_DEFAULTS, PROBLEMS, ProblemConfig
from gradest.statistics import aggregate_seeds, plus_minus
from gradest.study.kind import CellKind, Sections, register_cell_kind
from gradest.study.reports import read_data
from gradest.study.spec import Cell, Study, check_choice, check_range

def defaults() -> dict:
    fields = {f.name: f.default for f in dataclasses.fields(ProblemConfig) if f.name not in ("seed",)}
    return {**fields, "estimator": "all", "samples": 2000, "wrt": "router", "seed": 0, "hparams": {}}


def resolve(config: dict, given=()) -> dict:
    """A synthetic problem configuration: the problem's own defaults for the keys the spec does not set, then the
    problem (`ProblemConfig`), the estimator spec, the samples and the gradient target checked."""
    check_choice(config, "problem", PROBLEMS)
    for key, value in PROBLEM_DEFAULTS.get(config["problem"], {}).items():
        if key not in given:  # poly's default is 2 categories, as in `gradest compare`
            config[key] = value
    problem = ProblemConfig(**ProblemConfig.settings(config), seed=config["seed"])
    estimators = "all" if config["estimator"] == "all" else [config["estimator"]]
    expand_estimators(estimators, PROBLEMS[problem.problem].kind, problem.top_k, config["hparams"])
    check_range(config, "samples", 3, why=" (bias and variance need them)")
    check_choice(config, "wrt", WRT, "gradient target")
    return config


def check_memory(config: dict) -> None:
    from gradest.memory import check_compare
    problem = ProblemConfig(**ProblemConfig.settings(config), seed=config["seed"])
    estimators = "all" if config["estimator"] == "all" else [config["estimator"]]
    check_compare([problem], lambda c: expand_estimators(estimators, PROBLEMS[c.problem].kind, c.top_k,
                                                         config["hparams"]), config["samples"], config["wrt"])


def run(config: dict, directory: Path) -> dict:
    problem = ProblemConfig(**ProblemConfig.settings(config), seed=config["seed"])
    estimators = "all" if config["estimator"] == "all" else [config["estimator"]]
    df = compare([problem], estimators, samples=config["samples"], wrt=config["wrt"], seed=config["seed"],
                 settings=config["hparams"])
    atomic_write_text(directory / "results.csv", df.to_csv(index=False))
    return {"rows": len(df), "rel_bias": df["rel_bias"].tolist(), "mse": df["mse"].tolist()}




COMPARE_KEYS = ["problem", "experts", "tokens", "dim", "out_dim", "classes", "power", "center", "top_k",
                "sharpness", "wrt", "samples", "estimator", "target"]


def is_reference_row(label) -> bool:
    """Whether a row's estimator is the reference the others are measured against: the estimator registered under
    the label's name (a label is `name` or `name(hparam=value, ...)`) enumerates every expert tuple (`enumerates`,
    the exact gradient). An unknown name is not."""
    cls = REGISTRY.get(str(label).split("(")[0])
    return cls is not None and cls.enumerates


def _without_reference(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the estimators measured, without the reference's (`is_reference_row`)."""
    return frame[~frame["estimator"].map(is_reference_row).astype(bool)]


def _winners(table: pd.DataFrame, groups: list, metric: str) -> str:
    """'st in 3 of 4 configurations, sparsemixer in 1': which estimator (exact excluded) has the lowest mean."""
    counts = {}
    for _, rows in groups:
        rows = _without_reference(rows).dropna(subset=[metric])
        if len(rows):
            best = rows.loc[rows[metric].idxmin(), "estimator"]
            counts[best] = counts.get(best, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} in {count} of {len(groups)} configuration{'s' * (len(groups) > 1)}"
                     for name, count in ranked) or "none"


def _relative_bias_sq(rows: pd.DataFrame) -> pd.Series:
    """Each row's noise-corrected B^2 / ||g*||^2: unbiased per seed, unlike the relative bias (see the render)."""
    return rows["bias_sq"] / rows["ref_norm"].pow(2)


def _collect_rows(done: list[Cell], out: Path) -> None:
    """A compare or probe study's data: results.csv, every row of every finished cell, with its cell's hash."""
    raw = pd.concat([pd.read_csv(cell.directory / "results.csv").assign(cell=cell.hash) for cell in done],
                    ignore_index=True)
    raw["rel_bias_sq"] = _relative_bias_sq(raw)
    atomic_write_text(out / "results.csv", raw.to_csv(index=False))


def estimator_report(done: list[Cell] | None, out: Path, columns: list[str]) -> Sections:
    """The report of a compare or probe study, its rows configured by `columns`: `done` (unless None) collected
    into results.csv, then the sections rendered from it."""
    if done is not None:
        _collect_rows(done, out)
    identity = ["problem", "estimator", "target", "samples", "seed"]
    metrics = [m.column for m in METRICS]
    return _render_estimators(read_data(out, "results.csv", identity, metrics), out, columns)


def _render_estimators(raw: pd.DataFrame, out: Path, columns: list[str]) -> Sections:
    """summary.csv, the figures and the sections of a compare or probe study's report, from its results.csv."""
    keys = [key for key in columns if key in raw]
    # Relative bias over seeds: averaging each seed's sqrt(max(B^2, 0)) would be biased upwards (an unbiased
    # estimator's interval would exclude 0); the noise-corrected B^2 / ||g*||^2 is unbiased per seed, so average
    # that and take the square root of its mean and interval.
    raw["rel_bias_sq"] = _relative_bias_sq(raw)
    summary = aggregate_seeds(raw, keys, [m.column for m in METRICS] + ["rel_bias_sq"] + (["sharpness"] if "sharpness" not in keys
                                                                       else []))
    several = summary["seeds"] > 1
    for suffix in ("", "_lo", "_hi"):
        summary.loc[several, "rel_bias" + suffix] = np.sqrt(summary.loc[several, "rel_bias_sq" + suffix].clip(lower=0))
    order = [key for key in ("problem", "experts", "top_k", "sharpness", "stage", "layer") if key in keys]
    summary = summary.sort_values(order, kind="stable", ignore_index=True)  # estimators keep their order
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
            **{metric.heading: [plus_minus(r[m], r[f"{m}_lo"], r[f"{m}_hi"], r["seeds"])
                                for _, r in rows.iterrows() for m in [metric.column]]
               for metric in METRICS if metric.heading}})
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
    if "cell_seconds" in raw:  # an hf-probe study's cells also say what they cost
        tables.append(_cost_table(raw, config_keys))
    seeds = sorted(raw["seed"].unique()) if "seed" in raw else []
    paragraph = (f"{len(groups)} configuration{'s' * (len(groups) != 1)} x {summary['estimator'].nunique()} "
                 f"estimators x {len(seeds)} seed{'s' * (len(seeds) != 1)} (means over seeds, 95% t-intervals; "
                 f"relative bias is the square root of the mean noise-corrected B^2/||g*||^2 and of its interval). "
                 f"Lowest mean MSE against the exact gradient (exact itself excluded): "
                 f"{_winners(summary, groups, 'mse')}. Lowest mean relative bias: "
                 f"{_winners(summary, groups, 'rel_bias')}.")
    best = _without_reference(summary).dropna(subset=["rel_bias"])
    if len(best):
        lo, hi = best.loc[best["rel_bias"].idxmin()], best.loc[best["rel_bias"].idxmax()]
        paragraph += (f" Relative bias ranges from {lo['rel_bias']:.3g} ({lo['estimator']}, {lo['configuration']}) "
                      f"to {hi['rel_bias']:.3g} ({hi['estimator']}, {hi['configuration']}).")
    data = ("- [results.csv](results.csv): every row of every finished cell (one per estimator, configuration and "
            "seed)\n- [summary.csv](summary.csv): means over seeds with 95% t-intervals (`_lo`, `_hi`), the "
            "tables' numbers")
    return paragraph, "\n\n".join(tables), files, data


def _cost_table(raw: pd.DataFrame, config_keys: list[str]) -> str:
    """One row per cell: its model's size, time and peak memory, and each reference's kind, draws and relative
    standard error (0 for enumeration, which is exact)."""
    rows = []
    for _, cell in raw.groupby("cell", sort=False):
        first = cell.iloc[0]
        references = cell.drop_duplicates("target")
        rows.append({**{key: first[key] for key in config_keys if key in ("problem", "layer", "top_k", "seed")},
                     "estimators": ", ".join(cell["estimator"].unique()) if cell["estimator"].nunique() <= 3
                     else f"{cell['estimator'].nunique()} estimators",
                     "parameters (M)": f"{first['parameters'] / 1e6:.4g}",
                     "time (min)": f"{first['cell_seconds'] / 60:.3g}", "peak memory (GB)": f"{first['peak_rss_gb']:.3g}",
                     "references": "; ".join(
                         f"{r['target']}: {r['reference']}"
                         + (f" ({int(r['reference_draws'])} draws, SE {r['reference_se']:.2g})"
                            if r["reference"] != "enumeration" else "") for _, r in references.iterrows())})
    table = pd.DataFrame(rows)
    table = table.sort_values([key for key in ("problem", "layer", "top_k", "seed") if key in table], kind="stable")
    return ("### Cost of each cell\n\nTime: the whole cell (model built, references, every estimator's samples); "
            "peak memory: the resident set of the process that ran it; SE: the Monte-Carlo reference's standard "
            "error over its norm.\n\n" + table.to_markdown(index=False))


def report(study: Study, done: list[Cell] | None, out: Path, profile: str | None = None) -> Sections:
    """The report of a compare study: its rows are configured by COMPARE_KEYS."""
    return estimator_report(done, out, COMPARE_KEYS)


register_cell_kind(CellKind("compare", defaults=defaults, resolve=resolve, run=run, report=report,
                            check_memory=check_memory))
