"""How much memory a run, a measurement or a probe will need at its peak, checked against what the machine has
before anything starts or is written: a size that cannot fit is one line with both numbers and what to shrink,
not a kernel's OOM kill after minutes of silence.

The estimates count what dominates: parameters (with gradients and Adam's two moments when training), the
activations autograd keeps for the backward pass at the batch and sequence length (attention scores included), the
measurement engine's K x tokens x experts tensors (its noise, its per-sample gradients, its chunked passes, and the
expert tuples the exact gradient enumerates), and the Rao-Blackwell reference's chunks. They are meant as upper
bounds within a small factor (tests/test_memory.py checks them against the peak resident memory of small
configurations), not to the byte: a refusal only happens when the estimate exceeds the memory available.
"""

from __future__ import annotations

import math
import os

from gradest.errors import GradestError

FLOAT32, FLOAT64, INT64 = 4, 8, 8
SAVED = 10  # activation tensors of one layer's width autograd keeps per token (norms, attention, FFN, residuals)
CHUNK_ELEMENTS = 2 ** 24  # gradest.measure.gradient_samples's default chunk (elements per activation tensor)
PROBE_CHUNK = 2 ** 22  # gradest.probe's max_elements
BASE = 256 * 2 ** 20  # what a process adds beside the model: its data, torch's thread pools and kernels' buffers, slack


def available_bytes(device: str = "cpu") -> int | None:
    """The memory free for a new allocation on `device`: a CUDA device's free memory, else the machine's
    available memory (Linux: /proc/meminfo MemAvailable, else os.sysconf's available pages); None: unknown."""
    if str(device).startswith("cuda"):
        try:
            import torch
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - no CUDA, or a device check elsewhere names it
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def size_text(size: float) -> str:
    """Bytes for people: 512 MB, 3.1 GB, 4.2e+09 GB."""
    for unit, scale in (("GB", 2 ** 30), ("MB", 2 ** 20)):
        if size >= scale:
            value = size / scale
            return f"{value:.3g} {unit}" if value < 1e6 else f"{value:.2g} {unit}"
    return f"{max(size, 0) / 2 ** 10:.3g} KB"


def check_memory(peak: float, what: str, shrink: str, device: str = "cpu") -> str:
    """Refuse `what` in one line when its estimated `peak` bytes exceed the memory available on `device`; else
    both, for people ("about 1.2 GB of the 20.9 GB available")."""
    available = available_bytes(device)
    if available is not None and peak > available:
        raise GradestError(f"{what} would need about {size_text(peak)} of memory at its peak, more than the "
                           f"{size_text(available)} available on this machine ({device}); {shrink}")
    return f"about {size_text(peak)}" + ("" if available is None else f" of the {size_text(available)} available")


# ------------------------------------------------------------------------------------------------------ training
def switch_parameters(model) -> int:
    """Parameters of a Switch Transformer of SwitchConfig `model` (gradest.model), counted from its sizes."""
    d, f, n, v = model.d_model, model.d_ff, model.experts, model.vocab_size
    attention = 4 * d * d + 4 * d
    dense = 2 * d * f + f + d
    moe = n * 2 * d * f + n * (f + d) + d * n + n
    layers = model.n_layer + getattr(model, "n_encoder_layer", 0)
    moe_layers = 0 if not model.moe_every else math.ceil(layers / model.moe_every)
    cross = model.n_layer * (attention + 2 * d) if getattr(model, "n_encoder_layer", 0) else 0
    return (v * d + model.block_size * d + layers * (attention + 4 * d) + cross + (layers - moe_layers) * dense
            + moe_layers * moe + 2 * d + d * v)


def training_peak(parameters: int, batch: int, length: int, layers: int, width: int, hidden: int, heads: int,
                  vocab: int, k: int = 1) -> int:
    """Bytes of a training step: float32 parameters with their gradients and AdamW's two moments, and the
    activations of `batch` x `length` tokens kept for the backward pass in `layers` layers (`SAVED` tensors of
    the model's `width`, the FFN's `hidden` times the experts per token), one layer's attention scores and the
    logits over `vocab`."""
    tokens = batch * length
    per_layer = tokens * (SAVED * width + 3 * hidden * max(k, 1))
    logits = 3 * tokens * vocab
    return 4 * parameters * FLOAT32 + (layers * per_layer + attention(batch, heads, length) + logits) * FLOAT32 \
        + 4 * tokens * INT64 + BASE


def attention(batch: int, heads: int, length: int) -> int:
    """Elements of one layer's attention scores and their softmax (batch x heads x length x length each): torch's
    fused attention keeps none for the backward pass on a causal LM, but the unfused path (a padding mask) builds
    them, one layer at a time."""
    return 2 * batch * heads * length * length


def switch_training_peak(config) -> int:
    """`training_peak` of a Switch Transformer TrainConfig."""
    m = config.model
    layers = m.n_layer + getattr(m, "n_encoder_layer", 0)
    return training_peak(switch_parameters(m), config.batch_size, m.block_size, layers, m.d_model, m.d_ff, m.n_head,
                         m.vocab_size, config.top_k)


def hf_parameters(cfg, n: int) -> int:
    """Parameters of a transformers MoE model of `n` experts from its config's sizes (every layer counted as an MoE
    layer, with its shared expert if it has one: an upper bound)."""
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 0)
    inter = getattr(cfg, "moe_intermediate_size", None) or getattr(cfg, "intermediate_size", None) \
        or getattr(cfg, "d_ff", 0)
    dense = getattr(cfg, "intermediate_size", None) or getattr(cfg, "shared_expert_intermediate_size", None) or inter
    layers = (getattr(cfg, "num_hidden_layers", None) or
              (getattr(cfg, "num_layers", 0) or 0) + (getattr(cfg, "num_decoder_layers", 0) or 0))
    per_layer = 4 * h * h + n * 3 * h * inter + h * n + 3 * h * dense + 4 * h
    return layers * per_layer + 2 * (getattr(cfg, "vocab_size", 0) or 0) * h


def hf_training_peak(config) -> int:
    """`training_peak` of a Hugging Face TrainConfig (its transformers config in hf_transformers_config)."""
    cfg = config.hf_transformers_config
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 0)
    inter = getattr(cfg, "moe_intermediate_size", None) or getattr(cfg, "intermediate_size", 0)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", 1)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", 1)
    return training_peak(hf_parameters(cfg, config.model.experts), config.batch_size,
                         config.model.block_size, layers, h, inter, heads, cfg.vocab_size, config.top_k)


def check_training(config) -> str:
    """Refuse a Switch or Hugging Face run (TrainConfig) that cannot fit in the memory of its device; else say
    what it will need."""
    peak = hf_training_peak(config) if config.is_hf else switch_training_peak(config)
    return check_memory(peak, f"this run ({config.batch_size} sequences of {config.model.block_size} tokens a step)",
                 "shrink --batch-size, --model block_size or the model (--model n_layer=, d_model=, d_ff=, "
                 "experts; --hf-set for a Hugging Face model)", config.device)


# ---------------------------------------------------------------------------------------- measurement engine
def problem_parameters(config, wrt: str) -> int:
    """The entries of the gradient `wrt` of a synthetic problem (ProblemConfig): the router's, or every
    parameter's (router and experts, an upper bound for poly's logits)."""
    router = max(config.experts * config.dim, config.tokens * config.experts)
    if wrt != "all":
        return router
    return router + config.experts * config.dim * max(config.out_dim, config.classes)


def enumerated_tuples(n: int, k: int) -> int:
    """Ordered k-tuples of n experts, the branches the exact gradient enumerates (n! / (n - k)!)."""
    return math.perm(n, k) if 0 <= k <= n else 0


def compare_peak(config, estimator, samples: int, wrt: str) -> int:
    """Bytes of measuring `estimator` on the synthetic problem `config` (ProblemConfig) with K = `samples`
    (gradest.measure): its float64 noise (K x T x noise_dim) and per-sample gradients (K x P, with the statistics'
    copies), the chunked passes (about CHUNK_ELEMENTS per activation, or one sample's if larger), and the
    reference: the exact gradient's T x n!/(n-k)! expert tuples."""
    n, t = config.experts, config.tokens
    width = max(n, config.dim, config.out_dim, config.classes)
    noise = estimator.noise_dim(n)
    parameters = problem_parameters(config, wrt)
    chunk = min(samples, max(1, CHUNK_ELEMENTS // (t * n * width)))  # samples a pass takes (measure's split)
    measured = samples * (t * noise + 4 * parameters) + SAVED * chunk * t * (n * width + noise)
    tuples = enumerated_tuples(n, config.top_k)
    reference = SAVED * t * tuples * (config.top_k * (n + 1) + width) + 4 * parameters  # stage softmaxes, gates
    data = t * (config.dim + n * width) + n * config.dim * (1 + width)
    return (max(measured, reference) + data) * FLOAT64 + BASE


def check_compare(configs, estimators_of, samples: int, wrt: str) -> None:
    """Refuse `gradest compare` (or a compare cell) whose largest measurement cannot fit: `estimators_of(config)`
    gives each configuration's estimators."""
    for config in configs:
        for estimator in estimators_of(config):
            peak = compare_peak(config, estimator, samples, wrt)
            check_memory(peak, f"measuring {estimator.label} on {config.problem} (n={config.experts}, "
                               f"k={config.top_k}, T={config.tokens}, K={samples})",
                         "use fewer --samples, --tokens or --experts, a smaller --top-k (the exact gradient "
                         "enumerates n!/(n-k)! expert tuples per token), or fewer draws")


# ---------------------------------------------------------------------------------------------------- probes
def probe_peak(parameters: int, batch: int, length: int, layers: int, width: int, hidden: int, heads: int,
               vocab: int, samples: int, layer_parameters: int, noise: int) -> int:
    """Bytes of the router-gradient probe (gradest.probe, gradest.hf.probe, `gradest doctor`): the model in
    float32, a forward of the batch with its activations kept (and one layer's attention scores) in float64 at worst,
    the K per-sample gradients of the layer's router and their noise, and the chunked passes of the reference
    (PROBE_CHUNK elements per activation)."""
    tokens = batch * length
    forward = layers * tokens * (SAVED * width + 3 * hidden) + attention(batch, heads, length) + 3 * tokens * vocab
    return (2 * parameters * FLOAT32 + (forward + samples * (4 * layer_parameters + tokens * noise)
                                        + SAVED * PROBE_CHUNK) * FLOAT64 + BASE)


def check_probe(peak: int, what: str, device: str = "cpu") -> None:
    check_memory(peak, what, "shrink --seq-len, --batch-size (or --batches) or --samples", device)


def model_probe_peak(model, sequences: int, length: int, samples: int, noise: int = 8) -> int:
    """`probe_peak` of a built model (a gradest Switch Transformer or a transformers MoE model) on `sequences`
    windows of `length` tokens, K = `samples`."""
    return config_probe_peak(model.config, sum(p.numel() for p in model.parameters()), sequences, length, samples,
                             noise)


def config_probe_peak(config, parameters: int, sequences: int, length: int, samples: int, noise: int = 8) -> int:
    """`probe_peak` of a model of `config` (a SwitchConfig or a transformers config) with `parameters`."""
    def get(*names):
        return next((getattr(config, name) for name in names if getattr(config, name, None)), 1)

    width = get("d_model", "hidden_size")
    experts = get("experts", "num_local_experts", "num_experts", "n_routed_experts")
    layers = get("num_hidden_layers", "n_layer", "num_layers") + (
        get("num_decoder_layers", "n_encoder_layer") if getattr(config, "is_encoder_decoder", False)
        or getattr(config, "n_encoder_layer", 0) else 0)
    return probe_peak(parameters, sequences, length, layers, width,
                      get("moe_intermediate_size", "intermediate_size", "d_ff"),
                      get("num_attention_heads", "n_head", "num_heads"), get("vocab_size"), samples,
                      width * experts, noise)
