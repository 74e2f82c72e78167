"""What `gradest compare` and `gradest run` leave on disk and print: tables, figures and the metadata to reproduce
them. (A study's report is its kind's: `gradest.study`.)

Every file is written atomically (gradest.io: a temporary file in the same directory, then `os.replace`), so an
interrupted command leaves either the previous file or the new one, never half of one.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gradest.figures import atomic_savefig, bias_interval_figure, bias_variance_figure, objective_figure
from gradest.io import atomic_write_text, run_metadata, write_json
from gradest.measure import CONFIG_COLUMNS, METRICS, by_configuration



SUMMARY_COLUMNS = ["problem", "estimator", "target", "samples", "rel_bias", "rel_bias_lo", "rel_bias_hi", "variance",
                   "mse", "cos_mean", "cos_of_mean", "sec_per_sample", "experts_per_token"]


NOTES = ("rel_bias is the noise-corrected relative bias sqrt(max(||mean - g*||^2 - V/K, 0)) / ||g*||, where V is "
         "the variance (trace of the covariance) of the K samples; the 95% CI is a jackknife normal interval.")


def _interval(lo: float, hi: float) -> str:
    return f"[{lo:.3g}, {hi:.3g}]"


def readable_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader compares, with the bias interval as one cell; numbers are rounded when printed."""
    table = {"estimator": rows["estimator"], "target": rows["target"]}
    for metric in (m for m in METRICS if m.summary):
        table[metric.summary] = rows[metric.column]
        if metric.column == "rel_bias":
            table["95% CI"] = [_interval(lo, hi) for lo, hi in zip(rows["rel_bias_lo"], rows["rel_bias_hi"])]
    return pd.DataFrame({**table, "experts/token": rows["experts_per_token"]})


def summary_text(df: pd.DataFrame, tablefmt: str = "pipe", heading: str = "## ") -> str:
    """One table per problem configuration: Markdown (`pipe`) for summary.md, `simple` for a terminal."""
    return "\n\n".join(f"{heading}{label}\n\n"
                       + readable_summary(rows).to_markdown(index=False, tablefmt=tablefmt, floatfmt=".3g")
                       for label, rows in by_configuration(df))


def compare_header(df: pd.DataFrame) -> str:
    problems = ", ".join(dict.fromkeys(df["problem"]))
    wrt = ", ".join(dict.fromkeys(df["wrt"]))
    samples = ", ".join(str(s) for s in dict.fromkeys(df["samples"]))
    return (f"# gradest compare\n\n"
            f"- problems: {problems}\n"
            f"- gradient with respect to: {wrt}\n"
            f"- samples per estimator: K = {samples}\n"
            f"- bias target: each row's `target` column, the exact gradient of the objective that estimator samples "
            f"from (k experts, mask, temperature)\n"
            f"- {NOTES}\n")


def write_compare_report(df: pd.DataFrame, out_dir, config: dict, command: list[str] | None = None) -> list[Path]:
    """summary.csv (every column compare() gives), summary.md, bias_variance.png, rel_bias.png and config.json
    (run_metadata of `config`, whose "seed" is recorded) in `out_dir`. Returns the paths written."""
    missing = [column for column in SUMMARY_COLUMNS + CONFIG_COLUMNS + ["wrt"] if column not in df.columns]
    if missing:
        raise ValueError(f"compare results lack the columns {missing}")
    out_dir = Path(out_dir)
    markdown = compare_header(df) + "\n" + summary_text(df) + "\n"
    written = [atomic_write_text(out_dir / "summary.csv", df.to_csv(index=False)),
               atomic_write_text(out_dir / "summary.md", markdown)]
    for name, draw in (("bias_variance.png", bias_variance_figure), ("rel_bias.png", bias_interval_figure)):
        written.append(atomic_savefig(draw(df), out_dir / name, dpi=120))
    written.append(write_json(out_dir / "config.json", run_metadata(config, config.get("seed"), command)))
    return written


def write_run_report(metrics: pd.DataFrame, out_dir, config: dict, estimator_label: str,
                     command: list[str] | None = None) -> list[Path]:
    """metrics.csv, objective.png and config.json (run_metadata of `config`) in `out_dir`."""
    out_dir = Path(out_dir)
    return [atomic_write_text(out_dir / "metrics.csv", metrics.to_csv(index=False)),
            atomic_savefig(objective_figure(metrics, estimator_label), out_dir / "objective.png", dpi=120),
            write_json(out_dir / "config.json", run_metadata(config, config.get("seed"), command))]


def training_summary(trainer, metrics: pd.DataFrame, out_dir) -> str:
    """What a person wants to read after `gradest run`: final losses, BLEU, speed, sizes, where files are."""
    final, model = metrics.iloc[-1], trainer.model
    lines = [f"{trainer.estimator.label} on {trainer.config.task}, {trainer.config.model.experts} experts, "
             f"top-{trainer.config.top_k}, {int(final['step'])} steps, seed {trainer.config.seed}",
             f"  train loss {final['train_loss']:.4f}, validation loss {final['val_loss']:.4f} "
             f"(perplexity {final['val_ppl']:.3f})"]
    if "bleu_test" in final:
        lines.append(f"  BLEU (greedy): val {final['bleu_val']:.2f}, test_2016 {final['bleu_test']:.2f}")
    lines += [f"  {metrics['tokens_per_s'].median():.0f} tokens/s (median step), {final['seconds']:.0f} s training",
              f"  parameters: {model.num_parameters() / 1e6:.2f} M, active per token "
              f"{model.num_parameters(active=True) / 1e6:.2f} M",
              f"written to {out_dir}/ (metrics.csv, loss.png, config.json, checkpoint.pt)"]
    return "\n".join(lines)
