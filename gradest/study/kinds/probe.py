"""The `probe` study kind: the router-gradient probe (`probe.switch_probe`) on one MoE layer of a Switch Transformer,
one cell per task, estimator, experts, top-k and seed. With a `train` table the probed model is that training run's,
at `stage` "init" or "trained": the run is a `train` cell of its own, run first (or found in the cache).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gradest.errors import GradestError
from gradest.io import atomic_write_text
from gradest.model import SwitchConfig
from gradest.probe import PROBE_WRT, REFERENCES, SCORES, TASK_PROBLEM, TINY, probe_estimators, switch_probe
from gradest.study.kind import CellKind, Sections, register_cell_kind
from gradest.study.kinds import train as train_kind
from gradest.study.kinds.compare import estimator_report
from gradest.study.runner import execute
from gradest.study.spec import Cell, Study, check_choice, check_range, check_types, make_cell, merge, resolve_cell
from gradest.config import TrainConfig
from gradest.train import Trainer

STAGES = ("init", "trained")  # a probe's model: its training run's at initialisation, or trained
MODEL_OPTIONAL_TYPES = {"capacity_factor": float, "omega": bool}  # SwitchConfig's settings whose default is unset
PROBE_KEYS = ["problem", "experts", "tokens", "top_k", "stage", "layer", "batch_size", "seq_len", "wrt", "samples",
              "reference", "estimator", "target"]
def defaults() -> dict:
    return {"task": "lm", "estimator": "all", "experts": 4, "top_k": 1, "samples": 256, "seed": 0, "wrt": "router",
            "layer": 0, "draws": 64, "reference": "auto", "batch_size": 2, "seq_len": 8, "score": "sequence",
            "data_seed": 0, "hparams": {}, "model": {}, "train": {}, "stage": "init"}


def resolve(config: dict, given=()) -> dict:
    """The probe's options (as `probe.probe` and `probe.switch_probe` check them when it runs), the estimators, the
    model's settings and MoE layers, the stage and the `train` table (that training run resolved as a cell of its
    own)."""
    for key, valid, what in (("task", TASK_PROBLEM, "task"), ("stage", STAGES, "probe stage"),
                             ("wrt", PROBE_WRT, "gradient target for the probe"),
                             ("reference", REFERENCES, "reference"), ("score", SCORES, "score")):
        check_choice(config, key, valid, what)
    check_range(config, "experts", 2, why=" (routing needs a choice)")
    check_range(config, "top_k", 1, config["experts"])
    for key, low in (("samples", 3), ("draws", 3), ("batch_size", 1), ("seq_len", 1), ("layer", 0)):
        check_range(config, key, low)
    probe_estimators(config["estimator"] if config["estimator"] == "all" else [config["estimator"]],
                     config["top_k"], config["hparams"], config["batch_size"])
    if config["stage"] == "trained" and not config["train"]:
        raise GradestError("probe stage 'trained' needs a train table (the run whose model is probed)")
    if config["train"]:
        valid = {key: value for key, value in train_kind.defaults().items() if key != "name"}
        try:
            check_types(config["train"], valid, train_kind.optional_types())
            resolve_cell("train", probe_train_config(config))
        except GradestError as error:
            raise GradestError(f"a probe's train table: {error}") from None
    model = _probe_model(config)
    layers = sum(model.is_moe(i) for i in range(model.n_layer)) + \
        sum(model.is_moe(i) for i in range(model.n_encoder_layer))
    if not layers:
        raise GradestError("the probed model has no MoE layer (moe_every=0 is the dense baseline)")
    check_range(config, "layer", 0, layers - 1, why=" (an index into the model's MoE layers)")
    check_range(config, "seq_len", 1, model.block_size, why=" (the model's block_size)")
    if model.capacity_factor is not None:
        raise GradestError("the probe needs a model with capacity_factor unset (a capacity limit would couple the "
                           "copies of the batch the probe runs in one pass)")
    return config


def _model_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(SwitchConfig)}


def _probe_model(config: dict):
    """The SwitchConfig (checked) of a probe cell's model: the tiny one `probe.switch_probe` builds (`TINY`), or
    that of the training run of its `train` table."""
    train = probe_train_config(config)
    if train is None:
        check_types(config["model"], _model_defaults(), MODEL_OPTIONAL_TYPES, prefix="model.")
        return SwitchConfig(**{**TINY[config["task"]], "experts": config["experts"], "block_size": config["seq_len"],
                               **config["model"]})
    return TrainConfig(**train_kind.train_fields(train)).model


def probe_train_config(config: dict) -> dict | None:
    """The training run a probe cell's model comes from: its `train` table over the train defaults and the probe's
    task, experts, top-k, seed and model (so it is the same cell as that run in a train study). None (an empty
    table): the tiny model of `probe.TINY`, updated by `model`."""
    if not config["train"]:
        return None
    base = {**train_kind.defaults(), "task": config["task"], "experts": config["experts"], "top_k": config["top_k"],
            "seed": config["seed"], "model": config["model"]}
    return merge(base, config["train"])


def check_memory(config: dict) -> None:
    from gradest.memory import check_probe, check_training, config_probe_peak, switch_parameters
    model = _probe_model(config)
    if config["train"]:
        check_training(TrainConfig(**train_kind.train_fields(probe_train_config(config))))
    check_probe(config_probe_peak(model, switch_parameters(model), config["batch_size"], config["seq_len"],
                                  config["samples"]), f"the probe on {config['batch_size']} sequences of "
                f"{config['seq_len']} tokens (K={config['samples']})")


def run(config: dict, directory: Path) -> dict:
    """The probe of `probe.switch_probe`, on the tiny model or, with a `train` table, on that run's model at
    initialisation (stage "init") or after training (stage "trained": the train cell is run first unless cached)."""
    estimators = "all" if config["estimator"] == "all" else [config["estimator"]]
    train, trainer, model = probe_train_config(config), None, config["model"] or None
    if train is not None:
        model = None  # the run's model settings are in its TrainConfig
        cell = make_cell("train", train, directory.parent.parent)
        if config["stage"] == "trained":
            status, message = execute(cell)
            if status == "failed":
                raise GradestError(f"the training run of this probe (cell {cell.hash}) failed: {message}")
            if not (cell.directory / "run" / "checkpoint.pt").is_file():
                raise GradestError(f"the trained model's checkpoint is missing from {cell.directory}/run; delete "
                                   f"that cell's directory to train it again")
            trainer = Trainer.resume(cell.directory / "run")
        else:
            with torch.random.fork_rng(devices=[]):  # a Trainer seeds the global RNG
                trainer = Trainer(TrainConfig(**train_kind.train_fields(train)), cell.directory / "run")
    df = switch_probe(config["task"], estimators=estimators, samples=config["samples"], seed=config["seed"],
                      trainer=trainer, layer=config["layer"], batch_size=config["batch_size"],
                      seq_len=config["seq_len"], experts=config["experts"], top_k=config["top_k"], config=model,
                      reference=config["reference"], draws=config["draws"], wrt=config["wrt"],
                      settings=config["hparams"], score=config["score"], data_seed=config["data_seed"])
    df.insert(df.columns.get_loc("layer") + 1, "stage", config["stage"] if train is not None else "init")
    atomic_write_text(directory / "results.csv", df.to_csv(index=False))
    return {"rows": len(df), "rel_bias": df["rel_bias"].tolist(), "mse": df["mse"].tolist()}


def report(study: Study, done: list[Cell] | None, out: Path, profile: str | None = None) -> Sections:
    """The report of a probe study (and of an hf-probe study): the compare kind's, its rows configured by
    PROBE_KEYS."""
    return estimator_report(done, out, PROBE_KEYS)


register_cell_kind(CellKind("probe", defaults=defaults, resolve=resolve, run=run, report=report,
                            check_memory=check_memory))
