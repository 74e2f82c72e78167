"""`gradest doctor`: does a Hugging Face MoE model's NATIVE router gradient point where the expected loss goes down?

For each MoE layer l of a causal LM, on a few batches of text (the bundled tiny-shakespeare, or the user's):

- native: the gradient of the batch loss L w.r.t. layer l's router weights, as the model's own backward computes it
  (every layer on its native routing, eval mode, dropout off; `loss.backward()`, so hooks the user registered on the
  weights or the logits act as they would in training);
- exact: the gradient of J_l = E_D[L(D)], D layer l's routing drawn from the model's own softmax with its own k
  (gradest's objective `Objective(k)`: sequential top-k, gates from the same softmax, docs/estimators.md §2), the
  other layers native; by enumeration when few assignments, else the Rao-Blackwellised Monte-Carlo reference with
  its standard error (gradest.hf.probe, the same maths as `gradest compare --problem hf`).

Why this comparison: a deterministic top-k router is trained by the gradient of its gates alone. The exact gradient
also carries the effect of WHICH experts are chosen. When the two disagree the router is trained on something else
than the loss: in the extreme, a top-1 router with a renormalised gate (gate = p_i / p_i = 1) gets no task
gradient at all (its router-gradient norm is rounding, ~1e-10 in float32, not exactly 0), and only auxiliary
losses move it.

Per layer: the cosine of native and exact gradients, the relative bias ||native - exact|| / ||exact|| (its
reference noise removed for a Monte-Carlo reference), the fraction of router weights whose native gradient is zero
up to rounding, the load per expert (the share of the native top-k choices), the mean router entropy (of the
softmax, over log n). The verdicts use the thresholds below (see `verdict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from gradest.errors import GradestError
from gradest.estimators import Objective
from gradest.hf.models import moe_blocks
from gradest.hf.probe import HFSite, text_tokens
from gradest.model import token_cross_entropy
from gradest.probe import probing, reference_gradient

# A native router-weight gradient entry is "zero up to rounding" when its magnitude is below ZERO_TOL times the
# RMS entry of the exact gradient: rounding leaves ~1e-7 (float32 epsilon) relative, and a working router's
# gradient entries are of the order of the exact RMS, so 1e-4 separates the two by three orders of magnitude.
ZERO_TOL = 1e-4
# A layer whose native gradient is zero up to rounding on at least this fraction of its router weights receives
# no task gradient (a few entries may survive through a token whose top-1 gate is not 1 due to ties or rounding).
NO_GRADIENT_FRACTION = 0.95
# Below this cosine the native gradient is a poor guide for the router (in a random direction, the cosine of two
# vectors in n*d dimensions is ~1/sqrt(n*d): 0.09 for a 4x32 router, so 0.3 is far from chance but far from
# alignment). The native top-2 routers of tiny random Mixtrals (seeds 0-2, both layers, 4 x 16 tokens) score
# 0.40 to 0.74: at k > 1 the renormalised gates still carry a useful, if biased, signal.
WEAK_COSINE = 0.3
# Below -WEAK_COSINE the native gradient points against the descent of the expected loss: a sign error (a hook, a
# custom backward) rather than an estimator's bias; PhiMoE's native SparseMixer in eval mode scores about -0.1.
# A reference whose standard error is this large a fraction of its norm cannot support a verdict on the cosine.
NOISY_REFERENCE = 0.5


@dataclass
class DoctorResult:
    """The per-layer table (`layers`), a verdict per layer and one for the model."""

    layers: pd.DataFrame
    verdicts: list[str]
    model_verdict: str


def native_router_gradients(model: nn.Module, batch) -> list[Tensor]:
    """Each MoE block's router-weight gradient (n * d,) in float64 from the model's own backward of the batch
    loss (mean over sequences of the mean token cross-entropy), model in eval mode. Existing .grad are kept."""
    idx, targets = batch
    blocks = moe_blocks(model)
    weights = [arch.family.router_weight(arch.router_of(block)) for _, block, arch in blocks]
    saved = {p: p.grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.grad = None
        with probing(model), torch.enable_grad():
            device = next(model.parameters()).device
            logits = model(input_ids=idx.to(device), use_cache=False).logits
            loss = token_cross_entropy(logits, targets.to(device), -100).mean(-1).mean()
            loss.backward()
        return [torch.zeros(w.numel(), dtype=torch.float64) if w.grad is None else w.grad.detach().double().flatten()
                for w in weights]
    finally:
        for p, grad in saved.items():
            p.grad = grad


def renormalised(arch, router) -> bool:
    """Whether the native rule renormalises its top-k gates (a top-1 renormalised gate is identically 1)."""
    family = arch.family
    return bool(family.native_renormalize(router)) if hasattr(family, "native_renormalize") else False


def verdict(row: dict) -> str:
    """The verdict of one layer from its metrics (the thresholds above)."""
    if row["zero_fraction"] >= NO_GRADIENT_FRACTION:
        cause = " (top-1 with a renormalised gate)" if row["k"] == 1 and row["renormalised"] else ""
        return f"the router receives no task gradient{cause}"
    if row["reference_se"] > NOISY_REFERENCE:
        return (f"inconclusive: the Monte-Carlo reference's standard error is {row['reference_se']:.2f} of its norm; "
                "use more --draws or --batches")
    if row["cos"] < -WEAK_COSINE:  # clearly opposed, not merely a weak biased signal
        return (f"native gradient cos {row['cos']:.2f} with the exact one: it points against the expected loss's "
                "descent; check hooks or a custom backward on the router")
    if row["cos"] < WEAK_COSINE:
        return f"native gradient cos {row['cos']:.2f} with the exact one; consider sparsemixer-v2 or densemixer"
    return "healthy"


def diagnose(model: nn.Module, batch, *, draws: int = 16, seed: int = 0, max_enumeration: int = 4096,
             progress=None) -> DoctorResult:
    """Every MoE layer's native router gradient against the exact one on `batch` (idx, targets)."""
    if model.config.is_encoder_decoder:
        raise GradestError("gradest doctor checks causal LMs; this model is an encoder-decoder (SwitchTransformers): "
                           "measure its router gradients with gradest compare --problem hf")
    natives = native_router_gradients(model, batch)
    rows, verdicts = [], []
    layers = range(len(natives))
    for index in (progress(layers) if progress else layers):
        site = HFSite(model, batch, index)
        k = site.native_k
        ref = reference_gradient(site, Objective(k), "auto", draws, seed, max_enumeration)
        values = ref.values(site, "router")
        native = natives[index]
        mean = values if ref.draws is None else values.mean(0)
        S = 1 if ref.draws is None else values.shape[0]
        noise = 0.0 if ref.draws is None else float((values - mean).pow(2).sum()) / (S * (S - 1))
        ref_sq = max(float(mean.pow(2).sum()) - noise, 0.0)
        ref_norm = math.sqrt(ref_sq)
        bias_sq = max(float((native - mean).pow(2).sum()) - noise, 0.0)
        scale = ref_norm / math.sqrt(native.numel())  # RMS entry of the exact gradient
        cos = float(native @ mean) / max(float(native.norm() * mean.norm()), 1e-300)
        with torch.no_grad():
            p = torch.softmax(site.z0.double(), -1)
            chosen = site.z0.topk(k, -1).indices.flatten()
            load = torch.bincount(chosen, minlength=site.n).double() / chosen.numel()
            entropy = float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean()) / math.log(site.n)
        row = {"layer": index, "module": site.name, "experts": site.n, "k": k,
               "renormalised": renormalised(site.arch, site.router), "cos": cos,
               "rel_bias": math.sqrt(bias_sq) / max(ref_norm, 1e-300),
               "zero_fraction": float((native.abs() <= ZERO_TOL * scale).double().mean()),
               "native_norm": float(native.norm()), "exact_norm": ref_norm,
               "load": "/".join(f"{x:.2f}" for x in load.tolist()), "max_load": float(load.max()),
               "entropy": entropy, "reference": ref.kind, "reference_se": ref.relative_se(site, "router"),
               "reference_draws": 0 if ref.draws is None else S, "sequences": site.B, "seq_len": site.T}
        row["verdict"] = verdict(row)
        rows.append(row)
        verdicts.append(f"layer {index}: {row['verdict']}")
    flagged = [r for r in rows if r["verdict"] != "healthy"]
    if not flagged:
        model_verdict = "model: healthy"
    else:
        model_verdict = (f"model: {len(flagged)} of {len(rows)} MoE layers flagged (layers "
                         f"{', '.join(str(r['layer']) for r in flagged)})")
    return DoctorResult(pd.DataFrame(rows), verdicts, model_verdict)


def doctor_batch(vocab_size: int, batches: int, batch_size: int, seq_len: int, text: str | None = None,
                 data_seed: int = 0):
    """`batches` x `batch_size` windows of `seq_len` tokens, as one batch (sequences never interact, so the loss
    over a few batches is the loss of their union: one reference instead of several)."""
    from gradest.datasets import lm_batch
    for name, value in (("batches", batches), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GradestError(f"{name} must be an integer >= 1, got {value!r}")
    tokens = text_tokens(vocab_size, text)
    if len(tokens) <= seq_len:
        raise GradestError(f"the text has {len(tokens)} tokens; seq_len={seq_len} needs more than {seq_len}")
    return lm_batch(tokens, batches * batch_size, seq_len, torch.Generator().manual_seed(data_seed))


# ------------------------------------------------------------------------------------------------------ report
def cosine_figure(layers: pd.DataFrame, title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(4.0, 0.6 * len(layers) + 2), 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = ["tab:green" if v == "healthy" else "tab:red" for v in layers["verdict"]]
    ax.bar(layers["layer"].astype(str), layers["cos"], color=colours)
    ax.axhline(WEAK_COSINE, color="grey", ls="--", lw=1, label=f"weak below {WEAK_COSINE:g}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="MoE layer", ylabel="cos(native, exact)", ylim=(-1.05, 1.05), title=title)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def write_doctor_report(result: DoctorResult, out: Path, config: dict, command: list[str] | None = None) -> list:
    """doctor.md (verdicts and the table), layers.csv, cosine.png and config.json in `out`."""
    from tabulate import tabulate

    from gradest.io import atomic_write_text, run_metadata, write_json
    from gradest.figures import atomic_savefig
    out = Path(out)
    shown = result.layers[["layer", "module", "k", "cos", "rel_bias", "zero_fraction", "load", "entropy",
                           "reference", "reference_se", "verdict"]]
    markdown = (f"# gradest doctor: {config.get('model', '')}\n\n" + "\n".join(f"- {v}" for v in result.verdicts)
                + f"\n- **{result.model_verdict}**\n\n"
                + tabulate(shown, headers="keys", tablefmt="pipe", showindex=False, floatfmt=".3g") + "\n\n"
                + f"Thresholds: zero up to rounding |g| <= {ZERO_TOL:g} x RMS(exact); no task gradient when at least "
                  f"{NO_GRADIENT_FRACTION:g} of the router weights are; weak when cos < {WEAK_COSINE:g}.\n")
    return [atomic_write_text(out / "doctor.md", markdown),
            atomic_write_text(out / "layers.csv", result.layers.to_csv(index=False)),
            atomic_savefig(cosine_figure(result.layers, str(config.get("model", ""))), out / "cosine.png", dpi=120),
            write_json(out / "config.json", run_metadata(config, config.get("seed"), command))]
