"""The `hf-probe` study kind: `gradest compare --problem hf`, the router-gradient probe on one MoE layer of a Hugging
Face model built at random initialisation (a tiny model of a supported architecture, or a full-size one by name).
Its report is the probe kind's, with the cost of each cell (the full-size models' time and memory) beside it.

transformers is imported only when such a cell is resolved or run (it is an optional extra).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from gradest.devices import check_device_type
from gradest.io import atomic_write_text
from gradest.probe import PROBE_WRT, REFERENCES, SCORES, probe_estimators
from gradest.study.kind import CellKind, register_cell_kind
from gradest.study.kinds.probe import report
from gradest.study.spec import check_choice, check_range

def defaults() -> dict:
    """An hf-probe cell: `gradest compare --problem hf` on one MoE layer of a Hugging Face model, built at random
    initialisation from `hf` (a tiny model of that architecture, or a full-size one named in gradest.hf.NAMED) with
    `hf_settings` over its config; estimator: `all` or a comma-separated list of estimator specs; top_k unset: the
    model's own k; device unset: the CPU (a cell leaves it out,
    so that its hash is the one it had before cells had a device)."""
    return {"hf": "mixtral", "hf_settings": {}, "estimator": "all", "top_k": None, "samples": 256, "seed": 0,
            "wrt": "router", "layer": 0, "draws": 64, "reference": "auto", "batch_size": 2, "seq_len": 8,
            "score": "sequence", "data_seed": 0, "hparams": {}, "device": None}


def resolve(config: dict, given=()) -> dict:
    """The model (its config built, its MoE blocks counted on the meta device: nothing is allocated), the layer,
    the estimators and the probe's options."""
    from gradest import hf
    valid = [*hf.SUPPORTED, *hf.NAMED]
    check_choice(config, "hf", valid, "Hugging Face model")
    for key, choices, what in (("wrt", PROBE_WRT, "gradient target for the probe"),
                               ("reference", REFERENCES, "reference"), ("score", SCORES, "score")):
        check_choice(config, key, choices, what)
    for key, low in (("samples", 3), ("draws", 3), ("batch_size", 1), ("seq_len", 1), ("layer", 0)):
        check_range(config, key, low)
    with torch.device("meta"):
        model = hf.model_from_config(hf.built_config(config["hf"], config["top_k"], config["hf_settings"]))
    blocks = hf.moe_blocks(model)
    check_range(config, "layer", 0, len(blocks) - 1, why=" (an index into the model's MoE blocks)")
    _, block, arch = blocks[0]
    router = arch.router_of(block)
    n, k = arch.family.experts(router), config["top_k"] or arch.family.native_k(router)
    if config["top_k"] is not None:
        check_range(config, "top_k", 1, n)
    probe_estimators(config["estimator"], k, config["hparams"], config["batch_size"])  # "all", or a comma list
    if config["device"] is None:
        del config["device"]
    else:
        check_device_type(config["device"])
    return config


def check_memory(config: dict) -> None:
    from gradest import hf
    from gradest.memory import check_probe, config_probe_peak, hf_parameters
    cfg = hf.built_config(config["hf"], config["top_k"], config["hf_settings"])
    parameters = hf_parameters(cfg, getattr(cfg, hf.SUPPORTED[cfg.model_type].experts_key))
    check_probe(config_probe_peak(cfg, parameters, config["batch_size"], config["seq_len"], config["samples"]),
                f"the probe of {config['hf']} on {config['batch_size']} sequences of {config['seq_len']} tokens "
                f"(K={config['samples']})", config.get("device") or "cpu")


def run(config: dict, directory: Path) -> dict:
    """`gradest compare --problem hf` on the cell's model (`gradest.hf.models.load_model`: built by name at random
    initialisation, seeded by `seed`); its rows' problem is `hf-<hf>`. The cell's time and its process's peak memory
    (resident set) are columns and in the summary: the full-size models' cost is part of what such a study reports."""
    from gradest.hf.models import NAMED, load_model
    from gradest.hf.probe import hf_probe, model_batch
    start = time.perf_counter()
    k = None if config["hf"] in NAMED else config["top_k"]  # a full-size model routes its own k
    model = load_model(config["hf"], k=k, seed=config["seed"], settings=config["hf_settings"])
    model = model.to(config.get("device", "cpu"))
    built = time.perf_counter() - start
    df = hf_probe(model, model_batch(model, config["batch_size"], config["seq_len"], config["data_seed"]),
                  config["layer"], config["estimator"], config["samples"], wrt=config["wrt"],
                  reference=config["reference"], draws=config["draws"], seed=config["seed"], top_k=config["top_k"],
                  settings=config["hparams"], score=config["score"])
    parameters = sum(p.numel() for p in model.parameters())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kilobytes on Linux; host memory
    seconds = time.perf_counter() - start
    df["problem"] = f"hf-{config['hf']}"
    df["parameters"], df["cell_seconds"], df["build_seconds"], df["peak_rss_gb"] = parameters, seconds, built, peak_gb
    atomic_write_text(directory / "results.csv", df.to_csv(index=False))
    return {"rows": len(df), "parameters": parameters, "seconds": seconds, "peak_rss_gb": peak_gb,
            "rel_bias": df["rel_bias"].tolist(), "reference_se": df["reference_se"].tolist()}


register_cell_kind(CellKind("hf-probe", defaults=defaults, resolve=resolve, run=run, report=report,
                            optional_types=lambda: {"top_k": int, "device": str}, check_memory=check_memory))
