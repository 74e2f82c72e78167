"""The `train` study kind: one cell is one training run (`gradest run`'s `TrainConfig`), trained in the cell's
directory and resumed from its checkpoint if killed.

Its report has each run's final losses and routing, its time and FLOPs per update, and its steps to a baseline's
final loss, as ratios against that baseline paired by seed (same initialisation and data order), grouped by the
settings the study varies.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from gradest.devices import check_device_type
from gradest.errors import GradestError
from gradest.figures import atomic_savefig, curves_figure, metric_vs_experts_figure, ratios_figure
from gradest.io import atomic_write_text
from gradest.model import SwitchConfig
from gradest.presets import PRESET_SETTINGS, apply_preset
from gradest.statistics import aggregate_seeds, holm, mean_interval, p_text, paired_test, plus_minus, welch_test
from gradest.study.kind import CellKind, Sections, register_cell_kind
from gradest.study.reports import read_data, read_json
from gradest.study.spec import Cell, Study, canonical
from gradest.config import RUN_SETTINGS, TASK_MODELS, TrainConfig
from gradest.train import Trainer

# Run settings a train cell's config holds only when they differ from their defaults (RunSetting.stored "set" or
# "hf"), so that adding them left every earlier cell's hash as it was (TrainConfig.settings() leaves them out the same
# way); and the type a spec may give a setting whose default None means "unset".
def optional_settings() -> dict:
    return {name: s.default for name, s in RUN_SETTINGS.items() if s.stored != "always"}


def optional_types() -> dict:
    return {"name": str, "omega": bool, **{name: s.kind for name, s in RUN_SETTINGS.items() if s.default is None}}


def train_fields(config: dict) -> dict:
    """The run settings of a train cell's config (TrainConfig's flat settings: `TrainConfig(**train_fields(...))`)."""
    keys = [*TrainConfig().settings(), *(key for key in optional_settings() if key in config)]
    return {key: config[key] for key in keys}


def defaults() -> dict:
    return {"name": None, **TrainConfig().settings(), **optional_settings()}


def resolve(config: dict, given=()) -> dict:
    """A `TrainConfig` (its settings and its model's checked) that builds its estimator, on a device torch knows.
    A `preset` fills the settings the spec does not give (gradest.presets), so the cell holds, and its hash covers,
    the settings the run will have."""
    if config.get("preset"):
        spec = {key: config[key] for key in ("task", "estimator", *given) if key in config and key != "preset"}
        config = {**config, **apply_preset(config["preset"], spec)}
    TrainConfig(**train_fields(config)).build_estimator()
    check_device_type(config["device"])
    optional = optional_settings()
    return {key: value for key, value in config.items() if not (key in optional and value == optional[key])}


def check_memory(config: dict) -> None:
    from gradest.memory import check_training
    check_training(TrainConfig(**train_fields(config)))


def run(config: dict, directory: Path) -> dict:
    """A Trainer run in `directory/run`, continued from its checkpoint when a previous attempt was killed."""
    out = directory / "run"
    if (out / "checkpoint.pt").is_file():
        trainer = Trainer.resume(out)
    else:
        trainer = Trainer(TrainConfig(**train_fields(config)), out)
    name = f"cell {directory.name} ({config.get('name') or config['estimator']}, seed {config['seed']})"

    def on_line(line, row):  # the lines `gradest run` prints: a study's captured log shows each run go
        print(f"{name} {line}", flush=True)

    try:
        metrics = trainer.run(on_line=on_line)
    finally:
        trainer.close()
    final = metrics.iloc[-1]
    summary = {"steps": int(final["step"]), "train_loss": float(final["train_loss"]),
               "val_loss": float(final["val_loss"]), "train_seconds": float(final["seconds"]),
               "sec_per_update": float(final["seconds"]) / max(1, int(final["step"])),
               "flops_per_update": trainer.flops_per_update()}
    for key in ("bleu_val", "bleu_test"):
        if key in final:
            summary[key] = float(final[key])
    return summary


# ----------------------------------------------------------------------------------------------------- report
TRAIN_METRICS = ["val_loss", "train_loss", "bleu_val", "bleu_test", "sec_per_update", "seconds"]
# a train run's routing at the end of training: the mean of each over the last ROUTING_TAIL of its steps
ROUTING_METRICS = {"argmax_fraction": "argmax fraction", "router_entropy": "router entropy", "max_load": "max load"}
ROUTING_TAIL = 0.1
NOT_GROUPS = ("variant", "seed", "estimator", "hparams", "omega", "name")  # grid keys that make arms, not groups
RESULTS_COLUMNS = ["label", "seed", "cell", "steps", "val_loss", "train_loss", "sec_per_update", "seconds"]
CURVES_COLUMNS = ["cell", "step", "val_loss", "label", "seed"]
RATIOS = ("val_loss_diff", "time_ratio", "flops_ratio", "steps_ratio", "baseline_steps_ratio")  # against a baseline


def _varying(configs: list[dict], skip=("seed",)) -> list[str]:
    keys = dict.fromkeys(key for config in configs for key in config)
    return [key for key in keys if key not in skip
            and len({canonical(config.get(key)) for config in configs}) > 1]


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
    setting it leaves out (`optional_settings`) its default ("none" for no `preset`: a group needs a value)."""
    optional = optional_settings()
    if key in optional and key not in config:
        return "none" if optional[key] is None else optional[key]
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
        summary = read_json(cell.directory / "done.json")
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


def report(study: Study, done: list[Cell] | None, out: Path, profile: str | None = None) -> Sections:
    """The report of a train study: `done` (unless None) collected into results.csv and
    curves.csv, then the sections rendered from them."""
    if done is not None:
        _collect_train(study, done, out, profile)
    return _render_train(study, read_data(out, "results.csv", RESULTS_COLUMNS), read_data(out, "curves.csv", CURVES_COLUMNS), out, profile)


def _render_train(study: Study, finals: pd.DataFrame, curves: pd.DataFrame, out: Path, profile: str | None) -> Sections:
    """summary.csv, the figures and the sections of a train study's report, from its results.csv and curves.csv."""
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
    def values_of(r, metric) -> int:  # a partial study's paired differences can be fewer than its seeds
        runs = finals[_in_group(finals, {k: r[k] for k in group_keys}) & (finals["label"] == r["label"]).to_numpy()]
        return int(np.isfinite(runs[metric].to_numpy(float)).sum())

    tables, ranked = [], []
    for group in group_rows:
        rows = summary[_in_group(summary, group)]
        table = pd.DataFrame({"run": rows["label"], "seeds": rows["seeds"],
                              **{name: [plus_minus(r[m], r[f"{m}_lo"], r[f"{m}_hi"], values_of(r, m))
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
    if convergence:
        tables.append(_tests(finals, curves, group_rows, group_keys, baseline, out, study.lead_at))
        paragraph += (" The tests (below the tables) are paired by seed; each family of comparisons is corrected by "
                      "Holm's method over that family.")
        data += "\n- [tests.csv](tests.csv): every test of the Tests section, with its family and Holm-adjusted p"
    return paragraph, "\n\n".join(tables), figures, data


def _tests(finals: pd.DataFrame, curves: pd.DataFrame, group_rows: list[dict], group_keys: list[str],
           baseline: str, out: Path, lead_at: int | None = None) -> str:
    """The tests a train study's findings may quote, in families, each corrected by Holm's method over itself:
    every arm against the baseline in its group (paired t over seeds); every two other arms of a group (paired t of
    their difference, seed by seed: is one lead larger than the other?); an arm's lead over the baseline in two
    groups that differ in one setting (Welch's t: does the lead change with that setting?); and each arm's lead at
    step `lead_at` (by default, where runs stop at different steps (a plateau rule), the last step every run
    reached) against its lead at the end (paired t of the change: does the lead persist, shrink or grow?).
    tests.csv holds them all."""
    rows = []
    diffs = {}  # (group index, label) -> {seed: val_loss_diff}
    for index, group in enumerate(group_rows):
        runs = finals[_in_group(finals, group)]
        for label, arm in runs.groupby("label", sort=False):
            if label != baseline:
                diffs[(index, label)] = {seed: diff for seed, diff in zip(arm["seed"], arm["val_loss_diff"])
                                         if np.isfinite(diff)}  # a seed whose baseline run is missing: no pair
    for (index, label), values in diffs.items():
        rows.append({"family": f"against {baseline}", "group": _group_name(group_rows[index], group_keys),
                     "comparison": f"{label} - {baseline}", **paired_test(list(values.values()))})
    for index, group in enumerate(group_rows):
        labels = [label for (i, label) in diffs if i == index]
        for a_index, first in enumerate(labels):
            for second in labels[a_index + 1:]:
                a, b = diffs[(index, first)], diffs[(index, second)]
                seeds = sorted(set(a) & set(b))
                rows.append({"family": "between arms", "group": _group_name(group, group_keys),
                             "comparison": f"{first} - {second}", **paired_test([a[s] - b[s] for s in seeds])})
    for (index, label), values in diffs.items():
        for other in range(index + 1, len(group_rows)):  # groups that differ in one setting only
            following = diffs.get((other, label))
            changed = [key for key in group_keys if group_rows[other][key] != group_rows[index][key]]
            if following is None or len(changed) != 1:
                continue
            names = f"{_group_name(group_rows[other], group_keys)} vs {_group_name(group_rows[index], group_keys)}"
            rows.append({"family": "between groups", "group": names, "comparison": f"({label} - {baseline}) change",
                         **welch_test(list(following.values()), list(values.values())),
                         "lower": np.nan, "sign_p": np.nan})
    rows += _lead_over_training(finals, curves, group_rows, group_keys, baseline, diffs, lead_at)
    tests = pd.DataFrame(rows, columns=["family", "group", "comparison", "mean", "lo", "hi", "seeds", "lower", "p",
                                        "sign_p"])
    tests["holm_p"] = np.nan
    for _, family in tests.groupby("family", sort=False):
        tests.loc[family.index, "holm_p"] = holm(family["p"].to_numpy(float))
    atomic_write_text(out / "tests.csv", tests.to_csv(index=False))
    lead_desc = "the spec's `lead_at`" if lead_at else "the last evaluation every run reached"
    sections = []
    for name, family in tests.groupby("family", sort=False):
        table = pd.DataFrame({
            "group": family["group"], "comparison": family["comparison"], "seeds": family["seeds"].astype(int),
            "mean difference": [plus_minus(r["mean"], r["lo"], r["hi"], r["seeds"]) if np.isfinite(r["lo"])
                                else f"{r['mean']:+.4g}" if np.isfinite(r["mean"]) else "-"
                                for _, r in family.iterrows()],
            "lower in": [f"{int(r['lower'])} of {int(r['seeds'])}" if np.isfinite(r["lower"]) else "-"
                         for _, r in family.iterrows()],
            "sign test p": [p_text(p) for p in family["sign_p"]], "t-test p": [p_text(p) for p in family["p"]],
            f"Holm p (over these {len(family)})": [p_text(p) for p in family["holm_p"]]})
        what = {f"against {baseline}": f"each arm's final validation loss minus `{baseline}`'s, paired by seed "
                                       f"(Student's t)",
                "between arms": "one arm's difference from the baseline minus another's, paired by seed "
                                "(Student's t): is one effect larger than the other?",
                "between groups": "an arm's mean difference from the baseline in one group minus that in another "
                                  "group that differs in one setting (Welch's t): does the effect change with that "
                                  "setting?",
                "over training": f"each arm's difference from the baseline at step S ({lead_desc}), and its final "
                                 "difference minus that one, paired by seed "
                                 "(Student's t): does the lead persist (no change), shrink or grow by the end?"}[name]
        sections.append(f"#### Tests: {name}\n\n{what}; family: the {len(family)} tests of this table.\n\n"
                        + table.to_markdown(index=False))
    return "### Tests\n\n" + "\n\n".join(sections)


def _lead_over_training(finals: pd.DataFrame, curves: pd.DataFrame, group_rows: list[dict], group_keys: list[str],
                        baseline: str, diffs: dict, lead_at: int | None = None) -> list[dict]:
    """The "over training" family: per arm, its paired difference from the baseline at step S and the change from
    there to the final difference. S is `lead_at`, else (runs of different lengths only) the last evaluation every
    run of the study reached. A seed without an evaluation at S in both runs has no pair."""
    if lead_at is None and finals["steps"].nunique() < 2:
        return []
    horizon = lead_at or int(finals["steps"].min())
    at = curves[curves["step"] == horizon].set_index("cell")["val_loss"]
    rows = []
    for (index, label), final in diffs.items():
        group = finals[_in_group(finals, group_rows[index])]
        base = group[group["label"] == baseline].set_index("seed")["cell"]
        arm = group[group["label"] == label].set_index("seed")["cell"]
        seeds = [seed for seed in final if seed in base.index and seed in arm.index
                 and arm[seed] in at.index and base[seed] in at.index]
        early = {seed: float(at[arm[seed]] - at[base[seed]]) for seed in seeds}
        name = _group_name(group_rows[index], group_keys)
        rows.append({"family": "over training", "group": name, "comparison": f"{label} - {baseline} at step {horizon}",
                     **paired_test(list(early.values()))})
        rows.append({"family": "over training", "group": name,
                     "comparison": f"({label} - {baseline}) final minus at step {horizon}",
                     **paired_test([final[seed] - early[seed] for seed in seeds])})
    return rows


register_cell_kind(CellKind("train", defaults=defaults, resolve=resolve, run=run, report=report,
                            optional_types=optional_types, check_memory=check_memory))
