"""Reports: `reports/<name>/README.md` with its tables, CSVs and figures (a profile other than the committed one:
`reports/<name>/<profile>/`, see `report_dir`), made in two stages.

- collect (`gradest report`, which needs the results cache): the finished cells of the study's profile become the
  report's data files: `results.csv` (a compare or probe study's rows; a train study's final numbers, one row per
  run), a train study's `curves.csv`, and `report.json` (spec, profile, how many cells finished, failed or were not
  run, the commits they were computed at, the failed cells' errors, and how the report was made).
- render (`gradest figures`, which needs only the report's folder and its spec): `summary.csv`, the figures and
  README.md, from the data files read back from disk. `gradest report` renders them the same way, so a report
  rebuilt from its committed CSVs is byte for byte the one `gradest report` wrote.

A compare or probe study's report has the estimators' bias, variance, MSE and cost per configuration (means over
seeds with t-intervals); a train study's, each run's final losses and routing, its time and FLOPs per update, and
its steps to a baseline's final loss, as ratios against that baseline. Which of the two a study gets is its kind's
`report` in `runner.CELL_KINDS`: given the finished cells it collects them, then renders; given None instead, it
renders the data files already in the report's folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from gradest.errors import GradestError
from gradest.presets import PRESET_SETTINGS
from gradest.study.runner import CELL_KINDS, finished
from gradest.study.spec import DEFAULT_PROFILE, TRAIN_OPTIONAL, Cell, Study, canonical, load_study, results_root

METRICS = ["rel_bias", "bias_sq", "variance", "mse", "cos_mean", "cos_of_mean", "sec_per_sample"]
COMPARE_KEYS = ["problem", "experts", "tokens", "dim", "out_dim", "classes", "power", "center", "top_k",
                "sharpness", "wrt", "samples", "estimator", "target"]
PROBE_KEYS = ["problem", "experts", "tokens", "top_k", "stage", "layer", "batch_size", "seq_len", "wrt", "samples",
              "reference", "estimator", "target"]
TRAIN_METRICS = ["val_loss", "train_loss", "bleu_val", "bleu_test", "sec_per_update", "seconds"]
# a train run's routing at the end of training: the mean of each over the last ROUTING_TAIL of its steps
ROUTING_METRICS = {"argmax_fraction": "argmax fraction", "router_entropy": "router entropy", "max_load": "max load"}
ROUTING_TAIL = 0.1
Sections = tuple[str, str, list[str], str]  # (summary paragraph, tables markdown, figure files, data files list)


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _read_data(out: Path, name: str) -> pd.DataFrame:
    """A data file of the report, as every render reads it (`gradest report` too, so that it renders what
    `gradest figures` will): cell hashes as text, as a hash of digits only is no number."""
    path = Path(out) / name
    if not path.is_file():
        raise GradestError(f"{path.as_posix()} is missing (`gradest report SPEC` writes it from the results cache)")
    return pd.read_csv(path, dtype={"cell": str})


def _varying(configs: list[dict], skip=("seed",)) -> list[str]:
    keys = dict.fromkeys(key for config in configs for key in config)
    return [key for key in keys if key not in skip
            and len({canonical(config.get(key)) for config in configs}) > 1]


def _commits(done: list[Cell]) -> str:
    """The commits the cells were computed at, as report.json and the README give them: `4cc45b6abc12`, or
    `abc (3 cells), def (dirty) (2 cells)` when they differ."""
    commits = {}
    for cell in done:
        git = _read_json(cell.directory / "done.json").get("git", {})
        label = git.get("commit", "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
        commits[label] = commits.get(label, 0) + 1
    return ", ".join(f"{commit} ({count} cells)" if len(commits) > 1 else commit for commit, count in commits.items())


# ------------------------------------------------------------------------------------ compare and probe studies
def is_reference_row(label) -> bool:
    """Whether a row's estimator is the reference the others are measured against: the estimator registered under
    the label's name (a label is `name` or `name(hparam=value, ...)`) enumerates every expert tuple (`enumerates`,
    the exact gradient). An unknown name is not."""
    from gradest.estimators import REGISTRY
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
    from gradest.io import atomic_write_text
    raw = pd.concat([pd.read_csv(cell.directory / "results.csv").assign(cell=cell.hash) for cell in done],
                    ignore_index=True)
    raw["rel_bias_sq"] = _relative_bias_sq(raw)
    atomic_write_text(out / "results.csv", raw.to_csv(index=False))


def _estimator_report(done: list[Cell] | None, out: Path, columns: list[str]) -> Sections:
    """The report of a compare or probe study, its rows configured by `columns`: `done` (unless None) collected
    into results.csv, then the sections rendered from it."""
    if done is not None:
        _collect_rows(done, out)
    return _render_estimators(_read_data(out, "results.csv"), out, columns)


def _render_estimators(raw: pd.DataFrame, out: Path, columns: list[str]) -> Sections:
    """summary.csv, the figures and the sections of a compare or probe study's report, from its results.csv."""
    from gradest.io import atomic_write_text
    from gradest.report import (aggregate_seeds, atomic_savefig, bias_interval_figure, bias_variance_figure,
                                configuration_label, metric_vs_experts_figure, plus_minus, stage_figure)
    keys = [key for key in columns if key in raw]
    # Relative bias over seeds: averaging each seed's sqrt(max(B^2, 0)) would be biased upwards (an unbiased
    # estimator's interval would exclude 0); the noise-corrected B^2 / ||g*||^2 is unbiased per seed, so average
    # that and take the square root of its mean and interval.
    raw["rel_bias_sq"] = _relative_bias_sq(raw)
    summary = aggregate_seeds(raw, keys, METRICS + ["rel_bias_sq"] + (["sharpness"] if "sharpness" not in keys
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


def _compare_report(study: Study, done: list[Cell] | None, out: Path, profile: str | None = None) -> Sections:
    """The report of a compare study (`runner.CELL_KINDS`): its rows are configured by COMPARE_KEYS."""
    return _estimator_report(done, out, COMPARE_KEYS)


def _probe_report(study: Study, done: list[Cell] | None, out: Path, profile: str | None = None) -> Sections:
    """The report of a probe study (`runner.CELL_KINDS`): its rows are configured by PROBE_KEYS."""
    return _estimator_report(done, out, PROBE_KEYS)


# ------------------------------------------------------------------------------------------------ train studies
NOT_GROUPS = ("variant", "seed", "estimator", "hparams", "omega", "name")  # grid keys that make arms, not groups
RATIOS = ("val_loss_diff", "time_ratio", "flops_ratio", "steps_ratio", "baseline_steps_ratio")  # against a baseline


def _train_label(config: dict, varying: list[str]) -> str:
    """A run's label: the variant's name (else the estimator), plus the settings that vary beside it. A named
    variant's own settings (e.g. the dense baseline's `model`) are what its name says, so they are not repeated."""
    name = config.get("name") or config["estimator"]
    skip = {"name", "estimator"} | ({"model", "hparams", "omega", "top_k", "experts"} if config.get("name") else set())
    extra = [key for key in varying if key not in skip]
    values = {key: config.get(key) for key in extra}  # (an optional run setting a cell leaves out: None)
    return name + "".join(f", {key}={canonical(value) if isinstance(value, dict) else value}"
                          for key, value in values.items())


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
    for column in RATIOS:
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


def _setting(config: dict, key: str):
    """A train cell's value of a setting named by a dotted path (`model.balance_coef`:
    config["model"]["balance_coef"]); a model setting the cell leaves out is its task's default model's, and a run
    setting it leaves out (`spec.TRAIN_OPTIONAL`) its default ("none" for no `preset`: a group needs a value)."""
    from gradest.config import TASK_MODELS
    from gradest.model import SwitchConfig
    if key in TRAIN_OPTIONAL and key not in config:
        return "none" if TRAIN_OPTIONAL[key] is None else TRAIN_OPTIONAL[key]
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            head, _, name = key.partition(".")
            default = SwitchConfig(**TASK_MODELS[config["task"]])
            if head != "model" or not hasattr(default, name):
                raise GradestError(f"a train cell has no setting '{key}' to group its study's report by")
            return getattr(default, name)
        value = value[part]
    return value


def _group_candidates(study: Study, profile: str | None) -> list[str]:
    """The settings that may group a train study's runs: its `group_by`, else the profile's grid keys that do not
    make arms. Those that vary between the runs are the group keys: columns of results.csv."""
    grid, _ = study.layout(profile)
    return list(study.group_by) or [key for key in grid if key not in NOT_GROUPS]


def _routing(metrics: pd.DataFrame) -> dict:
    """A run's routing at the end of training: each of ROUTING_METRICS that its metrics.csv has, the mean over the
    last ROUTING_TAIL of its steps (over its last logged value when none falls there). A dense run has none."""
    routing = {}
    for column in ROUTING_METRICS:
        if column in metrics:
            logged = metrics.dropna(subset=[column])
            if len(logged):
                tail = logged[logged["step"] > (1 - ROUTING_TAIL) * metrics["step"].iloc[-1]]
                routing[column] = float((tail if len(tail) else logged.tail(1))[column].mean())
    return routing


def _train_runs(done: list[Cell], group_keys: list[str], label_keys: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(finals, curves): one row per run with its final numbers, and its validation curve, both labelled."""
    finals, curves = [], []
    for cell in done:
        label = _train_label(cell.config, label_keys)
        metrics = pd.read_csv(cell.directory / "run" / "metrics.csv")
        summary = _read_json(cell.directory / "done.json")
        final = metrics.iloc[-1]
        groups = {key: _setting(cell.config, key) for key in group_keys}
        row = {**groups, "label": label, "seed": cell.config["seed"], "cell": cell.hash, "steps": int(final["step"]),
               "val_loss": final["val_loss"], "train_loss": final["train_loss"],
               "sec_per_update": update_seconds(metrics), "seconds": summary["seconds"],
               "flops_per_update": summary["summary"].get("flops_per_update", np.nan)}
        for key in ("bleu_val", "bleu_test"):
            if key in metrics:
                row[key] = final[key]
        finals.append({**row, **_routing(metrics)})
        points = metrics.dropna(subset=["val_loss"])[["step", "val_loss", "train_loss"]].copy()
        for key, value in {"cell": cell.hash, **groups, "label": label, "seed": cell.config["seed"]}.items():
            points[key] = value
        curves.append(points)
    finals = pd.DataFrame(finals)
    if finals["flops_per_update"].notna().any():
        finals["gflops_per_update"] = finals["flops_per_update"] / 1e9
    return finals, pd.concat(curves, ignore_index=True)


def _baseline(study: Study, finals: pd.DataFrame) -> str:
    """The label ratios are taken against: the study's baseline, if one of the runs has that label."""
    return study.baseline if study.baseline in set(finals["label"]) else ""


def _collect_train(study: Study, done: list[Cell], out: Path, profile: str | None) -> None:
    """A train study's data: results.csv, the final numbers of each run, labelled and grouped (the group keys that
    vary, see `_group_candidates`), with its ratios against the baseline; curves.csv, its validation curve."""
    from gradest.io import atomic_write_text
    candidates = _group_candidates(study, profile)
    group_keys = [key for key in candidates
                  if len({canonical(_setting(cell.config, key)) for cell in done}) > 1]
    # a label names a run by what varies beside the groups (and the seed, over which the tables average)
    # (grouped by preset, the settings a preset fills are the group's)
    skip = ("seed", "name", *(PRESET_SETTINGS if "preset" in group_keys else ()))
    label_keys = [key for key in _varying([cell.config for cell in done], skip=skip) if key not in group_keys]
    finals, curves = _train_runs(done, group_keys, label_keys)
    baseline = _baseline(study, finals)
    if baseline:  # (the render computes them again; they are in results.csv for whoever reads it)
        finals = _baseline_ratios(finals, curves, group_keys, baseline)
    atomic_write_text(out / "results.csv", finals.to_csv(index=False))
    atomic_write_text(out / "curves.csv", curves.to_csv(index=False))


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
        groups = list(summary[group_keys].astype(str).agg(", ".join, axis=1)) if group_keys else None
        atomic_savefig(ratios_figure(summary, baseline, metrics, groups, ", ".join(group_keys)), out / "ratios.png",
                       dpi=100)
        figures.append("ratios.png")
    return figures


def _train_report(study: Study, done: list[Cell] | None, out: Path, profile: str | None = None) -> Sections:
    """The report of a train study (`runner.CELL_KINDS`): `done` (unless None) collected into results.csv and
    curves.csv, then the sections rendered from them."""
    if done is not None:
        _collect_train(study, done, out, profile)
    return _render_train(study, _read_data(out, "results.csv"), _read_data(out, "curves.csv"), out, profile)


def _render_train(study: Study, finals: pd.DataFrame, curves: pd.DataFrame, out: Path, profile: str | None) -> Sections:
    """summary.csv, the figures and the sections of a train study's report, from its results.csv and curves.csv."""
    from gradest.io import atomic_write_text
    from gradest.report import aggregate_seeds, plus_minus
    group_keys = [key for key in _group_candidates(study, profile)
                  if key in finals and finals[key].nunique(dropna=False) > 1]
    group_rows = finals[group_keys].drop_duplicates().sort_values(group_keys).to_dict("records") if group_keys \
        else [{}]
    label_groups = finals.groupby("label")[group_keys].apply(lambda g: len(g.drop_duplicates())) if group_keys \
        else pd.Series(dtype=int)
    # a run of a single group in a study grouped by its grid (the dense baseline, whose variant pins n) is drawn in
    # every group's panel; a study grouped by `group_by` names its groups itself, and an arm of one group stays there
    references = set() if study.group_by else {label for label, count in label_groups.items()
                                               if count == 1 and len(group_rows) > 1}
    # the ratios follow the spec's baseline, not the one results.csv was collected with
    finals = finals.drop(columns=[column for column in RATIOS if column in finals])
    baseline = _baseline(study, finals)
    if baseline:
        finals = _baseline_ratios(finals, curves, group_keys, baseline)
    metric_names = [m for m in TRAIN_METRICS + list(ROUTING_METRICS)
                    + ["gflops_per_update", "val_loss_diff", "time_ratio", "flops_ratio"] if m in finals]
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
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    columns = {"final validation loss": "val_loss"}
    if convergence:
        columns[f"minus {baseline}'s (paired by seed)"] = "val_loss_diff"
    columns["final train loss"] = "train_loss"
    if "bleu_test" in summary:
        columns.update({"BLEU val": "bleu_val", "BLEU test": "bleu_test"})
    columns.update({name: metric for metric, name in ROUTING_METRICS.items() if metric in summary})
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
    routing = [name for metric, name in ROUTING_METRICS.items() if metric in summary]
    if routing:
        paragraph += (f" {', '.join(routing).capitalize()}: each run's mean over the last {ROUTING_TAIL:.0%} of its "
                      f"training steps.")
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
    from gradest.io import run_metadata, write_json
    profile = study.resolve_profile(profile)
    done, failed, missing = finished(study, profile, results)
    if not done:
        raise GradestError(f"no finished cells of study '{study.name}' (profile {profile or 'base'}) in "
                           f"{results_root(results) / study.kind}/; run `gradest study run "
                           f"{study.path or study.name}"
                           f"{f' --profile {profile}' if profile else ''}` first")
    out = Path(out or report_dir(study, profile))
    sections = CELL_KINDS[study.kind].report(study, done, out, profile)  # collected, then rendered from the files
    spec = study.path.as_posix() if study.path else study.name
    write_json(out / "report.json", {
        "study": spec, "profile": profile, "results": str(results_root(results)),
        "cells": {"done": len(done), "failed": len(failed), "missing": len(missing)}, "commits": _commits(done),
        "failed": [{"cell": cell.hash, "error": _read_json(cell.directory / "error.json")["error"]}
                   for cell in failed],
        **run_metadata({"study": spec, "profile": profile}, None, command)})
    _write_readme(study, out, _read_meta(out), sections)
    return out


def render_report(out) -> Path:
    """`gradest figures`, for one report: its summary.csv, figures and README.md rendered again from the data files
    in `out` and the spec its report.json names, without the results cache. report.json and the data files are left
    as they are."""
    out = Path(out)
    meta = _read_meta(out)
    study = load_study(meta["study"])
    sections = CELL_KINDS[study.kind].report(study, None, out, meta["profile"])
    _write_readme(study, out, meta, sections)
    return out


def _read_meta(out: Path) -> dict:
    """A report's report.json, which has what its README says of the cells (written by `write_report`)."""
    meta = _read_json(out / "report.json")
    if "commits" not in meta or "failed" not in meta:
        raise GradestError(f"{(out / 'report.json').as_posix()} has no commits or failed cells (an older gradest "
                           f"wrote it); write the report again with `gradest report {meta.get('study', 'SPEC')}`")
    return meta


def _write_readme(study: Study, out: Path, meta: dict, sections: Sections) -> None:
    """README.md: the study's description and findings, the sections, and what report.json (`meta`) says of the
    cells (how many finished, the commits they were computed at, the failed ones' errors); the figures the report
    no longer has removed."""
    from gradest.io import atomic_write_text
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
