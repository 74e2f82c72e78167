"""A training run's settings: the table of run settings (`RUN_SETTINGS`), and `TrainConfig`, one run's values of
them, checked when it is made.

Each run setting is declared once, as one `RunSetting`: TrainConfig's attributes and checks, a run's record
(config.json, checkpoints, a study cell's configuration and hash), a study spec's types and defaults, the
`gradest run` options and the `--resume` check are all read from that table. A Switch Transformer run's model is a
SwitchConfig over its task's default (`TASK_MODELS`); a Hugging Face run's (the `hf*` settings) is checked and
built by `gradest.hf.train.hf_model_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gradest.devices import world_size
from gradest.errors import GradestError
from gradest.estimators import GATED, Estimator, expand_estimators, trainable
from gradest.estimators.base import (MAX_STEPS, Constraint, check_settings, integer_at_least, integer_between,
                                     learning_rate, nonnegative, one_of, optional, positive, seed_value, unit_interval)
from gradest.model import SwitchConfig
from gradest.presets import PRESETS
from gradest.tasks import DATA_SETTINGS

TASKS = ("lm", "mt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCHEDULES = ("cosine", "inverse-sqrt")
TASK_MODELS = {"lm": {}, "mt": {"n_encoder_layer": 3, "n_layer": 3}}  # each task's model, over SwitchConfig's
# SwitchConfig's settings a run also takes by name (`--experts`, a spec's `experts = 8`), held flat in its record
MODEL_BY_NAME = ("experts", "block_size", "omega")


# --------------------------------------------------------------------------------------------- the run settings
def key_values(texts, read_json: bool = False, example: str = "n_layer=2") -> dict:
    """`KEY=VALUE` pairs given on the command line (a repeated option): each value kept as text (an estimator's
    hyper-parameter is read as its declared type later) or, `read_json`, read as JSON where it parses (2, 0.01,
    true, [1, 2]). A key given twice is refused."""
    table = {}
    for text in texts:
        key, sep, value = str(text).partition("=")
        key = key.strip()
        if not sep or not key:
            raise GradestError(f"{text!r} is not key=value; valid: e.g. {example}")
        if key in table:
            raise GradestError(f"{key} is given twice ({key}={table[key]} and {text}); give it once")
        if read_json:
            try:
                value = json.loads(value)
            except ValueError:
                pass
        table[key] = value.strip() if isinstance(value, str) else value
    return table


def hyper_parameters(texts) -> dict:
    """`--set KEY=VALUE` pairs: estimator hyper-parameters, each value text until an estimator reads it as the
    type of its parameter of that name (every chosen estimator that has one)."""
    table = key_values(texts, example="tau=0.5")
    if "k" in table:
        raise GradestError("set the experts per token with --top-k, not --set k=...")
    return table


def resolved_path(text) -> str:
    return str(Path(text).resolve())


@dataclass(frozen=True)
class RunSetting:
    """One setting of a training run, declared once. From this entry come: TrainConfig's attribute and its check,
    the run's record (config.json, checkpoints, a study cell's configuration and so its hash), the type a study
    spec may give it, the `gradest run` option and whether `--resume` may change it.

      kind          the type of its values (a spec's value is checked against it; an int stands for a float);
      stored        "always": in every run's record; "set": only when it differs from its default (a setting added
                    after cells were computed: their hashes stay as they were); "hf": in a Hugging Face run's only;
      resumable     `--resume DIR` may change it (the rest are the run's own);
      option        its `gradest run` flag ("": --NAME with dashes; None: none); `read` turns the option's value
                    (text, or a tuple of texts for `multiple`) into the setting's.
    """

    name: str
    default: object
    check: Constraint
    help: str
    kind: type
    stored: str = "always"
    resumable: bool = False
    option: str | None = ""
    metavar: str | None = None
    multiple: bool = False
    choices: tuple | None = None
    read: Callable | None = None

    @property
    def flag(self) -> str | None:
        return None if self.option is None else self.option or "--" + self.name.replace("_", "-")

    def to_store(self, config: "TrainConfig") -> bool:
        value = getattr(config, self.name)
        return {"always": True, "set": value != self.default, "hf": config.is_hf}[self.stored]


RUN_SETTINGS: dict[str, RunSetting] = {}


def register_run_setting(setting: RunSetting) -> RunSetting:
    """Add a run setting: TrainConfig, study specs, the record of a run and `gradest run` then all know it. A
    setting added after runs were recorded should be `stored="set"` with a default that keeps their behaviour."""
    if setting.name in RUN_SETTINGS or setting.name in (*MODEL_BY_NAME, "model"):
        raise ValueError(f"a run setting '{setting.name}' is already declared")
    RUN_SETTINGS[setting.name] = setting
    return setting


def unregister_run_setting(name: str) -> None:
    RUN_SETTINGS.pop(name, None)


_NAME = Constraint(lambda v: isinstance(v, str) and bool(v), "a non-empty name")
_PATH = Constraint(lambda v: isinstance(v, (str, Path)) and bool(str(v)), "a path")
_TABLE = Constraint(lambda v: isinstance(v, dict), "a table of settings")
for _setting in (
    RunSetting("task", "lm", one_of(*TASKS), "lm: Switch LM on tiny-shakespeare; mt: Switch encoder-decoder on "
               "Multi30k En-De (BLEU)", str, choices=TASKS),
    RunSetting("estimator", "sparsemixer", _NAME, "the estimator to train with, e.g. sparsemixer or "
               "reinforce:baseline=mean (required unless --resume)", str, metavar="NAME[:KEY=VALUE..]"),
    RunSetting("hparams", {}, _TABLE, "hyper-parameter of the estimator, e.g. --set tau=0.5 (repeatable)", dict,
               option="--set", metavar="KEY=VALUE", multiple=True, read=hyper_parameters),
    RunSetting("top_k", None, optional(integer_at_least(1), "1 for a Switch Transformer, a Hugging Face model's "
               "num_experts_per_tok"), "experts per token k [default 1; a Hugging Face model's own]", int),
    RunSetting("steps", 600, integer_between(1, MAX_STEPS), "optimiser steps; with --resume, the steps to continue "
               "to (more than the run's extend it)", int, resumable=True),
    RunSetting("batch_size", 32, integer_at_least(1), "sequences per step", int),
    RunSetting("lr", 2e-3, learning_rate, "peak learning rate (AdamW)", float),
    RunSetting("warmup", 50, integer_at_least(0), "linear warm-up steps: step s (0-based) runs at "
               "lr * (s + 1) / warmup", int),
    RunSetting("schedule_steps", None, optional(integer_at_least(1), "steps"), "the steps the cosine decays over "
               "[default: --steps; a run extended by --resume keeps its own]", int, stored="set"),
    RunSetting("schedule", "cosine", one_of(*SCHEDULES), "after warm-up: cosine decay to lr * min_lr_ratio, or "
               "fairseq's inverse square root", str, stored="set", choices=SCHEDULES),
    RunSetting("adam_beta2", 0.999, unit_interval, "AdamW's second beta (the first is 0.9)", float, stored="set"),
    RunSetting("label_smoothing", 0.0, unit_interval, "label smoothing of the training loss (validation losses "
               "are plain cross-entropy)", float, stored="set"),
    RunSetting("min_lr_ratio", 0.1, Constraint(lambda v: unit_interval(v) or v == 1, "a number in [0, 1]"),
               "the cosine's final learning rate, as a fraction of lr", float),
    RunSetting("weight_decay", 0.1, nonnegative, "AdamW's weight decay (matrices only)", float),
    RunSetting("grad_clip", 1.0, optional(positive, "no clipping"), "clip the gradient norm at this value", float),
    RunSetting("eval_interval", 100, integer_at_least(1), "steps between validation losses", int),
    RunSetting("plateau", None, optional(positive, "train to --steps"), "stop early once the validation loss has "
               "improved by less than this over the last --plateau-window steps (--steps stays the cap)", float,
               stored="set"),
    RunSetting("plateau_window", 1000, integer_at_least(1), "the steps --plateau looks back over (a multiple of "
               "--eval-interval)", int, stored="set"),
    RunSetting("eval_batches", 8, integer_at_least(1), "batches of each validation loss", int),
    RunSetting("checkpoint_interval", 100, integer_at_least(1), "steps between checkpoints", int),
    RunSetting("seed", 0, seed_value, "seeds the model, the data order and the routing noise", int),
    RunSetting("device", "cpu", _NAME, "cpu, cuda, cuda:1, mps: one of this machine's", str, resumable=True),
    RunSetting("dtype", "float32", one_of(*DTYPES), "bfloat16 trains under autocast; the router stays float32",
               str, choices=tuple(DTYPES)),
    RunSetting("hf", None, optional(_NAME, "the Switch Transformer"), "train a tiny random Hugging Face MoE causal "
               "LM of this architecture instead of the Switch Transformer", str, stored="set", metavar="ARCH"),
    RunSetting("hf_config", None, optional(_PATH, "no config file"), "train a Hugging Face MoE causal LM built "
               "(randomly initialised) from this transformers config JSON; its vocab_size is replaced by the "
               "corpus's", str, stored="set", metavar="FILE", read=resolved_path),
    RunSetting("hf_model", None, optional(_PATH, "no saved model"), "train the Hugging Face MoE causal LM saved in "
               "this local directory (save_pretrained), from its weights; its vocabulary must hold the corpus's "
               "character ids", str, stored="set", metavar="DIR", read=resolved_path),
    RunSetting("hf_settings", {}, _TABLE, "Hugging Face config setting over --hf/--hf-config/--hf-model's, e.g. "
               "--hf-set num_hidden_layers=2 (value read as JSON, else text; repeatable)", dict, stored="hf",
               option="--hf-set", metavar="KEY=VALUE", multiple=True,
               read=lambda texts: key_values(texts, read_json=True, example="num_hidden_layers=2")),
    RunSetting("preset", None, optional(one_of(*PRESETS), "none"), "fill the settings not given from a named "
               "setup: sparsemixer-reference is microsoft/SparseMixer's training setup, sparsemixer-reference-full "
               "adds its model (README: Reproducing the paper)", str,
               stored="set", choices=tuple(PRESETS)),
):
    register_run_setting(_setting)


class TrainConfig:
    """A training run: its settings (one attribute per entry of RUN_SETTINGS, checked against its constraint) and
    `model`, the Switch Transformer it trains (a SwitchConfig, whose vocabulary and padding come from the task's
    data).

    `model` may also be given as a table of SwitchConfig settings over the task's default model. `experts`,
    `block_size` and `omega` are the model's settings of those names, also accepted here (as on the command line
    and in study specs); given both ways they must agree.

    The learning rate warms up linearly for `warmup` steps, then (schedule "cosine") decays along a cosine to
    `lr * min_lr_ratio` at step `schedule_steps` (None: `steps`) and stays there, or (schedule "inverse-sqrt",
    fairseq's, as in the SparseMixer code) falls as sqrt(warmup / step). `preset` records the named setup
    (gradest.presets) the run's settings were filled from. A run planned for N steps keeps that schedule when it
    is resumed to another number of steps (`Trainer.resume` sets `schedule_steps` = N): the learning rate never
    jumps at the resume point, a resume to the same steps reproduces the uninterrupted run exactly, and the steps
    that extend a run beyond N run at the final rate `lr * min_lr_ratio`."""

    def __init__(self, *, model: SwitchConfig | dict | None = None, experts: int | None = None,
                 block_size: int | None = None, omega: bool | None = None, **settings):
        unknown = [key for key in settings if key not in RUN_SETTINGS]
        if unknown:
            raise GradestError(f"unknown run setting '{unknown[0]}'; valid: "
                               f"{', '.join([*RUN_SETTINGS, *MODEL_BY_NAME, 'model'])}")
        for name, setting in RUN_SETTINGS.items():
            setattr(self, name, copy.deepcopy(settings.get(name, setting.default)))
        self.model = model
        given = {key: value for key, value in (("experts", experts), ("block_size", block_size), ("omega", omega))
                 if value is not None}
        if self.is_hf:
            if self.preset is not None:
                raise GradestError(f"preset {self.preset} sets up the Switch Transformer; a Hugging Face model takes "
                                   f"its settings from its config (--hf-set KEY=VALUE)")
            from gradest.hf.train import hf_model_config  # on use: gradest.hf needs the `hf` extra
            self.hf_transformers_config = hf_model_config(self, given)  # checks, sets top_k and self.model
        else:
            if self.hf_settings:
                raise GradestError("hf_settings (--hf-set) set a Hugging Face model's config; add hf (--hf ARCH), "
                                   "hf_config (--hf-config FILE) or hf_model (--hf-model DIR)")
            if self.top_k is None:
                self.top_k = 1
        check_settings("run", {name: getattr(self, name) for name in RUN_SETTINGS},
                       {name: setting.check for name, setting in RUN_SETTINGS.items()})
        if self.plateau is not None and self.plateau_window % self.eval_interval:
            raise GradestError(f"plateau_window={self.plateau_window} is not a multiple of eval_interval="
                               f"{self.eval_interval}: the validation loss it compares with must have been "
                               f"evaluated; valid: a multiple of {self.eval_interval}")
        if self.is_hf:
            return
        if not isinstance(self.model, SwitchConfig):
            table = dict(self.model or {})
            valid = [f.name for f in dataclasses.fields(SwitchConfig) if f.name not in DATA_SETTINGS]
            for key in table:
                if key not in valid:
                    raise GradestError(f"unknown model setting '{key}'; valid: {', '.join(valid)}"
                                       if key not in DATA_SETTINGS else
                                       f"model setting '{key}' comes from the task's data; valid: {', '.join(valid)}")
            for key, value in given.items():
                if key in table and table[key] != value:
                    raise GradestError(f"{key}={value} and model setting {key}={table[key]} disagree; give one")
            self.model = SwitchConfig(**{**TASK_MODELS[self.task], **table, **given})
        elif given:
            self.model = dataclasses.replace(self.model, **given)
        if self.top_k > self.model.experts:
            raise GradestError(f"top_k={self.top_k} is larger than experts={self.model.experts}; valid: 1 <= top_k "
                               f"<= {self.model.experts}")

    @staticmethod
    def default(name: str):
        """A run setting's default (`TrainConfig.default("lr")`)."""
        return RUN_SETTINGS[name].default

    def __eq__(self, other) -> bool:
        return isinstance(other, TrainConfig) and self.settings() == other.settings()

    def __repr__(self) -> str:
        return f"TrainConfig({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"

    @property
    def is_hf(self) -> bool:
        return any(value is not None for value in (self.hf, self.hf_config, self.hf_model))

    def settings(self) -> dict:
        """The run as flat settings (config.json, checkpoints, study cells): `experts`, `block_size` and `omega`
        by name, every run setting that its entry stores (see RunSetting.stored: a study cell's hash covers these
        settings, so a setting added later is held only where it is set), and `model` the settings that differ
        from the task's default model."""
        default = SwitchConfig(**TASK_MODELS[self.task])
        flat = {name: getattr(self, name) for name, setting in RUN_SETTINGS.items() if setting.to_store(self)}
        model = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(SwitchConfig)
                 if f.name not in (*DATA_SETTINGS, *MODEL_BY_NAME)
                 and getattr(self.model, f.name) != getattr(default, f.name)}
        ordered = {"task": flat.pop("task"), "estimator": flat.pop("estimator"), "hparams": flat.pop("hparams"),
                   "experts": self.model.experts, "top_k": flat.pop("top_k"), "omega": self.model.omega,
                   "steps": flat.pop("steps"), "batch_size": flat.pop("batch_size"),
                   "block_size": self.model.block_size}
        return {**ordered, **flat, "model": model}

    def build_estimator(self, defaults=None) -> Estimator:
        """The run's estimator, from its spec, hyper-parameters and k; `defaults(cls)`: the hyper-parameters a
        model fixes where neither the spec nor `hparams` sets them (a Hugging Face model's native rule)."""
        (estimator,) = expand_estimators([self.estimator], GATED, self.top_k, self.hparams, defaults)
        if estimator.enumerates:
            raise GradestError(f"estimator '{estimator.name}' cannot train an MoE layer (it needs one pass of the "
                               f"layers above per expert tuple); valid: {', '.join(trainable(GATED, self.top_k))}")
        # (checked with the other settings, before anything is written); under torchrun each process scores its
        # own share of the batch
        world = world_size()
        if estimator.min_batch > self.batch_size // world:
            share = f" over {world} processes ({self.batch_size // world} each)" if world > 1 else ""
            raise GradestError(f"estimator '{estimator.label}' needs a batch of at least {estimator.min_batch} "
                               f"sequences{' in each process' if world > 1 else ''}, got batch_size="
                               f"{self.batch_size}{share}; valid: batch_size >= {estimator.min_batch * world} "
                               f"(--batch-size)")
        return estimator
