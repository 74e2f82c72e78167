"""Training a Switch Transformer with any routing estimator: `gradest run` (docs/estimators.md §5, issue 3).

One loop serves both tasks. A `Task` knows its data and how to score a batch: `lm` (tiny-shakespeare, characters)
and `mt` (Multi30k En-De, BPE, BLEU). Each step's loss is the mean cross-entropy plus the MoE layers' auxiliary
losses; a score-function estimator (REINFORCE) adds its surrogate term over each sequence's loss. Everything that
decides the next step — model, optimiser, scheduler, the data generator and the RNG the estimators draw from — is
checkpointed, so a resumed run reproduces the uninterrupted one exactly on the CPU.

Hugging Face models (`gradest run --hf ARCH | --hf-config FILE | --hf-model DIR`, TrainConfig's `hf*` settings):
the lm task trains a transformers MoE causal LM instead, every MoE block routed by the estimator through
`gradest.hf.patch` (`HFCausalLM`), with the same loop, files and resume; see `hf_model_config` for the choices.

Data parallel: `torchrun --nproc-per-node N -m gradest.cli run ...` runs N ranks (gloo on the CPU, nccl on CUDA).
Every rank draws the same global batch and trains on its share of the sequences; DistributedDataParallel averages
the gradients, so they equal one process's on the whole batch, except through what is computed per rank: the
load-balancing loss (per device, as in Switch and fairseq), REINFORCE's batch-mean baseline and the routing noise.
Only rank 0 writes files.

Stopping: under `gradest run` (`Trainer.run(handle_signals=True)`) SIGINT (Ctrl-C) or SIGTERM stops a run after the
step under way, with its checkpoint and metrics written (`Interrupted`). A step whose loss, gradients or parameters
are not finite stops it with `Diverged`, and no checkpoint is ever written with non-finite parameters (the last good
one stays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import threading
import time
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradest.devices import check_device
from gradest.errors import GradestError
from gradest.estimators import GATED, Estimator, expand_estimators, trainable
from gradest.estimators.base import (MAX_STEPS, Constraint, NonFiniteLogits, check_settings, integer_at_least,
                                     integer_between, nonnegative, one_of, optional, positive, unit_interval)
from gradest.io import atomic_write_bytes, atomic_write_text, run_metadata, write_json
from gradest.model import SwitchConfig, SwitchLM, SwitchSeq2Seq, token_cross_entropy
from gradest.presets import PRESETS

TASKS = ("lm", "mt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCHEDULES = ("cosine", "inverse-sqrt")


TASK_MODELS = {"lm": {}, "mt": {"n_encoder_layer": 3, "n_layer": 3}}  # each task's model, over SwitchConfig's
GREEDY_MAX_LEN = 80  # tokens a translation may have in greedy decoding
DATA_SETTINGS = ("vocab_size", "pad_id")  # model settings the task's data decides
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
    hf: str | None = None  # a supported architecture's tiny random model (gradest.hf.SUPPORTED, HF_TRAIN sizes)
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


# ------------------------------------------------------------------------------------------------------- tasks
class LanguageModelling:
    """Character-level tiny-shakespeare: random windows of `block_size` characters."""

    def __init__(self, config: TrainConfig):
        from gradest.datasets import lm_batch, load_shakespeare
        self.config, self.corpus, self.lm_batch = config, load_shakespeare(), lm_batch

    def model(self, estimator) -> SwitchLM:
        return SwitchLM(dataclasses.replace(self.config.model, vocab_size=self.corpus.vocab_size), estimator)

    def batch(self, split: str, generator: torch.Generator):
        tokens = self.corpus.train if split == "train" else self.corpus.val
        x, y = self.lm_batch(tokens, self.config.batch_size, self.config.model.block_size, generator)
        return x.to(self.config.device), y.to(self.config.device)

    @staticmethod
    def token_loss(model, batch, label_smoothing: float = 0.0):
        """Per-token cross-entropy (B, T) (label-smoothed if asked) and which tokens count (all of them here)."""
        logits, loss = model(*batch)
        if label_smoothing:
            loss = token_cross_entropy(logits, batch[1], -100, label_smoothing)
        return loss, torch.ones_like(loss, dtype=torch.bool)

    def final_metrics(self, model) -> dict:
        return {}


class Translation:
    """Multi30k En-De with a joint BPE; the final metrics are greedy-decoding BLEU on val and test_2016."""

    def __init__(self, config: TrainConfig):
        from gradest.datasets import load_multi30k, translation_batches
        self.config, self.data, self.batches = config, load_multi30k(), translation_batches
        self.iterators = {}
        longest = max(max(len(src), len(tgt)) for split in (self.data.train, self.data.val, self.data.test)
                      for src, tgt in split)
        needed = max(longest, GREEDY_MAX_LEN + 1)  # greedy decoding: BOS and up to GREEDY_MAX_LEN tokens
        if config.model.block_size < needed:
            raise GradestError(f"block_size={config.model.block_size} is shorter than translation needs (the "
                               f"longest Multi30k sentence has {longest} tokens, greedy decoding writes up to "
                               f"{GREEDY_MAX_LEN + 1} positions); valid: block_size >= {needed}")

    def model(self, estimator) -> SwitchSeq2Seq:
        cfg = dataclasses.replace(self.config.model, vocab_size=self.data.vocab_size, pad_id=self.data.pad_id)
        return SwitchSeq2Seq(cfg, estimator, self.data.pad_id)

    def batch(self, split: str, generator: torch.Generator):
        pairs = self.data.train if split == "train" else self.data.val
        src, tgt_in, tgt_out = next(iter(self.batches(pairs, self.config.batch_size, generator, self.data.pad_id)))
        return src.to(self.config.device), tgt_in.to(self.config.device), tgt_out.to(self.config.device)

    def token_loss(self, model, batch, label_smoothing: float = 0.0):
        """Per-token cross-entropy (B, T) (label-smoothed if asked) and which tokens count (not the padding)."""
        logits, loss = model(*batch)
        if label_smoothing:
            loss = token_cross_entropy(logits, batch[2], self.data.pad_id, label_smoothing)
        return loss, batch[2] != self.data.pad_id

    def final_metrics(self, model) -> dict:
        from gradest.datasets import bleu
        model.eval()
        out = {}
        for split in ("val", "test"):
            pairs = getattr(self.data, split)
            hypotheses = []
            for start in range(0, len(pairs), 128):
                chunk = [src for src, _ in pairs[start:start + 128]]
                src = torch.full((len(chunk), max(map(len, chunk))), self.data.pad_id, dtype=torch.long)
                for i, ids in enumerate(chunk):
                    src[i, :len(ids)] = torch.tensor(ids)
                ids = model.greedy(src.to(self.config.device), self.data.bos_id, self.data.eos_id,
                                   max_len=GREEDY_MAX_LEN)
                hypotheses += [self.data.decode(h) for h in ids]
            out[f"bleu_{split}"] = bleu(hypotheses, self.data.target_text[split])
        return out


# ------------------------------------------------------------------------------------------ Hugging Face models
# `gradest run --hf NAME`: a tiny random model of a supported architecture, gradest.hf.tiny_config's with these
# sizes over it (a default run, 600 steps of 32 x 128 characters, takes about two minutes on 2 CPU cores), then
# `hf_settings`. Every architecture gets HF_TRAIN_EXPERTS experts, routed k = 2 per token (`num_experts_per_tok`).
HF_TRAIN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4)
HF_TRAIN_EXPERTS = 8
HF_TRAIN_MOE = {name: dict(moe_intermediate_size=128) for name in ("qwen2_moe", "qwen3_moe", "deepseek_v3")}
HF_EXPERTS = {"mixtral": "num_local_experts", "phimoe": "num_local_experts", "gpt_oss": "num_local_experts",
              "qwen2_moe": "num_experts", "qwen3_moe": "num_experts", "olmoe": "num_experts",
              "deepseek_v3": "n_routed_experts"}  # the config key of each causal architecture's expert count
HF_SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id")  # dropped: the characters have none


def hf_model_config(config: TrainConfig, given: dict):
    """The transformers config of a Hugging Face run, checked up front (one-line GradestErrors). Sets the run's
    `top_k` (default: the model's `num_experts_per_tok`; given, it becomes the model's) and its `model` (only the
    sequence length `block_size` applies; `experts` mirrors the HF model's). The vocabulary is set by the task."""
    from gradest import hf

    sources = [(option, value) for option, value in (("hf", config.hf), ("hf_config", config.hf_config),
                                                     ("hf_model", config.hf_model)) if value is not None]
    if len(sources) > 1:
        raise GradestError(f"{' and '.join(f'{o}={v}' for o, v in sources)} both choose the model; give one of "
                           f"hf (--hf), hf_config (--hf-config), hf_model (--hf-model)")
    causal = [name for name in hf.SUPPORTED if name in HF_EXPERTS]
    if config.task != "lm":
        raise GradestError(f"a Hugging Face model trains as a causal LM on the lm task (tiny-shakespeare), not "
                           f"task={config.task}; valid: task lm")
    if not isinstance(config.hf_settings, dict):
        raise GradestError(f"hf_settings must be a table of config settings, got {config.hf_settings!r}")
    if isinstance(config.model, SwitchConfig):
        default = SwitchConfig()
        table = {f.name: getattr(config.model, f.name) for f in dataclasses.fields(SwitchConfig)
                 if f.name not in DATA_SETTINGS and getattr(config.model, f.name) != getattr(default, f.name)}
    else:
        table = dict(config.model or {})
    for key in table:
        if key not in ("block_size", "experts"):
            raise GradestError(f"model setting '{key}' is a Switch Transformer setting; a Hugging Face model takes "
                               f"its settings from its config (--hf-set KEY=VALUE); valid model setting: "
                               f"block_size")
    if given.get("omega") is not None or table.get("omega") is not None:
        raise GradestError("omega is a Switch Transformer setting; valid with a Hugging Face model: leave it unset")
    settings = dict(config.hf_settings)
    try:
        if config.hf is not None:
            if config.hf not in hf.SUPPORTED:
                raise GradestError(f"unknown architecture '{config.hf}'; valid: {', '.join(causal)}")
            name = config.hf
            where = f"--hf {name}"
            if name in HF_EXPERTS:
                cfg = hf.tiny_config(name, k=2, **{**HF_TRAIN, HF_EXPERTS[name]: HF_TRAIN_EXPERTS,
                                                   **HF_TRAIN_MOE.get(name, {}), **settings})
        elif config.hf_config is not None:
            path = Path(config.hf_config)
            where = str(path)
            if not path.is_file():
                raise GradestError(f"no such config file: {path}; valid: a transformers config JSON (its "
                                   f"config.json)")
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise GradestError(f"{path} is not a JSON transformers config ({error})") from None
            if not isinstance(saved, dict) or not isinstance(saved.get("model_type"), str):
                raise GradestError(f"{path} has no \"model_type\"; valid: a transformers config JSON, e.g. "
                                   f"written by config.save_pretrained(dir)")
            name = saved.pop("model_type")
            if name in HF_EXPERTS:
                cfg = hf.transformers.AutoConfig.for_model(name, **{**saved, **settings})
        else:
            path = Path(config.hf_model)
            where = str(path)
            if not (path / "config.json").is_file():
                raise GradestError(f"{path}/ is not a saved model (no config.json); valid: a directory written by "
                                   f"model.save_pretrained(dir)")
            cfg = hf.transformers.AutoConfig.from_pretrained(path, local_files_only=True, **settings)
            name = cfg.model_type
    except (*hf.CONFIG_ERRORS, OSError) as error:
        raise GradestError(f"cannot build the Hugging Face config: {hf.config_error(error)}") from None
    if name not in HF_EXPERTS:
        why = ("is an encoder-decoder; gradest run trains causal LMs (route it with gradest.hf.patch in your own "
               "loop)" if name == "switch_transformers" else "has no mixture-of-experts block gradest.hf can route")
        raise GradestError(f"model_type '{name}' ({where}) {why}; valid: {', '.join(causal)}")
    if config.hf_model is None:
        for key in HF_SPECIAL_TOKENS:
            setattr(cfg, key, None)
    n = getattr(cfg, HF_EXPERTS[name])
    if given.get("experts", table.get("experts", n)) != n:
        raise GradestError(f"experts={given.get('experts', table.get('experts'))} but the Hugging Face model has "
                           f"{n}; set them in its config: --hf-set {HF_EXPERTS[name]}=N")
    if config.top_k is None:
        config.top_k = int(cfg.num_experts_per_tok)
    if not (isinstance(config.top_k, int) and 1 <= config.top_k <= n):
        raise GradestError(f"top_k={config.top_k} does not fit the model's {n} experts; valid: 1 <= top_k <= {n}")
    cfg.num_experts_per_tok = config.top_k
    if getattr(cfg, "router_aux_loss_coef", 0) and hasattr(cfg, "output_router_logits"):
        cfg.output_router_logits = True  # the model's own load-balancing loss
    block = given.get("block_size", table.get("block_size", SwitchConfig.block_size))
    longest = getattr(cfg, "max_position_embeddings", None)
    if isinstance(block, int) and longest is not None and block > longest:
        raise GradestError(f"block_size={block} is longer than the model's max_position_embeddings={longest}; "
                           f"valid: block_size <= {longest}")
    config.model = SwitchConfig(experts=n, block_size=block)
    return cfg


class HFLanguageModelling(LanguageModelling):
    """The lm task (tiny-shakespeare characters, the same batches) for a Hugging Face causal LM."""

    def model(self, estimator) -> "HFCausalLM":
        return HFCausalLM(self.config, estimator, self.corpus.vocab_size)


class HFCausalLM(torch.nn.Module):
    """A Hugging Face MoE causal LM routed by a gradest estimator (`gradest.hf.patch`), with what the Trainer asks
    of a Switch model: per-token cross-entropy, the auxiliary loss (the model's own router load-balancing loss,
    `router_aux_loss_coef` times its `aux_loss`, where the config has one), the score-function term (through
    `gradest.hf.score_loss`), a zero-output pass, routing statistics per patched block, parameter counts.

    The characters' ids are the token ids. `hf` and `hf_config` models are randomly initialised with the corpus's
    vocabulary (the config's `vocab_size` is replaced); an `hf_model` keeps its weights and vocabulary, which must
    hold the corpus's ids."""

    def __init__(self, config: TrainConfig, estimator: Estimator, vocab_size: int):
        super().__init__()
        from gradest import hf

        cfg = config.hf_transformers_config
        if config.hf_model is None:
            cfg.vocab_size = vocab_size
            self.hf_model = hf.model_from_config(cfg)
        else:
            if cfg.vocab_size < vocab_size:
                raise GradestError(f"the model in {config.hf_model}/ has vocab_size={cfg.vocab_size}, fewer than "
                                   f"the corpus's {vocab_size} characters; valid: vocab_size >= {vocab_size}")
            try:
                self.hf_model = hf.transformers.AutoModelForCausalLM.from_pretrained(
                    config.hf_model, config=cfg, local_files_only=True, dtype=torch.float32)
            except (OSError, ValueError, RuntimeError) as error:
                raise GradestError(f"cannot load the model in {config.hf_model}/: {error}") from None
        hparams = {key: value for key, value in config.hparams.items() if key in type(estimator).params}
        self.patched = hf.patch(self.hf_model, config.estimator, k=config.top_k, **hparams)
        self.estimator = self.patched.estimator
        self.aux_coef = float(cfg.router_aux_loss_coef) if getattr(cfg, "output_router_logits", False) else 0.0
        self.last_aux = torch.zeros(())

    def forward(self, idx, targets=None):
        """Logits (B, T, V) and, given targets, the per-token cross-entropy (B, T)."""
        out = self.hf_model(input_ids=idx, use_cache=False)
        aux = out.get("aux_loss") if self.aux_coef else None
        self.last_aux = self.aux_coef * aux.float() if aux is not None else torch.zeros(())
        if targets is None:
            return out.logits, None
        return out.logits, token_cross_entropy(out.logits, targets, -100)

    def aux_loss(self):
        return self.last_aux

    def sampled(self) -> bool:
        """Whether the last forward sampled a routing with a log-probability (a score-function estimator)."""
        return any(b.block.gradest_log_prob is not None for b in self.patched.blocks)

    def score_loss(self, loss_per_sequence, loss_zero=None):
        from gradest import hf
        return hf.score_loss(self.hf_model, loss_per_sequence, loss_zero=loss_zero)

    def zero_moe(self, zero: bool):
        self.patched.zeroed = zero

    def moe_layers(self) -> list:
        return []  # no gradest MoE layer: the patched blocks are `patched.blocks`

    def routing_stats(self) -> list[dict]:
        """Each patched block's routing of the last forward: tokens per expert, the fraction of chosen experts
        among the top k of the logits, the entropy of softmax(z)."""
        blocks = [b for b in self.patched.blocks if b.routed is not None]
        parts = []
        with torch.no_grad():
            for b in blocks:
                z, choice = b.routed
                top = z.topk(choice.shape[-1], -1).indices
                hits = (choice.unsqueeze(-1) == top.unsqueeze(-2)).any(-1).sum()
                log_p = z.log_softmax(-1)
                entropy = -(log_p.exp() * log_p).sum(-1).mean()
                parts.append(torch.cat([torch.bincount(choice.reshape(-1), minlength=b.n).double(),
                                        hits.double().view(1), entropy.double().view(1)]))
            values = torch.cat(parts).tolist() if parts else []  # one host transfer
        stats, start = [], 0
        for b in blocks:
            *loads, hits, entropy = values[start:start + b.n + 2]
            start += b.n + 2
            stats.append({"tokens_per_expert": [int(c) for c in loads], "argmax_fraction": hits / max(1, sum(loads)),
                          "router_entropy": entropy})
        return stats

    def num_parameters(self, active: bool = False) -> int:
        """Parameters, or those a token uses (each patched block counts k of its experts)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for b in self.patched.blocks:
                per_expert = sum(p[0].numel() for p in b.block.experts.parameters() if p.dim() and p.shape[0] == b.n)
                total -= (b.n - b.k) * per_expert
        return total


# ---------------------------------------------------------------------------------------------------- training
def start_distributed(config: TrainConfig) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) join the process group: nccl on CUDA, each local rank
    on its own GPU, gloo on the CPU. A plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if config.batch_size % world:
        raise GradestError(f"batch_size={config.batch_size} does not split over {world} processes; valid: a "
                           f"multiple of {world}")
    cuda = torch.device(config.device).type == "cuda"
    if cuda:
        config.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(config.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM after step `step`, its checkpoint and metrics written. A
    KeyboardInterrupt, not an Exception: whatever stops on Ctrl-C stops on it too, and code that records an
    Exception as a failed run (the study runner) leaves the run unfinished instead, to be resumed."""

    def __init__(self, step: int, signum: int):
        super().__init__(step, signum)
        self.step, self.signum = step, signum


class Diverged(GradestError):
    """The loss, the gradients or the parameters became NaN or inf; the last checkpoint written (all finite) stays."""


@contextlib.contextmanager
def stop_signals(enabled: bool = True):
    """While training: SIGINT and SIGTERM set a flag (the list this yields gets the signal's number) that the loop
    checks between steps, so a stop never leaves a step half done and always leaves a checkpoint. A second signal
    stops at once (KeyboardInterrupt; the atomic writes keep the last checkpoint whole). The previous handlers are
    restored afterwards. Only the main thread may set handlers (elsewhere nothing changes), and a signal ignored
    (SIG_IGN: nohup) stays ignored. Not `enabled`: nothing changes (the list stays empty)."""
    received = []

    def handle(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {}
    if enabled and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, handle)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


RUN_FILES = ("checkpoint.pt", "metrics.csv", "config.json", "loss.png")  # what a run writes into its directory
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "data_generator", "rng", "step", "rows", "seconds", "config"}


def remove_stale_temporaries(out: Path):
    """Delete what killed writes left in a run directory: gradest.io writes `.NAME.<random>.tmp` next to NAME and
    renames it; a SIGKILL in between leaves it (a checkpoint's is as large as the model and optimiser). One process
    trains a run directory, so at its start every such file of the run's is stale."""
    for name in RUN_FILES:
        for path in Path(out).glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)


def load_checkpoint(out) -> dict:
    """The checkpoint of the run in `out`. A file that is no checkpoint (empty, cut short, overwritten) is one line
    naming it and what to do, not torch's traceback."""
    path = Path(out) / "checkpoint.pt"
    if not path.is_file():
        raise GradestError(f"no checkpoint to resume in {out}/ (expected {path})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - torch.load raises many types (RuntimeError, UnpicklingError, EOFError, ..)
        state = None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        what = "empty" if path.stat().st_size == 0 else "truncated or not a gradest checkpoint"
        raise GradestError(f"{path} is not a readable checkpoint ({what}); delete the run directory {out}/ to start "
                           f"over, or resume another run")
    return state


@dataclass
class Trainer:
    """Holds everything a run needs; `state_dict` is exactly what decides the steps still to come."""

    config: TrainConfig
    out: Path

    def __post_init__(self):
        check_device(self.config.device)  # before anything is loaded: one line, not torch's traceback
        self.rank, self.world = start_distributed(self.config)
        torch.manual_seed(self.config.seed)
        self.estimator = self.config.build_estimator()
        task = HFLanguageModelling if self.config.is_hf else LanguageModelling if self.config.task == "lm" \
            else Translation
        self.task = task(self.config)
        self.model = self.task.model(self.estimator).to(self.config.device)
        if self.config.is_hf:
            self.estimator = self.model.estimator  # patch's: with the defaults the model fixes
        # the model the loss runs through: DDP averages gradients over ranks in backward
        self.forward_model = DistributedDataParallel(self.model) if self.world > 1 else self.model
        torch.manual_seed(self.config.seed + self.rank)  # each rank its own routing noise
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=self.config.lr,
                                           betas=(0.9, self.config.adam_beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.data_generator = torch.Generator().manual_seed(self.config.seed)
        self.step, self.rows, self.seconds = 0, [], 0.0
        self.saved_step = None  # the step of the checkpoint on disk (None: none written yet)
        self.resumed_from = None  # the step this process resumed the run at (None: it started the run)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to min_lr_ratio at step schedule_steps (default: the last step), held
        there after it (see TrainConfig)."""
        c = self.config
        if step < c.warmup:
            return (step + 1) / c.warmup
        if c.schedule == "inverse-sqrt":
            return math.sqrt(max(c.warmup, 1) / (step + 1))
        progress = min(1.0, (step - c.warmup) / max(1, (c.schedule_steps or c.steps) - c.warmup))
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def autocast(self):
        device = torch.device(self.config.device).type
        return torch.autocast(device, dtype=DTYPES[self.config.dtype], enabled=self.config.dtype != "float32")

    def loss(self, batch, forward_model=None) -> tuple[torch.Tensor, dict]:
        """The loss to back-propagate: mean cross-entropy + auxiliary losses (+ the score-function surrogate)."""
        forward_model = forward_model or self.forward_model
        with self.autocast():
            token_loss, counted = self.task.token_loss(forward_model, batch, self.config.label_smoothing)
        tokens = counted.sum(-1).clamp_min(1)
        sequence_loss = token_loss.sum(-1) / tokens  # f of each sequence
        aux = self.model.aux_loss()
        hf = isinstance(self.model, HFCausalLM)
        log_prob = None if hf else self.model.routing_log_prob()
        if (not self.model.sampled()) if hf else log_prob is None:
            objective = sequence_loss.mean()
        else:  # REINFORCE: f is each sequence's loss, log P sums over its tokens and the MoE layers
            f_zero = None
            if self.estimator.needs_zero_output:
                with torch.no_grad(), self.autocast():
                    self.model.zero_moe(True)
                    zero_loss = self.task.token_loss(forward_model, batch)[0]
                    self.model.zero_moe(False)
                f_zero = zero_loss.sum(-1) / tokens
            objective = (self.model.score_loss(sequence_loss, f_zero) if hf else
                         self.estimator.with_score(sequence_loss, log_prob, f_zero)).mean()
        return objective + aux, {"train_loss": sequence_loss.mean().item(), "aux_loss": aux.detach().item()}

    def routing_stats(self) -> dict:
        """Over the MoE layers: mean argmax fraction, router entropy, max load, each expert's share of the tokens;
        a Hugging Face model's also per patched block i: `layer{i}_max_load`, `layer{i}_router_entropy`,
        `layer{i}_argmax_fraction`."""
        hf = isinstance(self.model, HFCausalLM)
        layers = self.model.routing_stats() if hf else [m.aux.stats for m in self.model.moe_layers()]
        if not layers:
            return {}
        loads = [max(s["tokens_per_expert"]) * len(s["tokens_per_expert"]) / max(1, sum(s["tokens_per_expert"]))
                 for s in layers]
        shares = [sum(s["tokens_per_expert"][i] / max(1, sum(s["tokens_per_expert"])) for s in layers) / len(layers)
                  for i in range(self.config.model.experts)]
        per_layer = {f"layer{i}_{key}": value for i, (s, load) in enumerate(zip(layers, loads)) if hf
                     for key, value in (("max_load", load), ("router_entropy", s["router_entropy"]),
                                        ("argmax_fraction", s["argmax_fraction"]))}
        return {"argmax_fraction": sum(s["argmax_fraction"] for s in layers) / len(layers),
                "router_entropy": sum(s["router_entropy"] for s in layers) / len(layers),
                "max_load": sum(loads) / len(loads),  # tokens of the busiest expert over the mean, 1 = balanced
                **{f"load_{i}": share for i, share in enumerate(shares)},  # expert i's share of the tokens
                **per_layer}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss on a fixed set of batches (the same every time: its own generator)."""
        self.model.eval()
        generator = torch.Generator().manual_seed(10_000 + self.config.seed)
        total = 0.0
        for _ in range(self.config.eval_batches):
            with self.autocast():
                token_loss, counted = self.task.token_loss(self.model, self.task.batch("val", generator))
            total += float(token_loss.sum() / counted.sum().clamp_min(1))
        self.model.train()
        return total / self.config.eval_batches

    def train_step(self) -> dict:
        """One optimiser step. A non-finite loss or gradient norm stops the run (Diverged) before the update, so
        the parameters stay those of the last good step."""
        start = time.perf_counter()
        self.model.train()
        batch = self.task.batch("train", self.data_generator)
        batch = tuple(t[self.rank::self.world] for t in batch)  # this rank's share of the global batch
        with self.divergence(self.step + 1):
            loss, row = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                    self.config.grad_clip or math.inf))
        # checked after backward: DDP averages the gradients, so every rank sees a non-finite norm and stops
        for name in ("train_loss", "grad_norm"):
            if not math.isfinite(row[name]):
                raise self.diverged(self.step + 1, f"{name.replace('_', ' ')} {row[name]}")
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.seconds += time.perf_counter() - start
        tokens = batch[-1].numel() * self.world
        row = self.mean_over_ranks({**row, **self.routing_stats()})
        return {"step": self.step, **row, "lr": self.scheduler.get_last_lr()[0], "seconds": self.seconds,
                "tokens_per_s": tokens / (time.perf_counter() - start)}

    def flops_per_update(self) -> int:
        """FLOPs of one training step's forward and backward passes (matrix products, as torch.utils.flop_counter
        counts them), on a training batch, over all ranks. It changes nothing the run depends on: the batch comes
        from its own generator, the RNG is restored and the parameters' gradients are left alone."""
        from torch.utils.flop_counter import FlopCounterMode
        batch = self.task.batch("train", torch.Generator().manual_seed(self.config.seed))
        batch = tuple(t[self.rank::self.world] for t in batch)
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            loss = self.loss(batch, forward_model=self.model)[0]
            torch.autograd.grad(loss, parameters, allow_unused=True)
        return int(counter.get_total_flops()) * self.world

    def mean_over_ranks(self, values: dict) -> dict:
        """Each logged number averaged over the ranks (each saw its share of the batch)."""
        if self.world == 1:
            return values
        total = torch.tensor(list(values.values()), dtype=torch.float64, device=self.config.device)
        dist.all_reduce(total)
        return dict(zip(values, (total / self.world).tolist()))

    @contextlib.contextmanager
    def divergence(self, step: int):
        """On the CPU the router refuses NaN or inf logits before the loss can show them: parameters blown up by
        the last update reach it first. Report it as the divergence it is."""
        try:
            yield
        except NonFiniteLogits:
            raise self.diverged(step, "router logits NaN or inf") from None

    def diverged(self, step: int, what: str) -> Diverged:
        kept = (f"the last good checkpoint (step {self.saved_step}) was kept in {self.out}/"
                if self.saved_step is not None else
                f"no checkpoint had been written (the first is due at step {self.config.checkpoint_interval})")
        dtype = " or --dtype float32" if self.config.dtype != "float32" else ""
        return Diverged(f"training diverged at step {step} ({what}); {kept}; try a lower --lr, e.g. --lr "
                        f"{self.config.lr / 2:g} (half of {self.config.lr:g}){dtype}")

    def finite_parameters(self) -> bool:
        return bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())

    def stop_signal(self, received: list) -> int:
        """The signal asking the run to stop (0: none). Under torchrun any rank's: all stop after the same step."""
        signum = received[0] if received else 0
        if self.world > 1:
            flag = torch.tensor([signum], device=self.config.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    # ------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "data_generator": self.data_generator.get_state(),
                "rng": self.gather(torch.get_rng_state()), "step": self.step, "rows": self.rows, "seconds": self.seconds,
                "config": self.config.settings()}

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_generator.set_state(state["data_generator"])
        if isinstance(state["rng"], torch.Tensor):  # a single-process checkpoint from before data parallel
            state["rng"] = [state["rng"]]
        if len(state["rng"]) != self.world:
            raise GradestError(f"the checkpoint was written by {len(state['rng'])} processes; resume it with "
                               f"as many (this run has {self.world})")
        torch.set_rng_state(state["rng"][self.rank])
        self.step, self.rows, self.seconds = state["step"], state["rows"], state["seconds"]
        self.saved_step = self.step

    def gather(self, value) -> list:
        """`value` from every rank, in rank order (a list of one in a single process)."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def save(self):
        """The checkpoint and metrics.csv of this step. Never a checkpoint with non-finite parameters: the run
        stops (Diverged) and the last one written stays."""
        if not self.finite_parameters():  # the same on every rank (DDP keeps the parameters equal)
            raise self.diverged(self.step, "parameters NaN or inf")
        state = self.state_dict()  # every rank takes part: it gathers their RNG states
        self.saved_step = self.step
        if self.rank != 0:
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.out / "checkpoint.pt", buffer.getvalue())
        atomic_write_text(self.out / "metrics.csv", pd.DataFrame(self.rows).to_csv(index=False))

    @classmethod
    def resume(cls, out: Path, steps: int | None = None, device: str | None = None,
               state: dict | None = None) -> "Trainer":
        """The trainer of the checkpoint in `out` (`state`, if loaded already), ready to continue: on `device` if
        given, to `steps` if given. Other steps than the run's keep its learning-rate schedule (`schedule_steps`,
        see TrainConfig); they must be more than the steps done (nothing would run, and the run would end without
        its final evaluation)."""
        state = load_checkpoint(out) if state is None else state
        settings, done = dict(state["config"]), state["step"]  # flat settings
        if steps is not None and steps != settings["steps"]:
            if steps <= done:
                valid = f"--steps >= {done}" if done == settings["steps"] else f"--steps > {done}"
                raise GradestError(f"--steps {steps} would end the run in {out}/ at or before the {done} steps it "
                                   f"has done; valid: {valid}")
            settings["schedule_steps"] = settings.get("schedule_steps") or settings["steps"]
            settings["steps"] = steps
        if device is not None:
            settings["device"] = device
        trainer = cls(TrainConfig(**settings), Path(out))
        trainer.load_state_dict(state)
        trainer.resumed_from = done
        return trainer

    def write_config(self, command: list[str] | None):
        """config.json: the run's settings (as they are now: a resume may change its steps, schedule_steps and
        device) and how it was started (command, git state, time). A resume keeps that record and appends itself
        to `resumes` (command, time, the step it resumed at), so the file never says the run was started by a
        command that did not start it."""
        path = self.out / "config.json"
        metadata = run_metadata({**self.config.settings(), "processes": self.world}, self.config.seed, command)
        if self.resumed_from is not None:
            resume = {key: metadata[key] for key in ("command", "timestamp", "git")} | {"step": self.resumed_from}
            try:
                previous = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # missing or unreadable: how the run started is unknown
                previous = {**metadata, "command": None, "timestamp": None}
            metadata = {**previous, "config": metadata["config"], "resumes": [*previous.get("resumes", []), resume]}
        write_json(path, metadata)

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self, progress=None, command: list[str] | None = None, until: int | None = None, on_eval=None,
            handle_signals: bool = False) -> pd.DataFrame:
        """Train to config.steps (or stop after step `until`, as an interrupted run would, checkpoint saved).
        `on_eval(row)` is called (on rank 0) with the row of every evaluated step.

        `handle_signals` (`gradest run`): SIGINT or SIGTERM stop the run after the step under way, its checkpoint
        and metrics written, by raising Interrupted. The caller's choice, because a process pool's worker (the study
        runner's) is ended by SIGTERM and must then die, not go on to its next queued task."""
        if self.rank == 0:
            remove_stale_temporaries(self.out)
            self.write_config(command)
        steps = range(self.step, min(self.config.steps, until or self.config.steps))
        bar = progress(steps) if progress and self.rank == 0 else steps
        with stop_signals(handle_signals) as received:
            for _ in bar:
                row = self.train_step()
                last = self.step == self.config.steps
                if self.step % self.config.eval_interval == 0 or last:
                    with self.divergence(self.step):
                        row["val_loss"] = self.evaluate()
                    row["val_ppl"] = math.exp(row["val_loss"]) if row["val_loss"] < 700 else math.inf
                if last:
                    row.update(self.task.final_metrics(self.model))
                self.rows.append(row)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if on_eval and self.rank == 0 and "val_loss" in row:
                    on_eval(row)
                if self.step % self.config.checkpoint_interval == 0 or last or self.step == until:
                    self.save()
                signum = self.stop_signal(received) if handle_signals else 0
                if signum and not last:
                    if self.saved_step != self.step:
                        self.save()
                    raise Interrupted(self.step, signum)
        return pd.DataFrame(self.rows)

    def evaluation_line(self, row: dict, elapsed: float) -> str:
        """The line printed at every evaluation (`gradest run`, and each cell of `gradest study run`), on stdout
        whatever stderr is: a captured log (no terminal, so no progress bar) shows how a long run goes. Tokens/s:
        the median over the steps since the last evaluation."""
        recent = pd.Series([r["tokens_per_s"] for r in self.rows[-self.config.eval_interval:]])
        return (f"step {row['step']}/{self.config.steps}: train loss {row['train_loss']:.4f}, val loss "
                f"{row['val_loss']:.4f}, {recent.median():.0f} tokens/s, {elapsed:.0f} s elapsed")

    def close(self):
        """Leave the process group (torchrun); nothing to do in a single process."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()  # no rank leaves while rank 0 still writes: a peer gone mid-teardown can abort gloo
            dist.destroy_process_group()
