"""A training run's settings: `TrainConfig` (`gradest run`, study cells, checkpoints), checked when it is made.

A Switch Transformer run's model is a SwitchConfig over its task's default (`TASK_MODELS`); a Hugging Face run's
(the `hf*` settings) is checked and built by `gradest.hf.train.hf_model_config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field

import torch

from gradest.errors import GradestError
from gradest.estimators import GATED, Estimator, expand_estimators, trainable
from gradest.estimators.base import (MAX_STEPS, Constraint, check_settings, integer_at_least, integer_between,
                                     nonnegative, one_of, optional, positive, unit_interval)
from gradest.model import SwitchConfig
from gradest.presets import PRESETS
from gradest.tasks import DATA_SETTINGS

TASKS = ("lm", "mt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCHEDULES = ("cosine", "inverse-sqrt")


TASK_MODELS = {"lm": {}, "mt": {"n_encoder_layer": 3, "n_layer": 3}}  # each task's model, over SwitchConfig's
RUN_SETTINGS = {  # what a run's settings must be (the model's are SwitchConfig's)
    "task": one_of(*TASKS), "estimator": Constraint(lambda v: isinstance(v, str) and bool(v), "an estimator name"),
    "hparams": Constraint(lambda v: isinstance(v, dict), "a table of hyper-parameters"),
    "top_k": integer_at_least(1), "steps": integer_between(1, MAX_STEPS), "batch_size": integer_at_least(1),
    "lr": positive, "warmup": integer_at_least(0), "schedule_steps": optional(integer_at_least(1), "steps"),
    "schedule": one_of(*SCHEDULES), "adam_beta2": unit_interval,
    "label_smoothing": unit_interval, "preset": optional(one_of(*PRESETS), "none"),
    "min_lr_ratio": Constraint(lambda v: unit_interval(v) or v == 1, "a number in [0, 1]"),
    "weight_decay": nonnegative, "grad_clip": optional(positive, "no clipping"),
    "eval_interval": integer_at_least(1), "eval_batches": integer_at_least(1),
    "checkpoint_interval": integer_at_least(1), "seed": integer_at_least(0),
    "device": Constraint(lambda v: isinstance(v, str) and bool(v), "a device name"), "dtype": one_of(*DTYPES),
}


@dataclass
class TrainConfig:
    """A training run: the optimisation and `model`, the Switch Transformer it trains (a SwitchConfig, whose
    vocabulary and padding come from the task's data).

    `model` may also be given as a table of SwitchConfig settings over the task's default model. `experts`,
    `block_size` and `omega` are the model's settings of those names, also accepted here (as on the command line
    and in study specs); given both ways they must agree.

    The learning rate warms up linearly for `warmup` steps, then (schedule "cosine") decays along a cosine to
    `lr * min_lr_ratio` at step `schedule_steps` (None: `steps`) and stays there, or (schedule "inverse-sqrt",
    fairseq's, as in the SparseMixer code) falls as sqrt(warmup / step). `adam_beta2` is AdamW's second beta (the first is 0.9); `label_smoothing`
    smooths the training loss only (validation losses are plain cross-entropy). `preset` records the named setup
    (gradest.presets) the run's settings were filled from. A run planned for N steps keeps that schedule when it
    is resumed to another number of steps (`Trainer.resume` sets `schedule_steps` = N): the learning rate never
    jumps at the resume point, a resume to the same steps reproduces the uninterrupted run exactly, and the steps
    that extend a run beyond N run at the final rate `lr * min_lr_ratio`."""

    task: str = "lm"
    estimator: str = "sparsemixer"  # a registry name, optionally NAME:KEY=VALUE..
    hparams: dict = field(default_factory=dict)  # estimator hyper-parameters (--set)
    top_k: int | None = None  # None: 1 for a Switch Transformer, the HF model's num_experts_per_tok
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    schedule_steps: int | None = None  # the steps the cosine decays over; None: steps (see above)
    schedule: str = "cosine"  # or "inverse-sqrt"
    adam_beta2: float = 0.999
    label_smoothing: float = 0.0
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 100
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # or bfloat16 (autocast; the router stays float32)
    model: SwitchConfig | dict | None = None
    # a Hugging Face MoE causal LM instead of the Switch Transformer (one of the three; see `HFCausalLM`):
    hf: str | None = None  # a supported architecture's tiny random model (gradest.hf.training_config)
    hf_config: str | None = None  # a transformers config file (JSON), randomly initialised
    hf_model: str | None = None  # a local model directory (save_pretrained), its weights loaded
    hf_settings: dict = field(default_factory=dict)  # config overrides, e.g. {"num_hidden_layers": 2}
    preset: str | None = None  # the named setup the settings came from (gradest.presets), for the record
    experts: InitVar[int | None] = None
    block_size: InitVar[int | None] = None  # lm: characters per sequence
    omega: InitVar[bool | None] = None  # None: the estimator's default

    def __post_init__(self, experts, block_size, omega):
        given = {key: value for key, value in (("experts", experts), ("block_size", block_size), ("omega", omega))
                 if value is not None}
        if self.is_hf:
            from gradest.hf.train import hf_model_config  # on use: gradest.hf needs the `hf` extra
            self.hf_transformers_config = hf_model_config(self, given)  # checks, sets top_k and self.model
        elif self.top_k is None:
            self.top_k = 1
        check_settings("run", {key: getattr(self, key) for key in RUN_SETTINGS}, RUN_SETTINGS)
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

    @property
    def is_hf(self) -> bool:
        return any(value is not None for value in (self.hf, self.hf_config, self.hf_model))

    def settings(self) -> dict:
        """The run as flat settings (config.json, checkpoints, study cells): `experts`, `block_size` and `omega`
        by name, and `model` the settings that differ from the task's default model. `schedule_steps` only when
        set (an extended run's), the `hf*` settings only in a Hugging Face run: a study cell's hash covers these
        settings, and a new one would change them all."""
        default = SwitchConfig(**TASK_MODELS[self.task])
        unset = {"schedule_steps": self.schedule_steps is None, "schedule": self.schedule == "cosine",
                 "adam_beta2": self.adam_beta2 == 0.999, "label_smoothing": self.label_smoothing == 0,
                 "preset": self.preset is None, "hf": self.hf is None,
                 "hf_config": self.hf_config is None, "hf_model": self.hf_model is None,
                 "hf_settings": not self.is_hf}
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"
                and not unset.get(f.name, False)}
        model = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(SwitchConfig)
                 if f.name not in (*DATA_SETTINGS, "experts", "block_size", "omega")
                 and getattr(self.model, f.name) != getattr(default, f.name)}
        ordered = {"task": flat.pop("task"), "estimator": flat.pop("estimator"), "hparams": flat.pop("hparams"),
                   "experts": self.model.experts, "top_k": flat.pop("top_k"), "omega": self.model.omega,
                   "steps": flat.pop("steps"), "batch_size": flat.pop("batch_size"),
                   "block_size": self.model.block_size}
        return {**ordered, **flat, "model": model}

    def build_estimator(self) -> Estimator:
        (estimator,) = expand_estimators([self.estimator], GATED, self.top_k, self.hparams)
        if estimator.enumerates:
            raise GradestError(f"estimator '{estimator.name}' cannot train an MoE layer (it needs one pass of the "
                               f"layers above per expert tuple); valid: {', '.join(trainable(GATED, self.top_k))}")
        return estimator
