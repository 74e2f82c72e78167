"""The `gradest` command: list the estimators, compare them against the exact gradient, train with one.

Every error a user can cause (a GradestError from the library, or a bad option value click rejects) is printed
as one line `error: <message>` on stderr with exit code 2; a traceback means a bug in gradest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import itertools
import logging
import os
import re
import sys
import time
from pathlib import Path

import click
import pandas as pd
import torch
from tabulate import tabulate
from tqdm import tqdm

from gradest import __version__
from gradest.devices import check_device
from gradest.io import directory_lock
from gradest.config import RUN_SETTINGS, RunSetting, TrainConfig, hyper_parameters, key_values
from gradest.errors import GradestError, one_line
from gradest.estimators import CATEGORICAL, GATED, REGISTRY
from gradest.estimators.base import integer_at_least, integer_between, parse_as, seed_value
from gradest.estimators import expand_estimators
from gradest.hf.models import CAUSAL
from gradest.measure import WRT, compare as compare_estimators
from gradest.memory import check_probe, check_training, model_probe_peak
from gradest.progress import log
from gradest.model import SwitchConfig
from gradest.presets import apply_preset
from gradest.probe import TASK_PROBLEM, switch_probe
from gradest.problems import PROBLEM_DEFAULTS, PROBLEMS, ProblemConfig
from gradest.figures import atomic_savefig, training_figure
from gradest.report import summary_text, training_summary, write_compare_report, write_run_report
from gradest.synthetic import SYNTHETIC_LR, SYNTHETIC_STEPS, train_synthetic
from gradest.train import (RUN_FILES, Interrupted, Trainer, config_of, load_checkpoint, remove_stale_temporaries,
                           stop_signals)

SWITCH_PROBLEMS = {problem: task for task, problem in TASK_PROBLEM.items()}  # switch-lm -> lm, switch-mt -> mt
HF_PROBLEM = "hf"  # the router-gradient probe on a Hugging Face causal LM (gradest.hf.probe)
TITAN_PROBLEM = "titan"  # the router-gradient probe on gradest.titan's torchtitan Qwen3-MoE (gradest.titan.probe)
ALL_PROBLEMS = [*PROBLEMS, *SWITCH_PROBLEMS, HF_PROBLEM, TITAN_PROBLEM]
DEFAULT_SAMPLES = 2000  # the no-argument `gradest compare` (3 problems, every estimator) takes a few seconds


# -------------------------------------------------------------------------------------------- one-line errors
class OneLineErrorGroup(click.Group):
    """A command group whose user errors are one line `error: ...` on stderr, exit code 2 (click's usage errors
    keep their own code, which is 2). Overriding `main` covers the console script and CliRunner alike."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        # the command line as typed, for config.json (under a test runner sys.argv is the runner's)
        extra.setdefault("obj", {"command": [prog_name or "gradest", *args]})
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0  # an int is the code of --help or ctx.exit()
            sys.stdout.flush()  # a full disk or a closed pipe shows here, not in the interpreter's last flush
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()  # `gradest` alone: the help text, as click shows it
            code = error.exit_code
        except click.ClickException as error:
            click.echo(f"error: {one_line(error.format_message())}", err=True)
            code = error.exit_code
        except GradestError as error:
            click.echo(f"error: {one_line(error)}", err=True)
            code = 2
        except click.Abort:
            click.echo("error: aborted", err=True)
            code = 1
        except OSError as error:
            if error.filename is not None or error.errno not in (errno.ENOSPC, errno.EPIPE, errno.EIO):
                raise
            # the output cannot be written (a full disk, a closed pipe): an error of the environment, not a bug
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the interpreter flushes it at exit)
            click.echo(f"error: cannot write the output: {error.strerror or error}", err=True)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


# ------------------------------------------------------------------------------------------------ option types
class Checked(click.ParamType):
    """A value of `inner`'s type that must meet a declared constraint (the one the library checks), e.g. the one
    seed range of every command."""

    def __init__(self, inner: click.ParamType, constraint):
        self.inner, self.constraint, self.name = inner, constraint, inner.name

    def convert(self, value, param, ctx):
        value = self.inner.convert(value, param, ctx)
        if not self.constraint(value):
            self.fail(f"{value!r}; valid: {self.constraint.text}", param, ctx)
        return value


SEED = Checked(click.INT, seed_value)


def at_least(low: int) -> Checked:
    """A count or a size of any command: the library's one declared range (an integer >= low, below 2**63)."""
    return Checked(click.INT, integer_at_least(low))


THREADS = Checked(click.INT, integer_between(1, 1024))  # threads or worker processes: more is a typo


class PathType(click.Path):
    """A path option; the empty string (`--out ""`, which would mean the working directory) is refused."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail(f"{value!r} is an empty path; valid: a path, e.g. runs/NAME (the working directory: .)",
                      param, ctx)
        return super().convert(value, param, ctx)


DIRECTORY = PathType(file_okay=False, path_type=Path)
FILE = PathType(dir_okay=False, path_type=Path)


class CommaList(click.ParamType):
    """`2,4,8` read as a list, each item converted (and checked) by `item_type`."""

    def __init__(self, item_type: click.ParamType, item_name: str | None = None):
        self.item_type = item_type
        item_name = item_name or item_type.name.upper()
        self.name = f"{item_name}[,{item_name}..]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        items = [item.strip() for item in str(value).split(",")]
        if not all(items):
            self.fail(f"'{value}' has an empty item; write values separated by commas, e.g. 2,4", param, ctx)
        return [self.item_type.convert(item, param, ctx) for item in items]


def config_options(lists: bool):
    """The options shared by `compare` and `run` that define the problem, the seed, `--set` and `--out`.
    `compare` takes comma lists for experts, top-k and sharpness (it measures their cartesian product); `run`
    takes one value each."""

    def kind(item_type):
        return CommaList(item_type) if lists else item_type

    several = " (comma list: every combination is measured)" if lists else ""
    options = [
        click.option("--experts", type=kind(at_least(2)), default=None,
                     help=f"experts n (poly: categories per latent) [default 2 for poly, "
                          f"{ProblemConfig.experts} otherwise]{several}" if lists else
                          f"experts n (poly: categories per latent) [default {SwitchConfig.experts} for a Switch "
                          f"Transformer; with --problem: 2 for poly, {ProblemConfig.experts} otherwise]"),
        click.option("--tokens", type=at_least(1), default=None,
                     help=f"tokens T (poly: latents m) [default {ProblemConfig.tokens}]"),
        click.option("--dim", type=at_least(1), default=None, help=f"input dimension [default {ProblemConfig.dim}]"),
        click.option("--top-k", "top_k", type=kind(at_least(1)), default=None,
                     help=f"experts per token k [default 1]{several}"),
        click.option("--sharpness", type=kind(click.FLOAT), default=None,
                     help=f"scale of the initial router logits [default {ProblemConfig.sharpness:g}]{several}"),
        click.option("--seed", type=SEED, default=0, show_default=True,
                     help="seeds the problem (data, teacher, initial parameters) and the routing noise"),
        click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                     help="hyper-parameter for every chosen estimator that has it, e.g. --set tau=0.5 (repeatable)"),
        click.option("--out", type=DIRECTORY, default=None,
                     help="directory to write the report into"),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def problem_configs(problems: list[str], seed: int, varying: dict, fixed: dict) -> list[ProblemConfig]:
    """The ProblemConfig of every problem and combination of the `varying` lists, with the `fixed` values; an
    option not given (None) keeps the problem's default (PROBLEM_DEFAULTS, else ProblemConfig's)."""
    varying = {name: values for name, values in varying.items() if values is not None}
    fixed = {name: value for name, value in fixed.items() if value is not None}
    return [ProblemConfig(problem=problem, seed=seed,
                          **{**PROBLEM_DEFAULTS.get(problem, {}), **fixed, **dict(zip(varying, combination))})
            for problem in problems for combination in itertools.product(*varying.values())]


def progress_bar(items, description: str = ""):
    # disable=None: no bar when stderr is not a terminal, so logs and pipes stay clean
    return tqdm(items, desc=description, file=sys.stderr, disable=None, leave=False, dynamic_ncols=True)


class EchoLines(logging.Handler):
    """The library's progress (gradest.progress.log) as lines on stdout, written where stdout is
    at the time (a test runner swaps it), around a progress bar if one is drawn: a captured log keeps them."""

    def emit(self, record):
        with tqdm.external_write_mode():
            click.echo(self.format(record))


def show_progress_lines():
    if not any(isinstance(handler, EchoLines) for handler in log.handlers):
        log.addHandler(EchoLines())
    log.setLevel(logging.INFO)


def progress_lines(items, what: str, describe=None):
    """The items, with a line before each: `what i/n: item, s elapsed` (a long probe or check that prints
    nothing until its table would look hung, and a log could not tell how far it got)."""
    items, start = list(items), time.perf_counter()
    for index, item in enumerate(items, 1):
        log.info(f"{what} {index}/{len(items)}: {(describe or item_text)(item)}, "
                 f"{time.perf_counter() - start:.0f} s elapsed")
        yield item


def item_text(item) -> str:
    """An estimator by its label, a synthetic problem by its name and sizes, (problem, estimator) by both."""
    if isinstance(item, tuple):
        return ", ".join(item_text(part) for part in item)
    config = getattr(item, "config", None)
    if isinstance(config, ProblemConfig):
        return f"{config.problem} (n={config.experts}, k={config.top_k})"
    return str(getattr(item, "label", item))


@contextlib.contextmanager
def report_errors(out: Path):
    """A report that cannot be written (permissions, a file in the way, a full disk) is an error of the
    environment, not a bug: one line, exit code 1."""
    try:
        yield
    except OSError as error:
        raise click.ClickException(f"cannot write the report into {out}/: {error.strerror or error}") from error


@contextlib.contextmanager
def written_whole(out: Path):
    """A report's files (compare, doctor, a synthetic run) are all written or none is: each file is written
    atomically, and when one fails (a full disk, permissions) the files this report had written already, and
    `out` if it made it, are removed, so no half report is left for a later command to refuse as results. The
    error is one line, exit code 1 (report_errors)."""
    made = not out.exists()
    before = {path.name for path in out.iterdir()} if not made and out.is_dir() else set()
    try:
        with report_errors(out):
            yield
    except BaseException:
        if out.is_dir():
            for path in out.iterdir():
                if path.name not in before and path.is_file():
                    path.unlink(missing_ok=True)
            if made:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise


def output_directory(out: Path | None, default: Path, marker: str) -> Path:
    """Where a command writes its results, never over earlier ones: `--out`, refused if it already holds results
    (the file `marker`); without `--out`, `default`, or the first of `default-2`, `default-3`, ... that holds none."""
    if out is not None:
        if (out / marker).exists():
            raise GradestError(f"{out}/ already holds results ({marker}); choose another --out, or delete it first")
        return out
    candidate, number = default, 1
    while (candidate / marker).exists():
        number += 1
        candidate = default.with_name(f"{default.name}-{number}")
    return candidate


def command_line() -> list[str]:
    return click.get_current_context().find_root().obj["command"]


def hf_model_options(prefix: str = "", tiny_note: str = "", seq2seq: bool = False):
    """--hf, --hf-config, --hf-model: the Hugging Face MoE model a command probes or checks (`prefix` starts each
    help text, e.g. the problem they belong to; `seq2seq`: SwitchTransformers' encoder-decoder is accepted too)."""
    names = ", ".join([*CAUSAL, *(["switch_transformers"] if seq2seq else [])])
    full = "; or switch-base-8: google/switch-base-8's architecture, full size, random weights" if seq2seq else ""
    what = "MoE model" if seq2seq else "MoE causal LM"
    options = [
        click.option("--hf", "hf_name", default=None, metavar="NAME",
                     help=f"{prefix}a tiny random model of this architecture ({names}){tiny_note}{full}"),
        click.option("--hf-config", "hf_config", type=FILE, default=None,
                     help=f"{prefix}build the model from this transformers config.json (random weights)"),
        click.option("--hf-model", "hf_model", type=DIRECTORY, default=None,
                     help=f"{prefix}a saved transformers {what} (local directory); its tokenizer is not used: "
                          f"the bundled text's character ids modulo its vocabulary are"),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


# ---------------------------------------------------------------------------------------------------- commands
@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradest")
@click.option("--threads", type=THREADS, default=None,
              help="torch CPU threads [default: torch's]. The synthetic problems are small: on a CPU shared with "
                   "other processes, --threads 1 can be many times faster.")
def main(threads):
    """Gradient estimators for mixture-of-experts routing, measured against the exact gradient."""
    if threads is not None:
        torch.set_num_threads(threads)
    show_progress_lines()


@main.command("list")
def list_estimators():
    """Every estimator: what it is, where it applies, its hyper-parameters and its reference."""
    rows = []
    for name, cls in REGISTRY.items():
        rows.append({
            "name": name,
            "family": cls.family,
            "experts": "dense" if cls.dense else "sparse",
            "applies to": ", ".join(kind for kind in (GATED, CATEGORICAL) if kind in cls.applies_to),
            "top-k": "yes" if cls.supports_topk else "no",
            # k is not listed: it is set by --top-k, not --set
            "hyper-parameters": ", ".join(f"{key}={param.default}" for key, param in cls.params.items()
                                          if key != "k") or "-",
            "omega": "on" if cls.omega else "off",  # the MoE layer's learnable output scale, by default
            "reference": cls.reference,
        })
    click.echo(tabulate(rows, headers="keys", tablefmt="simple"))


# `gradest compare`'s options that only some problems read, by parameter: (flag, the problems that read it). One
# given on the command line with none of those problems chosen is refused, never silently ignored.
PROBLEM_SCOPED = {
    "experts": ("--experts", (*PROBLEMS, *SWITCH_PROBLEMS)), "tokens": ("--tokens", tuple(PROBLEMS)),
    "dim": ("--dim", tuple(PROBLEMS)), "sharpness": ("--sharpness", tuple(PROBLEMS)),
    "checkpoint": ("--checkpoint", tuple(SWITCH_PROBLEMS)),
    "layer": ("--layer", (*SWITCH_PROBLEMS, HF_PROBLEM, TITAN_PROBLEM)),
    "draws": ("--draws", (*SWITCH_PROBLEMS, HF_PROBLEM, TITAN_PROBLEM)),
    "hf_batch": ("--batch-size", (HF_PROBLEM, TITAN_PROBLEM)), "hf_seq": ("--seq-len", (HF_PROBLEM, TITAN_PROBLEM)),
}


def refuse_unread_options(ctx: click.Context, problems: list[str]) -> None:
    """An option given on the command line that no chosen problem reads is refused, naming who reads it."""
    for name, (flag, readers) in PROBLEM_SCOPED.items():
        if ctx.get_parameter_source(name) in (None, click.core.ParameterSource.DEFAULT):
            continue
        if not any(problem in readers for problem in problems):
            synthetic = [r for r in readers if r in PROBLEMS]
            others = [r for r in readers if r not in PROBLEMS]
            who = " and ".join(([f"the synthetic problems ({', '.join(synthetic)})"] if synthetic else [])
                               + ([", ".join(others)] if others else []))
            raise GradestError(f"{flag} applies to {who}, not to --problem {','.join(problems)}")


@main.command()
@click.option("--problem", "problems", type=CommaList(click.STRING, "PROBLEM"), default=",".join(PROBLEMS),
              show_default=True, help=f"problems to measure on, comma-separated; valid: {', '.join(ALL_PROBLEMS)} "
                                      f"(switch-*: the router-gradient probe on a Switch Transformer; hf: on a "
                                      f"Hugging Face MoE model, see --hf; titan: on a small torchtitan Qwen3-MoE, "
                                      f"k experts per token from --top-k [default 2])")
@click.option("--estimators", default="all", show_default=True,
              help="'all' (every estimator that applies, with its variants) or a comma list of NAME[:KEY=VALUE..], "
                   "e.g. st:tau=0.5,reinforce:baseline=mean")
@click.option("--samples", type=at_least(3), default=DEFAULT_SAMPLES, show_default=True,
              help="gradient samples K per estimator")
@click.option("--wrt", type=click.Choice(WRT), default="router", show_default=True,
              help="what the gradient is taken with respect to (switch-*: logits or router)")
@click.option("--checkpoint", type=PathType(path_type=Path), default=None,
              help="switch-*: probe the model of this `gradest run` directory instead of a tiny model at "
                   "initialisation")
@click.option("--layer", type=at_least(0), default=0, show_default=True,
              help="switch-*, hf, titan: which MoE layer to probe (0 = the first)")
@click.option("--draws", type=at_least(3), default=64, show_default=True,
              help="switch-*, hf, titan: draws S of the Rao-Blackwellised reference (when enumeration is too large)")
@hf_model_options("hf: ", "; k experts per token from --top-k [default 2], seeded by --seed", seq2seq=True)
@click.option("--batch-size", "hf_batch", type=at_least(1), default=2, show_default=True,
              help="hf, titan: sequences in the fixed batch of the bundled tiny-shakespeare")
@click.option("--seq-len", "hf_seq", type=at_least(1), default=8, show_default=True,
              help="hf, titan: tokens per sequence")
@config_options(lists=True)
def compare(problems, estimators, samples, wrt, checkpoint, layer, draws, hf_name, hf_config, hf_model, hf_batch,
            hf_seq, experts, tokens, dim, top_k, sharpness, seed, settings, out):
    """Bias, variance and cost of every estimator against the exact gradient; writes a report into --out
    (default: runs/compare, or runs/compare-2, ... if that holds an earlier report)."""
    unknown = [name for name in problems if name not in ALL_PROBLEMS]
    if unknown:
        raise GradestError(f"unknown problem '{unknown[0]}'; valid: {', '.join(ALL_PROBLEMS)}")
    hf_given = [name for name, value in (("--hf", hf_name), ("--hf-config", hf_config), ("--hf-model", hf_model))
                if value is not None]
    if hf_given and HF_PROBLEM not in problems:
        raise GradestError(f"{hf_given[0]} applies to --problem hf only")
    refuse_unread_options(click.get_current_context(), problems)
    if TITAN_PROBLEM in problems and wrt == "all":  # before any work
        raise GradestError("--wrt all is not measured on titan; valid: logits, router")
    out = output_directory(out, Path("runs/compare"), "summary.csv")
    hparams = hyper_parameters(settings)
    synthetic = [name for name in problems if name in PROBLEMS]
    configs = problem_configs(synthetic, seed, varying={"experts": experts, "top_k": top_k, "sharpness": sharpness},
                              fixed={"tokens": tokens, "dim": dim})
    chosen = "all" if estimators.strip() == "all" else estimators.split(",")
    progress = functools.partial(progress_lines, what="compare")
    frames = [compare_estimators(configs, chosen, samples=samples, wrt=wrt, seed=seed, settings=hparams,
                                 progress=progress)] if configs else []
    for name in (name for name in problems if name in SWITCH_PROBLEMS):
        if wrt == "all":
            raise GradestError(f"--wrt all is not measured on {name}; valid: logits, router")
        for n, k in itertools.product(experts or [None], top_k or [1]):
            frames.append(switch_probe(SWITCH_PROBLEMS[name], estimators=chosen, samples=samples, seed=seed,
                                       checkpoint=checkpoint, layer=layer, experts=n, top_k=k, draws=draws, wrt=wrt,
                                       settings=hparams, progress=progress))
    if HF_PROBLEM in problems:
        from gradest.hf.probe import hf_probe_command
        if wrt == "all":
            raise GradestError("--wrt all is not measured on hf; valid: logits, router")
        for k in (top_k or [None]):
            frames.append(hf_probe_command(hf_name, hf_config, hf_model, layer=layer, batch_size=hf_batch,
                                           seq_len=hf_seq, top_k=k, estimators=chosen, samples=samples, seed=seed,
                                           draws=draws, wrt=wrt, settings=hparams, progress=progress))
    if TITAN_PROBLEM in problems:
        from gradest.titan.probe import titan_probe_command
        for k in (top_k or [None]):
            frames.append(titan_probe_command(layer=layer, batch_size=hf_batch, seq_len=hf_seq, top_k=k,
                                              estimators=chosen, samples=samples, seed=seed, draws=draws, wrt=wrt,
                                              settings=hparams, progress=progress))
    results = pd.concat(frames, ignore_index=True)
    with written_whole(out):
        write_compare_report(results, out, {
            "command": "compare", "problems": [config.to_dict() for config in configs],
            "switch_problems": [name for name in problems if name in SWITCH_PROBLEMS], "estimators": estimators,
            "settings": hparams, "samples": samples, "wrt": wrt, "seed": seed, "checkpoint": checkpoint,
            "layer": layer, "draws": draws, "hf": hf_name, "hf_config": hf_config, "hf_model": hf_model,
            "batch_size": hf_batch, "seq_len": hf_seq, "out": str(out)}, command_line())
    click.echo(summary_text(results, tablefmt="simple", heading=""))
    click.echo(f"\nreport written to {out}/ (summary.csv, summary.md, bias_variance.png, rel_bias.png, config.json)")


@main.command()
@hf_model_options()
@click.option("--top-k", "top_k", type=at_least(1), default=None,
              help="experts per token of a model built by --hf/--hf-config [default: the config's; --hf: 2]")
@click.option("--text", "text_file", type=FILE, default=None,
              help="text to measure on (UTF-8 bytes modulo the vocabulary) [default: the bundled tiny-shakespeare]")
@click.option("--batches", type=at_least(1), default=4, show_default=True, help="batches of text")
@click.option("--batch-size", type=at_least(1), default=2, show_default=True, help="sequences per batch")
@click.option("--seq-len", type=at_least(1), default=16, show_default=True, help="tokens per sequence")
@click.option("--draws", type=at_least(3), default=16, show_default=True,
              help="draws S of the Rao-Blackwellised reference (when enumeration is too large)")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="seeds a built model's weights, the text windows and the reference's draws")
@click.option("--out", type=DIRECTORY, default=None,
              help="report directory [default: runs/doctor, or runs/doctor-2, ... if that holds an earlier report]")
def doctor(hf_name, hf_config, hf_model, top_k, text_file, batches, batch_size, seq_len, draws, seed, out):
    """Check a Hugging Face MoE model's native router gradient, layer by layer, against the exact gradient of the
    expected loss over that layer's routing (the model's own softmax and k); prints a verdict per layer and one for
    the model and writes doctor.md, layers.csv, cosine.png and config.json."""
    from gradest.doctor import diagnose, doctor_batch, write_doctor_report
    from gradest.hf.models import load_model
    text = None
    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise GradestError(f"cannot read --text {text_file} as UTF-8 text: {error}") from None
        if not text.strip():
            raise GradestError(f"--text {text_file} is empty")
    out = output_directory(out, Path("runs/doctor"), "layers.csv")
    model = load_model(hf_name, hf_config, hf_model, k=top_k, seed=seed)
    check_probe(model_probe_peak(model, batches * batch_size, seq_len, draws),
                f"gradest doctor on {batches * batch_size} sequences of {seq_len} tokens")
    batch = doctor_batch(model.config.vocab_size, batches, batch_size, seq_len, text, data_seed=seed)
    result = diagnose(model, batch, draws=draws, seed=seed,
                      progress=functools.partial(progress_lines, what="doctor", describe=lambda i: f"layer {i}"))
    label = str(hf_model or hf_config or hf_name)
    with written_whole(out):
        write_doctor_report(result, out, {
            "command": "doctor", "model": label, "model_type": model.config.model_type, "top_k": top_k,
            "text": None if text_file is None else str(text_file), "batches": batches, "batch_size": batch_size,
            "seq_len": seq_len, "draws": draws, "seed": seed, "out": str(out)}, command_line())
    for line in result.verdicts:
        click.echo(line)
    click.echo(result.model_verdict)
    click.echo(f"report written to {out}/ (doctor.md, layers.csv, cosine.png, config.json)")


def setting_option(setting: RunSetting) -> click.Option:
    """The `gradest run` option of a run setting: its value as given (None, or an empty tuple: not given), read
    into the setting's type by `given_settings`."""
    if setting.multiple:
        return click.Option([setting.flag, setting.name], multiple=True, metavar=setting.metavar, help=setting.help)
    kind = (click.Choice(setting.choices) if setting.choices else
            OrNone({int: click.INT, float: click.FLOAT}.get(setting.kind, click.STRING)) if setting.check(None)
            and setting.default is not None else {int: click.INT, float: click.FLOAT}.get(setting.kind, click.STRING))
    # (the estimator has a default for study specs; on the command line it is required)
    default = "" if setting.default in (None, {}) or setting.name == "estimator" else f" [default: {setting.default}]"
    return click.Option([setting.flag, setting.name], type=kind, default=None, metavar=setting.metavar,
                        help=setting.help + default)


class OrNone(click.ParamType):
    """A number, or `none` (a setting whose None means something, e.g. --grad-clip none: no clipping)."""

    def __init__(self, inner: click.ParamType):
        self.inner, self.name = inner, f"{inner.name}|none"

    def convert(self, value, param, ctx):
        return None if str(value).lower() == "none" else self.inner.convert(value, param, ctx)


class RunCommand(click.Command):
    """`gradest run`: its own options, then one per run setting (gradest.config.RUN_SETTINGS), read from the table
    whenever the command runs, so that a setting declared there is an option with nothing else to edit."""

    def get_params(self, ctx):
        help_option = self.get_help_option(ctx)
        own = [p for p in super().get_params(ctx) if p is not help_option]
        return own + [setting_option(s) for s in RUN_SETTINGS.values() if s.flag] + ([help_option] if help_option
                                                                                    else [])


def given_settings(options: dict) -> dict:
    """The run settings given on the command line, read into their types (an option not given is left out)."""
    given = {}
    for name, setting in RUN_SETTINGS.items():
        value = options.get(name)
        if value is None or (setting.multiple and not value):
            continue
        given[name] = setting.read(value) if setting.read else value
        if not setting.check(given[name]):  # the table's constraint, before anything is built (--problem too)
            raise GradestError(f"invalid run setting {name}={given[name]!r} ({setting.flag}); valid: "
                               f"{setting.check.text}")
    return given


SYNTHETIC_SETTINGS = ("estimator", "hparams", "steps", "lr", "top_k", "seed")  # what `run --problem` takes
MODEL_OPTIONS = ("--experts", "--omega/--no-omega", "--model")  # the Switch Transformer's, by flag


@main.command(cls=RunCommand)
@click.option("--problem", default=None, help=f"train a synthetic problem instead of a Switch Transformer (next to "
                                              f"the exact gradient; --steps {SYNTHETIC_STEPS} and --lr "
                                              f"{SYNTHETIC_LR:g} by default); valid: {', '.join(PROBLEMS)}")
@click.option("--experts", type=at_least(2), default=None,
              help=f"experts n [default {SwitchConfig.experts} for a Switch Transformer; with --problem: 2 for "
                   f"poly, {ProblemConfig.experts} otherwise]")
@click.option("--tokens", type=at_least(1), default=None, help=f"--problem: tokens T [default {ProblemConfig.tokens}]")
@click.option("--dim", type=at_least(1), default=None, help=f"--problem: input dimension [default {ProblemConfig.dim}]")
@click.option("--sharpness", type=click.FLOAT, default=None,
              help=f"--problem: scale of the initial router logits [default {ProblemConfig.sharpness:g}]")
@click.option("--omega/--no-omega", default=None,
              help="scale each MoE layer's output by a learnable omega [default: the estimator's, see gradest list]")
@click.option("--model", "model_settings", multiple=True, metavar="KEY=VALUE",
              help="Switch Transformer setting, e.g. --model n_layer=6 --model d_model=256 (see SwitchConfig)")
@click.option("--resume", type=DIRECTORY, default=None,
              help="continue the run whose checkpoint is in this directory, with its own settings: only --steps "
                   "and --device may be given with it")
@click.option("--out", type=DIRECTORY, default=None,
              help="the run's directory [default: runs/<estimator>-<task>-n<experts>-k<k>-seed<seed>]")
@click.pass_context
def run(ctx, problem, experts, tokens, dim, sharpness, omega, model_settings, resume, out, **options):
    """Train with one estimator: a Switch Transformer (default: a character LM on tiny-shakespeare, a few minutes
    on 2 CPU cores), or with --problem a synthetic problem next to the exact gradient. Writes metrics, plots,
    config.json and (Switch) a checkpoint into --out, and prints a line at every evaluation.

    Ctrl-C (SIGINT) or SIGTERM stops a Switch run after the step under way: the checkpoint and metrics.csv are
    written at that step and the command that resumes it is printed (exit code 130 for SIGINT, 143 for SIGTERM).
    A step whose loss, gradients or parameters are NaN or inf stops the run; the last checkpoint written stays.

    --resume DIR continues a run from its checkpoint with the settings it was started with: only --steps and
    --device may be given (another option is refused unless it has the run's value). --steps below the steps done
    is refused; the run's own steps on a complete run do nothing. A run continued to more steps than it was planned
    for keeps its learning-rate schedule: the cosine still ends where it was planned to, and the steps after it run
    at lr * min_lr_ratio, so the learning rate never jumps. config.json keeps how the run was started and lists
    each resume under "resumes".

    --hf ARCH (e.g. mixtral), --hf-config FILE or --hf-model DIR train a Hugging Face MoE causal LM on the same
    characters and batches instead, every MoE block routed by the estimator (gradest.hf.patch); k defaults to the
    model's num_experts_per_tok, the load-balancing loss is the model's own (router_aux_loss_coef), and metrics.csv
    also has each patched block's layer{i}_max_load, layer{i}_router_entropy, layer{i}_argmax_fraction. --model
    then takes only block_size; set the model with --hf-set KEY=VALUE."""
    settings = given_settings(options)
    model = {"experts": experts, "omega": omega, "model": parse_model_settings(model_settings)}
    synthetic = {"--tokens": tokens, "--dim": dim, "--sharpness": sharpness}
    if resume is not None:
        trainer = resume_run(resume, settings, model, {"--problem": problem, **synthetic}, out)
        if trainer is None:
            return
        out = resume
    elif problem is not None:
        return run_synthetic(problem, settings, experts, tokens, dim, sharpness, out)
    else:
        given = [name for name, value in synthetic.items() if value is not None]
        if given:
            raise GradestError(f"{given[0]} applies to synthetic problems only; add --problem, valid: "
                               + ", ".join(PROBLEMS))
        trainer, out = start_run(settings, model, out)
    train(ctx, trainer, out)


def start_run(settings: dict, model: dict, out: Path | None) -> tuple[Trainer, Path]:
    """A new Switch Transformer or Hugging Face run: its TrainConfig (the preset filling what is not given), its
    Trainer (whose model builds the estimator, once) and its directory, never one that holds a run already."""
    if "estimator" not in settings:
        raise GradestError("--estimator is required (or --resume DIR); valid: " + ", ".join(REGISTRY))
    given = {**settings, **{key: value for key, value in model.items() if value is not None}}
    config = TrainConfig(**apply_preset(settings.get("preset"), given))
    check_device(config.device)  # a bad value is named before anything about the directory
    memory = check_training(config)  # a run that cannot fit in memory, before its model is built
    if out is not None:
        refuse_a_run_in(out)
    trainer = Trainer(config, out or Path("runs"))  # (its model builds the estimator; nothing is written yet)
    if out is None:  # named after the estimator as the model routes it
        what = f"hf-{config.hf_transformers_config.model_type}" if config.is_hf else config.task
        out = trainer.out = Path("runs") / (f"{file_name(trainer.estimator.label)}-{what}-n{config.model.experts}-"
                                            f"k{config.top_k}-seed{config.seed}")
        refuse_a_run_in(out)
    what = f"Hugging Face {config.hf_transformers_config.model_type}" if config.is_hf else config.task
    log.info(f"{trainer.estimator.label} on {what}: {config.steps} steps of {config.batch_size} sequences of "
             f"{config.model.block_size} tokens, peak memory {memory}")
    return trainer, out


def refuse_a_run_in(out: Path):
    """Never overwrite a run: continuing it is one flag away."""
    if (out / "checkpoint.pt").exists():
        raise GradestError(f"{out}/ already holds a run; continue it with --resume {out}, or choose another --out")


def resume_run(resume: Path, settings: dict, model: dict, synthetic: dict,
               out: Path | None) -> Trainer | None:
    """The trainer that continues the run in `resume`, to --steps on --device if given (None: the run is complete
    and nothing is written). Any other option must have the run's own value: the run's settings are in its
    checkpoint, and an option that silently did nothing would also leave config.json claiming the run had it."""
    state = load_checkpoint(resume)
    config = config_of(state["config"], resume / "checkpoint.pt")
    changed = [f"{show(flag, value)} (the run's: {show(flag, own)})" for name, value in settings.items()
               for flag, own in [(RUN_SETTINGS[name].flag, getattr(config, name))]
               if not RUN_SETTINGS[name].resumable and value != own]
    own_model = {"experts": config.model.experts, "omega": config.model.omega,
                 "model": {key: getattr(config.model, key) for key in model["model"]}}
    changed += [f"{show(flag, model[key])} (the run's: {show(flag, own_model[key])})"
                for flag, key in zip(MODEL_OPTIONS, model)
                if model[key] not in (None, {}) and model[key] != own_model[key]]
    changed += [f"{flag} {value} (the run has none: it is no synthetic problem)"
                for flag, value in synthetic.items() if value is not None]
    if out is not None and Path(out).resolve() != Path(resume).resolve():
        changed.append(f"--out {out} (the run's: {resume})")
    if changed:
        raise GradestError(f"--resume {resume} continues the run with its own settings, and these differ: "
                           f"{', '.join(changed)}; with --resume only --steps and --device may be given (to change "
                           f"the others, start a new run with another --out)")
    trainer = Trainer.resume(resume, settings.get("steps"), settings.get("device"), state)
    if trainer.complete:  # writes nothing
        if trainer.plateaued():
            click.echo(f"{resume}/ is complete (it stopped at a plateau, step {trainer.step} of "
                       f"{trainer.config.steps}): nothing to do")
        else:
            click.echo(f"{resume}/ is complete ({trainer.step} of {trainer.config.steps} steps): nothing to do; "
                       f"extend it with --steps N, N > {trainer.step}")
        trainer.close()
        return None
    return trainer


def show(flag: str, value) -> str:
    """An option with a value, as the command line gives it."""
    if flag == "--omega/--no-omega":
        return {True: "--omega", False: "--no-omega"}.get(value, "--omega unset (the estimator's default)")
    if isinstance(value, dict):
        return " ".join(f"{flag} {key}={item}" for key, item in value.items()) or f"no {flag}"
    return f"{flag} {'none' if value is None else value}"


def train(ctx: click.Context, trainer: Trainer, out: Path):
    """Run a trainer to its end with a line per evaluation, then its figure and summary; Ctrl-C or SIGTERM stop
    it after the step under way, printing how to resume."""
    def on_line(line, row):
        with tqdm.external_write_mode():  # clears the bar (on a terminal) while the line is written
            click.echo(line)

    # one process trains a run directory: a second `--out` the same one is refused before it writes anything
    made = not out.exists()  # (a run refused by the lock, another process's, removes nothing of that run)
    # a signal from here on, even before the run's own handlers are set, stops it the way they would
    with stop_signals(), directory_lock(out) if trainer.rank == 0 else contextlib.nullcontext(), \
            NewRunKeptWhole(trainer, out, made) as kept:
        try:
            with report_errors(out):
                metrics = trainer.run(progress=lambda steps: progress_bar(steps, trainer.estimator.label),
                                      command=command_line(), on_line=on_line, handle_signals=True,
                                      stop_now=kept.stop_now)
        except Interrupted as stop:
            if trainer.rank == 0:
                click.echo(f"interrupted at step {stop.step}; resume with: {resume_command(trainer, out)}"
                           if trainer.saved_step is not None else
                           "interrupted before the first step ended: nothing was kept; start the run again with the "
                           "same command", err=True)
            trainer.close()
            ctx.exit(128 + stop.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        with report_errors(out):
            if trainer.rank == 0:  # under torchrun only rank 0 writes and reports
                atomic_savefig(training_figure(metrics, trainer.estimator.label), out / "loss.png", dpi=120)
                if trainer.config.is_hf:
                    hf_model = trainer.model.hf_model
                    click.echo(f"Hugging Face {hf_model.config.model_type} ({type(hf_model).__name__}, "
                               f"{len(trainer.model.patched.blocks)} MoE blocks routed by {trainer.estimator.label})")
                click.echo(training_summary(trainer, metrics, out))
    trainer.close()


class NewRunKeptWhole:
    """A new run that ends before its first checkpoint (a setting that fails at the first step, a divergence, a
    signal, a full disk) leaves nothing behind: the files it wrote, and its directory if it made it, are removed.
    A run with a checkpoint keeps it (and what was written with it)."""

    def __init__(self, trainer: Trainer, out: Path, made: bool):
        self.trainer, self.out, self.made = trainer, out, made  # made: the directory is this run's
        self.before = {path.name for path in out.iterdir()} - {".lock"} if not made and out.is_dir() else set()

    def discard(self):
        if self.trainer.rank != 0 or self.trainer.resumed_from is not None or self.trainer.saved_step is not None:
            return
        for name in (*RUN_FILES, ".lock"):
            if name not in self.before or name == "config.json":
                (self.out / name).unlink(missing_ok=True)
        remove_stale_temporaries(self.out)
        if self.made:
            with contextlib.suppress(OSError):
                self.out.rmdir()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is not None:
            self.discard()
        return False

    def stop_now(self, signum: int):
        """A signal before the first step of this process ended: end the process now (see Trainer.run)."""
        trainer = self.trainer
        if trainer.saved_step is not None:
            line = f"interrupted at step {trainer.saved_step}; resume with: {resume_command(trainer, self.out)}"
        else:
            self.discard()
            line = "interrupted before the first step ended: nothing was kept; start the run again with the same " \
                   "command"
        with contextlib.suppress(OSError):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        os._exit(128 + signum)


def resume_command(trainer: Trainer, out: Path) -> str:
    """The command that continues an interrupted run (under torchrun, with as many processes)."""
    import shlex
    launcher = "gradest" if trainer.world == 1 else f"torchrun --nproc-per-node {trainer.world} -m gradest.cli"
    return f"{launcher} run --resume {shlex.quote(str(out))}"


def parse_model_settings(texts) -> dict:
    """`--model key=value`, each value read as the type of SwitchConfig's field."""
    defaults = {f.name: f.default for f in dataclasses.fields(SwitchConfig)}
    settings = {}
    for key, value in key_values(texts).items():
        if key not in defaults:
            raise GradestError(f"unknown model setting '{key}'; valid: {', '.join(defaults)}")
        settings[key] = parse_as(value, defaults[key])
    return settings


def run_synthetic(problem: str, settings: dict, experts, tokens, dim, sharpness, out):
    """`gradest run --problem P`: train a synthetic problem with the estimator and with the exact gradient."""
    others = [RUN_SETTINGS[name].flag for name in settings if name not in SYNTHETIC_SETTINGS]
    if others:
        raise GradestError(f"{others[0]} applies to a Switch or Hugging Face run, not to a synthetic problem "
                           f"(--problem); valid with --problem: "
                           f"{', '.join(RUN_SETTINGS[name].flag for name in SYNTHETIC_SETTINGS)}")
    if "estimator" not in settings:
        raise GradestError("--estimator is required; valid: " + ", ".join(REGISTRY))
    steps, lr, seed = settings.get("steps", SYNTHETIC_STEPS), settings.get("lr", SYNTHETIC_LR), settings.get("seed", 0)
    (config,) = problem_configs([problem], seed, varying={}, fixed={
        "experts": experts, "tokens": tokens, "dim": dim, "top_k": settings.get("top_k"), "sharpness": sharpness})
    (estimator,) = expand_estimators([settings["estimator"]], PROBLEMS[config.problem].kind, config.top_k,
                                     settings.get("hparams", {}))
    out = output_directory(out, Path("runs") / f"{file_name(estimator.label)}-{problem}-seed{seed}", "metrics.csv")
    start = time.perf_counter()
    metrics = train_synthetic(config, estimator, steps=steps, lr=lr, seed=seed, progress=progress_bar)
    seconds = time.perf_counter() - start
    with written_whole(out):
        write_run_report(metrics, out, {"command": "run", "problem": config.to_dict(), "estimator": estimator.label,
                                        "hparams": estimator.hparams, "steps": steps, "lr": lr, "seed": seed,
                                        "out": str(out)}, estimator.label, command_line())
    final = metrics.iloc[-1]
    click.echo(f"{estimator.label} on {problem}, {steps} steps (lr {lr:g}), seed {seed}\n"
               f"  objective J: {metrics['objective'].iloc[0]:.4g} -> {final['objective']:.4g} "
               f"(exact-gradient run: {final['objective_exact_run']:.4g})\n"
               f"  inference loss: {final['inference_loss']:.4g} (exact-gradient run: "
               f"{final['inference_loss_exact_run']:.4g})\n"
               f"  wall time: {seconds:.1f} s for both runs\n"
               f"written to {out}/ (metrics.csv, objective.png, config.json)")


def file_name(label: str) -> str:
    """An estimator label as a directory name: `sparsemixer-v2*` -> `sparsemixer-v2-star`,
    `reinforce(baseline=mean)` -> `reinforce_baseline=mean`."""
    return re.sub(r"[^\w.=-]+", "_", label.replace("*", "-star")).strip("_")


# ------------------------------------------------------------------------------------------------------ studies
SPEC = FILE
PROFILE_OPTION = click.option("--profile", default=None,
                              help="the spec's profile: quick (CI), full (about an hour on 2 CPU cores) or paper "
                                   "(GPU) [default: full, else the spec's base grid]")
RESULTS_OPTION = click.option("--results", type=DIRECTORY, default=None,
                              help="the results cache [default: $GRADEST_RESULTS, else results/]")


@main.group()
def study():
    """Declarative studies (studies/*.toml): grids of cells, each run once and cached."""


def executor_option(option, executors: list[str]) -> click.Option:
    """The `gradest study run` option of an executor's option (`gradest.study.executor`), its help led by the
    executors that have it: its value as given (text, None or an empty tuple when not given), parsed and checked
    by the library."""
    text = f"{', '.join(executors)}: {option.help}"
    if option.switch:
        return click.Option([option.flag, option.name], is_flag=True, default=False, help=text)
    return click.Option([option.flag, option.name], multiple=option.multiple, default=None, metavar=option.metavar,
                        help=text)


class StudyRunCommand(click.Command):
    """`gradest study run`: its own options, then one per option of every executor (gradest.study.EXECUTORS), read
    from the registry whenever the command runs, so that an executor declares its options with nothing else to
    edit."""

    def get_params(self, ctx):
        from gradest.study.executor import EXECUTORS, all_options
        help_option = self.get_help_option(ctx)
        own = [p for p in super().get_params(ctx) if p is not help_option]
        for param in own:
            if param.name == "executor":
                param.help = "where the cells run: " + "; ".join(f"{name}: {executor.description}"
                                                                for name, executor in EXECUTORS.items())
        return own + [executor_option(option, names) for option, names in all_options().values()] + (
            [help_option] if help_option else [])


@study.command("run", cls=StudyRunCommand)
@click.argument("spec", type=SPEC)
@PROFILE_OPTION
@click.option("--executor", default="local", show_default=True, metavar="NAME")
@click.option("--shard", "shard_spec", metavar="i/N", default=None,
              help="run only the cells whose index in the hash-sorted list is i mod N (0 <= i < N)")
@click.option("--threads", "cell_threads", type=THREADS, default=None,
              help="torch threads of each cell, however many run at once; recorded in each cell's done.json (the "
                   "thread count changes the last bits of a run's numbers) [default: 1 locally, --cpus-per-task "
                   "on Slurm]")
@RESULTS_OPTION
def study_run(spec, profile, executor, shard_spec, cell_threads, results, **options):
    """Run every unfinished cell of SPEC; finished cells (results cached by a hash of their configuration) are
    skipped, failed ones are recorded and retried on the next run. Every cell of the profile is checked (each
    setting's type and value, the devices), and the executor's options, before anything runs or is submitted.
    Locally (the default) Ctrl-C stops the workers at once: finished cells stay, the interrupted ones run again
    next time. `--executor slurm` submits the unfinished cells as a Slurm job array, a cell per task (`gradest
    study status` shows them queued); submitting again submits only the cells neither finished nor still queued."""
    from gradest.study import load_study, results_root, run_study
    spec_ = load_study(spec)
    profile = spec_.resolve_profile(profile)
    if executor == "local":  # (cells another machine runs are sized for that machine)
        check_study_memory(spec_, profile, results, shard_spec)
    summary = run_study(spec_, profile, results, None, shard_spec, command=command_line(), threads=cell_threads,
                        executor=executor, options=options)
    click.echo(summary.text(spec_.name, profile))
    click.echo(f"results in {results_root(results) / spec_.kind}/ (cells shared by every study)")
    if summary.failed or summary.unfinished:
        raise click.ClickException(f"{len(summary.failed)} cell(s) failed (error.json in each)"
                                   + (f", {len(summary.unfinished)} not finished" if summary.unfinished else "")
                                   + "; the others are done; run the study again to retry them")
    if not summary.ran and summary.submitted:
        click.echo(f"`gradest study status {spec}` shows how far the array is")


def check_study_memory(spec, profile: str | None, results, shard_spec: str | None = None) -> None:
    """Every cell this machine will run (of its --shard) must fit in its memory (each kind's estimate,
    gradest.memory): a cell that cannot is refused, naming it, when the study starts, not recorded as failed after
    the others ran. Another shard's cells are another machine's to check."""
    from gradest.study import results_root
    from gradest.study.kind import cell_kind
    from gradest.study.spec import parse_shard, shard
    for cell in shard(spec.cells(profile, results_root(results)), *parse_shard(shard_spec)):
        if not cell.done:
            try:
                cell_kind(cell.kind).check_memory(cell.config)
            except GradestError as error:
                raise GradestError(f"study '{spec.name}' (profile {profile or 'base'}), cell {cell.hash}: "
                                   f"{error}") from None


@study.command("status")
@click.argument("spec", type=SPEC)
@PROFILE_OPTION
@RESULTS_OPTION
def study_status(spec, profile, results):
    """How far SPEC is: its cells done, failed (with their errors) and still to run, in all and per arm."""
    from gradest.study import load_study, status_text
    spec_ = load_study(spec)
    click.echo(status_text(spec_, spec_.resolve_profile(profile), results))


@main.command("report")
@click.argument("spec", type=SPEC)
@PROFILE_OPTION
@RESULTS_OPTION
@click.option("--out", type=DIRECTORY, default=None,
              help="where to write the report [default: reports/<study name>/ for the committed profile (full, "
                   "else the base grid), reports/<study name>/<profile>/ for any other]")
def study_report(spec, profile, results, out):
    """Collect the finished cells of SPEC from the results cache into the report's data (results.csv, curves.csv
    for a training study, report.json), then render reports/<study>/README.md (tables with means and 95% CIs over
    seeds), summary.csv and PNG figures from those CSVs, as `gradest figures` does. The committed report is the
    full profile's (the base grid's when the spec has no full); another profile's report goes to
    reports/<study>/<profile>/ unless --out says otherwise, so it never overwrites the committed one."""
    from gradest.study import load_study, write_report
    with report_errors(out or Path("reports")):
        out = write_report(load_study(spec), profile, results, out, command_line())
    click.echo(f"report written to {out}/README.md")


@main.command("figures")
@click.option("--reports", "reports_dir", type=DIRECTORY,
              default=Path("reports"), show_default=True, help="the directory of committed reports")
def figures(reports_dir):
    """Rebuild the tables, figures and README.md of every report under --reports (each REPORTS/<study>/ or
    REPORTS/<study>/<profile>/ with a report.json), in place, from the CSVs beside it and its study's spec: no
    results cache needed, and the data (report.json, results.csv, curves.csv) is left as it is. Recomputing the
    cells is `gradest study run` then `gradest report`."""
    from gradest.study import regenerate
    if not reports_dir.is_dir():
        raise GradestError(f"--reports {reports_dir} is not a directory; valid: a directory of reports (each "
                           f"<study>/report.json), such as the repository's reports/")
    with report_errors(reports_dir):
        written, skipped = regenerate(reports_dir)
    for path in written:
        click.echo(f"regenerated {path}/README.md")
    for line in skipped:
        click.echo(f"skipped {line}")
    if not written and not skipped:
        click.echo(f"no reports (*/report.json) under {reports_dir}/")
    if skipped:  # each named above; the other reports are rendered
        raise click.ClickException(f"{len(skipped)} report(s) could not be rendered from their files (see above); "
                                   f"they were left as they were")


if __name__ == "__main__":
    main()
