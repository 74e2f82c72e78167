"""The figures of every report: bias and variance of the estimators, training curves, ratios against a baseline.

Each estimator has one colour in every figure of every report (`estimator_colour`), and one marker per family.
Figures are drawn on matplotlib's Agg canvas without pyplot, so importing this module changes no global backend
and leaks no figures; they are saved atomically (`atomic_savefig`), and a PNG's bytes depend on its pixels only.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gradest.estimators import REGISTRY
from gradest.io import atomic_write
from gradest.measure import by_configuration
from gradest.statistics import mean_interval

# Values this far below a panel's largest are rounding noise (exact's bias, topk's variance), i.e. zero.
NUMERICALLY_ZERO = 1e-8


FAMILY_MARKERS = ("o", "s", "^", "D", "P", "X", "v", "*")


def atomic_savefig(fig: Figure, path, **kwargs) -> Path:
    """Save `fig` to `path` atomically, its format taken from the suffix (the temporary file's name has none). A
    PNG's bytes depend on its pixels only: without matplotlib's version in its metadata, a committed figure drawn
    again the same is the same file."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    if fmt == "png":
        kwargs.setdefault("metadata", {"Software": None})
    return atomic_write(path, lambda handle: fig.savefig(handle, format=fmt, **kwargs))


def _panel_grid(count: int, panel_width: float, panel_height: float):
    """A figure with `count` panels (at most 3 a row) on an Agg canvas, and its axes in reading order."""
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(panel_width * cols, panel_height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _floor_for_log(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values ready for a log axis, and which of them are (numerically) zero: those are raised to a floor just
    below the smallest nonzero value, so that exact or noise-corrected zeros don't stretch the axis."""
    positive = values[np.isfinite(values) & (values > 0)]
    nonzero = positive[positive > positive.max() * NUMERICALLY_ZERO] if positive.size else positive
    floor = nonzero.min() / 3 if nonzero.size else 1.0
    at_floor = ~(values >= floor)
    return np.where(at_floor, floor, values), at_floor


NO_ESTIMATOR_COLOUR = (0.45, 0.45, 0.45)  # a label that names no estimator, e.g. the dense baseline


# The routers drawn in one panel of the training studies get far-apart hues. Slots of the palette below:
# tab10 (grey dropped) 0 blue, 1 orange, 2 green, 3 red, 4 purple, 5 brown, 6 pink, 7 olive, 8 cyan, then Dark2.
FIXED_COLOURS = {"switch": 0, "sparsemixer": 1, "densemixer": 2, "default-moe": 4,  # top-1 panels
                 "topk": 3, "sparsemixer-v2": 8, "sparsemixer-v2*": 7}             # top-2 panels


def estimator_colour(label) -> tuple:
    """The colour of an estimator in every figure of every report: fixed by its name (its slot in FIXED_COLOURS,
    or its place among the other registered names), a lighter shade for each of its variants (its declared variants
    first, then any other setting, e.g. `st(tau=0.5)` or a study's arm `switch + omega`), grey for a label that
    names no estimator."""
    label = str(label)
    name = re.split(r"[(:\s]", label, maxsplit=1)[0]
    if name not in REGISTRY:
        return NO_ESTIMATOR_COLOUR
    palette = [c for i, c in enumerate(sns.color_palette("tab10")) if i != 7] + sns.color_palette("Dark2")[:7]  # no grey
    free = [slot for slot in range(len(palette)) if slot not in FIXED_COLOURS.values()]
    others = sorted(set(REGISTRY) - set(FIXED_COLOURS))  # the rest in name order, in the free slots
    base = palette[FIXED_COLOURS[name] if name in FIXED_COLOURS else free[others.index(name) % len(free)]]
    variants = list(dict.fromkeys([name] + [REGISTRY[name](**v).label for v in REGISTRY[name].variants]))
    rank = variants.index(label) if label in variants else len(variants)
    lighten = min(0.6, 0.3 * rank)
    return tuple(c + (1 - c) * lighten for c in base)


def estimator_styles(labels) -> dict[str, dict]:
    """The colour of each estimator and a marker per family, so one legend serves every panel."""
    labels = list(dict.fromkeys(labels))
    families = list(dict.fromkeys(_family(label) for label in labels))
    return {label: {"color": estimator_colour(label),
                    "marker": FAMILY_MARKERS[families.index(_family(label)) % len(FAMILY_MARKERS)]}
            for label in labels}


def _family(label: str) -> str:
    cls = REGISTRY.get(label.split("(")[0])
    return cls.family if cls else label


def bias_variance_figure(df: pd.DataFrame) -> Figure:
    """Relative bias against variance, log-log, one point per estimator (named in the legend), one panel per
    configuration. Zeros (exact, deterministic or unbiased estimators) are open markers at the axis floor."""
    groups = list(by_configuration(df))
    styles = estimator_styles(df["estimator"])
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
        fig, axes = _panel_grid(len(groups), 4.5, 4.0)
        for ax, (label, rows) in zip(axes, groups):
            variance, variance_zero = _floor_for_log(rows["variance"].to_numpy(float))
            bias, bias_zero = _floor_for_log(rows["rel_bias"].to_numpy(float))
            for i, name in enumerate(rows["estimator"]):
                style = styles[name]
                ax.scatter(variance[i], bias[i], s=45, marker=style["marker"], label=name,
                           edgecolors=style["color"],
                           facecolors="none" if variance_zero[i] or bias_zero[i] else style["color"])
            ax.set(xscale="log", yscale="log", xlabel="variance (trace of covariance)",
                   ylabel="relative bias (noise-corrected)", title=label)
        handles = {}
        for ax in axes:  # one legend entry per estimator, whichever panels it appears in
            for handle, name in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(name, handle)
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=7)
        fig.suptitle("Relative bias vs variance (open markers: zero, drawn at the axis floor)", fontsize=9)
    return fig


def bias_interval_figure(df: pd.DataFrame) -> Figure:
    """Relative bias with its 95% jackknife interval, one horizontal bar per estimator, one panel per
    configuration."""
    groups = list(by_configuration(df))
    styles = estimator_styles(df["estimator"])
    most = max(len(rows) for _, rows in groups)
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
        fig, axes = _panel_grid(len(groups), 5.5, 1.2 + 0.3 * most)
        for ax, (label, rows) in zip(axes, groups):
            bias = rows["rel_bias"].to_numpy(float)
            below = np.clip(bias - rows["rel_bias_lo"].to_numpy(float), 0, None)
            above = np.clip(rows["rel_bias_hi"].to_numpy(float) - bias, 0, None)
            positions = np.arange(len(rows))
            ax.barh(positions, bias, xerr=[below, above], color=[styles[name]["color"] for name in rows["estimator"]],
                    capsize=3,
                    error_kw={"elinewidth": 1})
            ax.set_yticks(positions, rows["estimator"])
            ax.invert_yaxis()  # first measured on top, as in the tables
            ax.set(xlabel="relative bias, 95% CI", title=label)
    return fig


def stage_figure(summary: pd.DataFrame, metric: str = "rel_bias", xlabel: str = "relative bias",
                 cap: float = 2.0) -> Figure:
    """A metric per estimator at each `stage` (the probe at initialisation and after training), mean over seeds
    with 95% interval bars; one panel per probed layer (and whatever else distinguishes the rows). Means above
    `cap` are cut at the axis limit and printed."""
    frame = summary.copy()
    frame["panel"] = [f"layer {row['layer']}" if "layer" in frame else "" for _, row in frame.iterrows()]
    stages = sorted(set(frame["stage"]), key=lambda stage: (stage != "init", stage))  # init first
    colours = dict(zip(stages, sns.color_palette("tab10", len(stages))))
    panels = list(dict.fromkeys(frame["panel"]))
    estimators = list(dict.fromkeys(frame["estimator"]))
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
        fig, axes = _panel_grid(len(panels), 5.5, 1.5 + 0.32 * len(estimators))
        height = 0.8 / len(stages)
        for ax, panel in zip(axes, panels):
            for i, stage in enumerate(stages):
                rows = frame[(frame["panel"] == panel) & (frame["stage"] == stage)].set_index("estimator")
                rows = rows.reindex(estimators)
                value = rows[metric].to_numpy(float)
                below = np.clip(value - rows[f"{metric}_lo"].to_numpy(float), 0, None)
                above = np.clip(rows[f"{metric}_hi"].to_numpy(float) - value, 0, None)
                ax.barh(np.arange(len(estimators)) + i * height, value, height=height, xerr=[below, above],
                        color=colours[stage], label=stage, capsize=2, error_kw={"elinewidth": 0.8})
            # a few noisy estimators (REINFORCE without a baseline) would squash the rest: cut the axis, say so
            values = frame.loc[frame["panel"] == panel, metric].to_numpy(float)
            limit = max(1.0, 1.15 * float(np.nanmax(np.where(values <= cap, values, np.nan), initial=0)))
            for i, stage in enumerate(stages):
                rows = frame[(frame["panel"] == panel) & (frame["stage"] == stage)].set_index("estimator")
                for j, value in enumerate(rows.reindex(estimators)[metric].to_numpy(float)):
                    if value > limit:
                        ax.text(limit * 0.98, j + i * height, f"{value:.3g} →", ha="right", va="center", fontsize=6)
            ax.set_xlim(0, limit)
            ax.set_yticks(np.arange(len(estimators)) + height * (len(stages) - 1) / 2, estimators)
            ax.invert_yaxis()
            ax.set(xlabel=f"{xlabel}, mean over seeds, 95% CI", title=panel)
            ax.legend(fontsize=7, title="stage")
    return fig


def objective_figure(metrics: pd.DataFrame, estimator_label: str) -> Figure:
    """The exact objective J along both training runs, and their losses under inference routing (dashed)."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        blue, orange = estimator_colour(estimator_label), estimator_colour("exact")
        ax.plot(metrics["step"], metrics["objective"], color=blue, label=f"J, trained with {estimator_label}")
        ax.plot(metrics["step"], metrics["objective_exact_run"], color=orange, label="J, trained with exact gradient")
        if not metrics["own_objective"].equals(metrics["objective"]):  # a mask or temperature changes its target
            ax.plot(metrics["step"], metrics["own_objective"], color=blue, ls=":",
                    label=f"{estimator_label}'s own objective (its mask/temperature)")
        ax.plot(metrics["step"], metrics["inference_loss"], color=blue, ls="--", lw=1, alpha=0.7,
                label=f"inference loss, {estimator_label}")
        ax.plot(metrics["step"], metrics["inference_loss_exact_run"], color=orange, ls="--", lw=1, alpha=0.7,
                label="inference loss, exact")
        ax.set(xlabel="step", ylabel="loss", title="Exact objective J during training")
        ax.legend(fontsize=8)
    return fig


def training_figure(metrics: pd.DataFrame, estimator_label: str) -> Figure:
    """Training loss (light, and its moving average) and validation loss against step; routing statistics."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        loss_ax, routing_ax = fig.subplots(1, 2, width_ratios=(3, 2))
        blue, orange, green = sns.color_palette()[:3]
        window = max(1, len(metrics) // 50)
        loss_ax.plot(metrics["step"], metrics["train_loss"], color=blue, alpha=0.25, lw=0.8)
        loss_ax.plot(metrics["step"], metrics["train_loss"].rolling(window, min_periods=1).mean(), color=blue,
                     label="train loss")
        if "val_loss" in metrics:
            val = metrics.dropna(subset=["val_loss"])
            loss_ax.plot(val["step"], val["val_loss"], "o-", color=orange, label="validation loss")
        loss_ax.set(xlabel="step", ylabel="cross-entropy (nats per token)", title=f"Switch, {estimator_label}")
        loss_ax.legend()
        if "argmax_fraction" in metrics:
            routing_ax.plot(metrics["step"], metrics["argmax_fraction"], color=green)
            routing_ax.set(xlabel="step", ylim=(0, 1.05), title="routing (mean over MoE layers)")
            routing_ax.set_ylabel("fraction routed to the arg-max", color=green)
            load_ax = routing_ax.twinx()
            load_ax.grid(False)
            load_ax.plot(metrics["step"], metrics["max_load"], color=orange, lw=1)
            load_ax.set_ylabel("busiest expert's load / mean (1 = balanced)", color=orange)
            load_ax.set_ylim(bottom=0)
        else:
            routing_ax.set_axis_off()
    return fig


def curves_figure(panels: dict[str, dict[str, pd.DataFrame]], column: str = "val_loss",
                  ylabel: str = "validation loss") -> Figure:
    """Mean of `column` against step over seeds, with its 95% t-band, one line per label (a label keeps its colour
    in every panel); one panel per entry of `panels` (title -> {label: frame}). Each frame has columns step, seed
    and `column`."""
    labels = list(dict.fromkeys(label for curves in panels.values() for label in curves))
    colours = {label: estimator_colour(label) for label in labels}
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        columns = min(len(panels), 2)
        rows = math.ceil(len(panels) / columns)
        fig = Figure(figsize=(7 * columns, 4.5 * rows), layout="constrained")
        FigureCanvasAgg(fig)
        axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False).ravel())
        for ax, (title, curves) in zip(axes, panels.items()):
            for label, frame in curves.items():
                points = frame.dropna(subset=[column])
                stats_ = [(step, *mean_interval(group[column].to_numpy(float)))
                          for step, group in points.groupby("step")]
                if not stats_:
                    continue
                steps, mean, lo, hi, n = (np.array(x) for x in zip(*stats_))
                seeds = int(n.max())
                ax.plot(steps, mean, "o-", ms=3, color=colours[label],
                        label=f"{label} ({seeds} seed{'s' * (seeds > 1)})")
                ax.fill_between(steps, lo, hi, color=colours[label], alpha=0.2, lw=0)
            ax.set(xlabel="step", ylabel=ylabel, title=title if len(panels) > 1 else
                   f"{ylabel}: mean over seeds, 95% t-band")
            ax.legend(fontsize=8)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
    return fig


def ratios_figure(summary: pd.DataFrame, baseline: str, metrics: list[str], groups: list[str] | None = None,
                  group_by: str = "") -> Figure:
    """Each run against the baseline (mean over seeds, 95% interval bars), one panel per metric: ratios (time,
    FLOPs per update; 1 = the same) or paired differences (`*_diff`; 0 = the same). `groups` names each row's
    group (one per row of `summary`; `group_by` says what they are): a label such as `switch` recurs in every
    group, so a bar names both."""
    bar_names = summary["label"] if groups is None else [f"{label} ({group})"
                                                         for label, group in zip(summary["label"], groups)]
    summary = summary.assign(_name=list(bar_names))
    names = {"time_ratio": ("time per update", f"/ {baseline}'s"),
             "flops_ratio": ("FLOPs per update", f"/ {baseline}'s"),
             "val_loss_diff": ("final validation loss", f"- {baseline}'s, paired by seed")}
    label_inches = 0.075 * max(len(name) for name in summary["_name"])
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        fig = Figure(figsize=(3.6 * max(1, len(metrics)) + label_inches, 0.45 * len(summary) + 1.6),
                     layout="constrained")
        FigureCanvasAgg(fig)
        # one row per run in every panel (the names only on the first): a metric a run lacks leaves its row empty
        axes = np.atleast_1d(fig.subplots(1, max(1, len(metrics)), squeeze=False, sharey=True).ravel())
        for ax, metric in zip(axes, metrics):
            present = summary[metric].notna().to_numpy()
            rows = summary[present]
            lo = (rows[metric] - rows[f"{metric}_lo"]).clip(lower=0)
            hi = (rows[f"{metric}_hi"] - rows[metric]).clip(lower=0)
            ax.barh(np.flatnonzero(present), rows[metric], xerr=[lo, hi],
                    color=[estimator_colour(label) for label in rows["label"]], alpha=0.8, capsize=2)
            ax.axvline(0 if metric.endswith("_diff") else 1, color="k", lw=0.8, ls="--")
            title, unit = names.get(metric, (metric, ""))
            ax.set(xlabel=f"{title} {unit}, 95% CI", title=title)
        axes[0].set_yticks(np.arange(len(summary)), summary["_name"])
        axes[0].invert_yaxis()
        if groups is not None:
            fig.suptitle(f"each run against {baseline} of its group ({group_by} in brackets)", fontsize="medium")
    return fig


def metric_vs_experts_figure(summary: pd.DataFrame, metric: str, ylabel: str, log: bool = True) -> Figure:
    """A metric (mean over seeds, 95% interval bars) against the number of experts n, one line per estimator;
    one panel per problem (rows) and router sharpness (columns)."""
    problems = list(dict.fromkeys(summary["problem"]))
    sharpnesses = sorted(summary["sharpness"].unique()) if "sharpness" in summary else [None]
    estimators = list(dict.fromkeys(summary["estimator"]))
    colours = {label: estimator_colour(label) for label in estimators}
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
        fig = Figure(figsize=(4.2 * len(sharpnesses) + 2.5, 3.2 * len(problems)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = np.atleast_2d(fig.subplots(len(problems), len(sharpnesses), squeeze=False))
        for i, problem in enumerate(problems):
            for j, sharpness in enumerate(sharpnesses):
                ax = axes[i, j]
                panel = summary[(summary["problem"] == problem)
                                & ((summary["sharpness"] == sharpness) if sharpness is not None else True)]
                for estimator, rows in panel.groupby("estimator", sort=False):
                    rows = rows.sort_values("experts").dropna(subset=[metric])
                    if rows.empty or (log and (rows[metric] <= 0).all()):
                        continue
                    lo = (rows[metric] - rows[f"{metric}_lo"]).clip(lower=0)
                    hi = (rows[f"{metric}_hi"] - rows[metric]).clip(lower=0)
                    ax.errorbar(rows["experts"], rows[metric], yerr=[lo, hi], label=estimator, marker="o",
                                markersize=3, lw=1, capsize=2, color=colours[estimator])
                ax.set_xscale("log", base=2)
                if log:
                    ax.set_yscale("log")
                title = problem if sharpness is None else f"{problem}, sharpness {sharpness:g}"
                ax.set(title=title, xlabel="experts n", ylabel=ylabel)
        handles = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=7)
    return fig
