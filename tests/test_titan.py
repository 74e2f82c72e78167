"""gradest.titan: gradest estimators routing torchtitan MoE models (a shrunk `debugmodel_moe` Qwen3-MoE), on the CPU.

Precision: torchtitan's GroupedExperts computes in bfloat16 whatever the model's dtype (it casts its inputs and
weights), so a float64 model still has bf16 experts. Where two computations feed the experts the same inputs, the
bf16 products are the same and everything else is float64; a gate that differed by one float64 rounding could flip a
bf16 rounding downstream (a 2^-8 relative jump), which at these sizes has probability ~1e-12. So float64 checks use
a float64 tolerance: 2^-40 relative (float64's 2^-52 times 2^12 for the accumulation through two layers), far below
any bf16 effect (2^-8), so a routing difference could not hide in it.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchtitan")

from gradest import titan  # noqa: E402
from gradest.estimators import GATED, REGISTRY, get_estimator, trainable  # noqa: E402
from gradest.moe import MoE as GradestMoE  # noqa: E402
from gradest.titan.converter import GradestRouting, ScoreFunctionLoss, gradest_routing  # noqa: E402
from gradest.titan.models import build_model, forward, qwen3_moe_config  # noqa: E402
from helpers import one_line_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
warnings.filterwarnings("ignore", message="In CPU autocast")  # torchtitan's router asks for float32 autocast

REL = 2.0 ** -40  # float64 tolerance (module docstring)
VOCAB, BATCH, SEQ = 80, 2, 12
ROOT = pathlib.Path(__file__).resolve().parents[1]


def model(top_k=2, dtype=torch.float64, seed=0, **sizes):
    return build_model(qwen3_moe_config(top_k=top_k, vocab=VOCAB, **sizes), dtype=dtype, seed=seed)


def tokens(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)


def step(m, ids):
    """Logits, loss and every parameter's gradient of one forward and backward (next-token cross-entropy)."""
    m.zero_grad()
    logits = forward(m, ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def close(a, b, rel=REL):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
    return (a - b).abs().max().item() <= rel * scale




# ------------------------------------------------------------------------------------------------ equivalence
def test_topk_equals_native_in_float64():
    """`topk` (renormalize = route_norm, the default patch picks) reproduces torchtitan's softmax router: logits,
    loss and every parameter's gradient (float64 tolerance, module docstring)."""
    native, patched = model(), model()
    ids = tokens()
    with titan.patch(patched, "topk") as handle:
        assert handle.estimator.renormalize is True and handle.estimator.k == 2
        assert handle.modules == ["layers.0.moe", "layers.1.moe"]
        a, b = step(native, ids), step(patched, ids)
    assert close(a[0], b[0]) and close(a[1], b[1])
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        assert close(a[2][name], b[2][name]), name
    after = step(patched, ids)  # undone: the native routing again
    assert torch.equal(after[0], a[0])


def swiglu64(x, w1, w2, w3):
    """torchtitan's expert function (SwiGLU) in float64, for both sides of the SparseMixer check."""
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def test_sparsemixer_gives_the_router_gradient_of_gradests_moe_layer():
    """`sparsemixer` on a torchtitan block (top-1), through torchtitan's dispatch and combine, gives the same output
    and router gradient as gradest's own MoE layer (gradest/moe.py) on the same router weights, inputs and draws
    (the noise hook on one side, the same seed of torch.rand on the other). The expert function is the same on both
    sides: torchtitan's SwiGLU on its weights, in float64 (torchtitan's own casts to bf16; the routing is what is
    compared). torchtitan's combine multiplies the gates in float32 (it casts the expert outputs to float32 first,
    token_dispatcher.py), so the output and every gradient through it carry float32 rounding: tolerance 2^-20
    relative (float32's 2^-24 times 2^4 for the few roundings in a row); a routing or gradient difference of the
    estimator's (SparseMixer's mid-point factor 2, a missing 1/2) is of order 1."""
    block = model(top_k=1).layers["0"].moe
    experts = block.routed_experts.inner_experts
    n, D = block.router.num_experts, block.router.gate.weight.shape[1]
    w1, w2, w3 = (w.detach() for w in (experts.w1_EFD, experts.w2_EDF, experts.w3_EFD))

    def grouped(x, counts):  # the titan experts in float64, per expert group of the dispatched rows
        out, start = [], 0
        for i, c in enumerate(counts.tolist()):
            out.append(swiglu64(x[start:start + c], w1[i], w2[i], w3[i]))
            start += c
        return torch.cat(out)

    experts.forward = grouped
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, SEQ, D, dtype=torch.float64, generator=g)
    c = torch.randn(BATCH, SEQ, D, dtype=torch.float64, generator=g)
    T = BATCH * SEQ
    estimator = get_estimator("sparsemixer")
    torch.manual_seed(11)
    noise = torch.rand(T, estimator.noise_dim(n), dtype=torch.float64)

    layer = GradestMoE(D, w1.shape[1], n, estimator, omega=False, balance_coef=0.0).double()
    with torch.no_grad():
        layer.router.weight.copy_(block.router.gate.weight)
    layer.expert_ffn = lambda rows, w_in, b_in, w_out, b_out: swiglu64(
        rows, *(w[(w_in.data_ptr() - layer.w_in.data_ptr()) // (w_in.numel() * w_in.element_size())]
                for w in (w1, w2, w3)))
    torch.manual_seed(11)  # the layer draws its uniforms with torch.rand: the same numbers as `noise`
    y_gradest = layer(x)
    (y_gradest * c).sum().backward()

    with titan.patch(block, estimator) as handle:
        handle.noise = lambda name, z: noise
        y_titan = block(x)
        (y_titan * c).sum().backward()
    assert close(y_titan, y_gradest, 2.0 ** -20)
    assert close(block.router.gate.weight.grad, layer.router.weight.grad, 2.0 ** -20)
    assert block.router.gate.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- every estimator
@pytest.mark.parametrize("top_k", [1, 2])
def test_every_estimator_trains_the_model_and_undo_restores_it(top_k):
    """Every estimator that can route k experts runs forward and backward on the model (sparse ones through
    torchtitan's dispatch, dense ones through every expert), gives the routers a finite gradient, and undo leaves
    the native model bit for bit."""
    m = model(top_k=top_k, dtype=torch.float32)
    ids = tokens()
    native = step(m, ids)
    for name in trainable(GATED, top_k):
        with titan.patch(m, name):
            logits, loss, grads = step(m, ids)
        assert torch.isfinite(loss), name
        router = grads["layers.0.moe.router.gate.weight"]
        assert torch.isfinite(router).all(), name
        assert not any("gradest" in key for key in m.state_dict()), name
        assert "forward" not in m.layers["0"].moe.router.__dict__, name
    assert torch.equal(step(m, ids)[0], native[0])


def test_dense_estimators_run_every_expert_on_every_token():
    """A dense estimator's output is sum_i gate_i e_i(x) over ALL experts (torchtitan's grouped experts on n copies
    of the tokens): `densemixer`, whose forward value is the top-k rule's, gives `topk`'s output (which goes
    through torchtitan's dispatch), while its router gradient differs (every expert's output reaches it). The
    experts' bf16 products are the same rows either way; the mix is float32 in torchtitan's combine, float64 here:
    tolerance 2^-20 relative (float32 rounding)."""
    block = model(top_k=2).layers["0"].moe
    x = torch.randn(BATCH, SEQ, block.router.gate.weight.shape[1], dtype=torch.float64)
    grads = []
    for name in ("topk", "densemixer"):
        with titan.patch(block, name):
            y = block(x)
            y.sum().backward()
            grads.append(block.router.gate.weight.grad.clone())
            block.zero_grad()
            if name == "topk":
                sparse = y
    assert close(y, sparse, 2.0 ** -20)
    assert not close(grads[0], grads[1], 2.0 ** -4)
    with titan.patch(block, "densemixer"):  # inference: the arg-max experts through torchtitan's dispatch
        block.eval()
        assert close(block(x), sparse, 2.0 ** -20)
        block.train()


def test_stateful_state_is_buffers_initialised_by_torchtitan_and_saved():
    """default-moe's state is a buffer of each block: built on meta by the converter, zero after torchtitan's
    init_weights, in the state_dict, updated by a training forward, removed by undo."""
    cfg = GradestRouting.Config(estimator="default-moe").build().convert(qwen3_moe_config(top_k=2, vocab=VOCAB))
    m = build_model(cfg, dtype=torch.float32)
    block = m.layers["0"].moe
    assert torch.equal(block.gradest_state_default, torch.zeros_like(block.gradest_state_default))
    assert "layers.1.moe.gradest_state_default" in m.state_dict()
    step(m, tokens())
    assert block.gradest_state_default.abs().sum() > 0
    block.gradest_patched.undo()
    assert "layers.0.moe.gradest_state_default" not in m.state_dict()


# ---------------------------------------------------------------------------- balancing bias, sigmoid, EP
def test_expert_bias_steers_selection_and_the_counts():
    """A large expert_bias_E on expert 3 makes `topk` (k=1), `sparsemixer` and `reinforce` select it for every
    token, and torchtitan's count `tokens_per_expert_E` (which drives the bias update) sees it. For the estimators
    with a selection rule (topk, sparsemixer) the gate stays softmax(z)_3 of the UNBIASED logits (sparsemixer: times
    its coin-flip scale, 1/2 or 1, without its sparsity mask, which relative to z + b would keep expert 3 alone and
    make the gate 1 * scale; topk without renormalising, which at k = 1 would make every gate 1); reinforce,
    which has none, routes z + b, so its gate is about 1."""
    for name in ("topk:renormalize=false", "sparsemixer:mask=none", "reinforce"):
        block = model(top_k=1, dtype=torch.float32).layers["0"].moe
        block.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
        block.tokens_per_expert_E.zero_()
        x = torch.randn(BATCH, SEQ, block.router.gate.weight.shape[1])
        with titan.patch(block, name) as handle:
            block(x)
            assert torch.equal(handle.blocks[0].routed[1], torch.full((BATCH * SEQ, 1), 3))
            gates, _, _ = block.router(x, block.expert_bias_E)
        assert block.tokens_per_expert_E.tolist() == [0, 0, 0, BATCH * SEQ]  # the router call alone counts none
        p3 = block.router.gate(x).float().softmax(-1)[..., 3:]
        if name == "reinforce":
            torch.testing.assert_close(gates, torch.ones_like(gates), rtol=0, atol=1e-6)
        elif name.startswith("topk"):
            torch.testing.assert_close(gates, p3)
        else:
            scale = gates / p3
            assert bool(((scale - 1).abs() < 1e-5).logical_or((scale - 0.5).abs() < 1e-5).all())


def test_sigmoid_routers_are_refused_or_converted():
    block = model(top_k=2, dtype=torch.float32).layers["0"].moe
    block.router.score_func = "sigmoid"
    one_line_error(lambda: titan.patch(block, "topk"), "sigmoid", "softmax")
    one_line_error(lambda: titan.patch(block, "topk", sigmoid="maybe"), "sigmoid", "refuse")
    with titan.patch(block, "topk", sigmoid="softmax") as handle:
        x = torch.randn(BATCH, SEQ, block.router.gate.weight.shape[1])
        gates, experts, _ = block.router(x, None)
        z = block.router.gate(x)
        top = z.softmax(-1).topk(2, -1)
        assert torch.equal(experts, top.indices)  # the softmax rule on the same logits
        assert torch.allclose(gates, top.values / top.values.sum(-1, keepdim=True))
        assert handle.blocks[0].architecture == "torchtitan-sigmoid"


class _Mesh:
    def size(self):
        return 2


def test_dense_estimators_are_refused_under_expert_parallelism():
    """A dense estimator needs every expert on every token: refused when the block's dispatcher has an EP mesh
    (at patch, at torchtitan's parallelize, and at forward); sparse ones go through."""
    block = model(top_k=1, dtype=torch.float32).layers["0"].moe
    valid = ", ".join(n for n in trainable(GATED, 1) if not REGISTRY[n].dense)
    block.routed_experts.token_dispatcher.ep_mesh = _Mesh()
    one_line_error(lambda: titan.patch(block, "st"), "st", "dense", "expert parallelism", valid)
    block.routed_experts.token_dispatcher.ep_mesh = None
    with titan.patch(block, "reinmax"):
        class Dims:
            ep_enabled = True
        one_line_error(lambda: block.parallelize(Dims()), "reinmax", "expert parallelism")


def test_bad_inputs_are_one_line_errors():
    m = model(top_k=2, dtype=torch.float32)
    valid_k2 = ", ".join(trainable(GATED, 2))
    one_line_error(lambda: titan.patch(m, "exact"), "exact", "enumerates", valid_k2)
    one_line_error(lambda: titan.patch(m, "switch"), "switch", "top_k=2", valid_k2)
    one_line_error(lambda: titan.patch(m, "topk", k=1), "k=1", "top_k=2")
    one_line_error(lambda: titan.patch(m, "nope"), "unknown estimator")
    one_line_error(lambda: titan.patch(m, "topk", bogus=1), "bogus")
    one_line_error(lambda: titan.patch(torch.nn.Linear(2, 2), "topk"), "no torchtitan MoE block", "Linear")
    one_line_error(lambda: titan.patch("model", "topk"), "nn.Module")
    with titan.patch(m, "topk"):
        one_line_error(lambda: titan.patch(m, "topk"), "already patched")
    del m.layers["1"].moe.router.route_norm  # another torchtitan's layout
    one_line_error(lambda: titan.patch(m, "topk"), "layers.1.moe", "layout", "router.route_norm")
    one_line_error(lambda: GradestRouting.Config(estimator=3).build(), "estimator spec")
    one_line_error(lambda: gradest_routing(qwen3_moe_config().layers[0].moe, sigmoid="x"), "sigmoid")


def test_a_missing_or_other_torchtitan_is_one_line(monkeypatch):
    from gradest.titan import models
    import torchtitan
    monkeypatch.setattr(torchtitan, "__version__", "0.9.0")
    one_line_error(lambda: titan.patch(model(dtype=torch.float32), "topk"), "0.9.0", "torchtitan>=0.3,<0.4")
    monkeypatch.setitem(sys.modules, "torchtitan", None)
    one_line_error(models.torchtitan_moe, "gradest[titan]")


# ------------------------------------------------------------------------------------------- score function
def test_the_score_loss_carries_reinforces_term_and_torchtitans_value():
    """ScoreFunctionLoss (what `--override.imports gradest.titan.converter.gradest_score_loss` puts in torchtitan's
    trainer): its value is torchtitan's loss (token sum / global valid tokens); with `reinforce` its gradient is
    the cross-entropy's plus sum_b f_b grad log P_b over the blocks this process patched; with `topk` it is the
    cross-entropy's alone. The loss computes the cross-entropy in float32, as torchtitan's does (`pred.float()`):
    tolerance 2^-20 relative (float32 rounding, against the float64 reference computed here)."""
    m = model(top_k=2, dtype=torch.float64)
    ids = tokens()
    loss_fn = ScoreFunctionLoss(ScoreFunctionLoss.Config())
    n_tokens = torch.tensor(ids[:, 1:].numel())
    with titan.patch(m, "reinforce") as handle:
        noise = {}
        handle.noise = lambda name, z: noise.setdefault(name, torch.rand(z.shape[0], 2, dtype=z.dtype))
        m.zero_grad()
        logits = forward(m, ids[:, :-1])
        loss, _ = loss_fn(logits, ids[:, 1:], n_tokens)
        loss.backward()
        got = m.layers["0"].moe.router.gate.weight.grad.clone()
        m.zero_grad()
        logits = forward(m, ids[:, :-1])  # the same draws again
        per_sequence = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(-1) / n_tokens
        log_p = titan.routing_log_prob(m, BATCH)
        expected = per_sequence + per_sequence.detach() * (log_p - log_p.detach())
        assert close(loss, F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / n_tokens,
                     2.0 ** -20)
        expected.sum().backward()
        assert close(got, m.layers["0"].moe.router.gate.weight.grad, 2.0 ** -20)
        m.zero_grad()
        logits = forward(m, ids[:, :-1])
        F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum().div(n_tokens).backward()
        assert not close(got, m.layers["0"].moe.router.gate.weight.grad, 2.0 ** -4)  # the score term is there
    with titan.patch(m, "topk"):
        m.zero_grad()
        logits = forward(m, ids[:, :-1])
        loss_fn(logits, ids[:, 1:], n_tokens)[0].backward()
        got = m.layers["0"].moe.router.gate.weight.grad.clone()
        m.zero_grad()
        logits = forward(m, ids[:, :-1])
        (F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / n_tokens).backward()
        assert close(got, m.layers["0"].moe.router.gate.weight.grad, 2.0 ** -20)


# ------------------------------------------------------------------------------------------ core without it
def test_only_gradest_titan_imports_torchtitan():
    """torchtitan is an optional extra: no module outside gradest/titan/ imports it, and the core package, the CLI
    and gradest.hf load without importing it."""
    root = ROOT / "gradest"
    offenders = []
    for path in root.rglob("*.py"):
        if path.relative_to(root).parts[0] == "titan":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] == "torchtitan"]
    assert offenders == []
    code = ("import sys, gradest, gradest.cli, gradest.train, gradest.engines, gradest.probe, gradest.hf; "
            "assert 'torchtitan' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -------------------------------------------------------------------------------------- torchtitan's trainer
def torchrun(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.slow
def test_torchtitans_trainer_trains_with_sparsemixer(tmp_path):
    """The README's command: torchtitan's own trainer (its entry point through the CPU launcher, its config manager,
    gloo, optimizer, checkpoints) trains the tiny Qwen3-MoE on tiny-shakespeare with SparseMixer routing, selected
    by torchtitan's --override.imports. The loss falls from ln 65 = 4.17 (uniform over the characters) by more than
    1 nat in 30 steps (it reaches about 2.85), and a checkpoint is written at step 20 and at the end."""
    result = torchrun("--nproc-per-node", "1", "-m", "gradest.titan.train", "--module", "gradest.titan",
                      "--config", "gradest_qwen3_moe_tiny", "--override.imports",
                      'gradest.titan.converter.gradest_routing={"estimator": "sparsemixer"}',
                      "--training.steps", "30", "--dump_folder", str(tmp_path))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "GradestConfig with estimator='sparsemixer'" in log
    losses = [float(v) for v in re.findall(r"loss:\s+\S*?([\d.]+)", re.sub(r"\x1b\[[\d;]*m", "", log))]
    assert len(losses) == 30, losses
    assert losses[0] > 4.0 and losses[-1] < losses[0] - 1.0, losses
    assert {p.name for p in (tmp_path / "checkpoint").iterdir()} >= {"step-20", "step-30"}


FSDP_SCRIPT = r'''
import os, sys, warnings, torch, torch.distributed as dist, torch.nn.functional as F
warnings.filterwarnings("ignore")
from torch.distributed.fsdp import fully_shard
from gradest import titan
from gradest.titan.models import build_model, forward, qwen3_moe_config
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
torch.set_num_threads(1)
m = build_model(qwen3_moe_config(top_k=1, vocab=80), dtype=torch.float32, seed=0)
patched = titan.patch(m, "sparsemixer")
# each token's uniforms from its own logits: the same draws however the batch is split
patched.noise = lambda name, z: (z[:, :2].detach() * 1e4).frac().abs()
if world > 1:
    for layer in m.layers.values():
        fully_shard(layer)
    fully_shard(m)
g = torch.Generator().manual_seed(5)
ids = torch.randint(0, 80, (4, 17), generator=g)
rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
logits = forward(m, ids[rows, :-1])
loss = F.cross_entropy(logits.flatten(0, 1), ids[rows, 1:].flatten())
loss.backward()
grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
         for n, p in m.named_parameters()}
opt.step()
params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in m.named_parameters()}
if rank == 0:
    torch.save({"params": params, "grads": grads}, sys.argv[1])
if world > 1:
    dist.destroy_process_group()
'''


@pytest.mark.slow
def test_fsdp_on_two_processes_equals_one_process(tmp_path):
    """A gradest-patched torchtitan model (sparsemixer, draws fixed per token by the noise hook) wrapped with FSDP2
    (`fully_shard` per block and at the root) on two gloo processes, each with half of a global batch of 4
    sequences, takes the same SGD step as one process on the whole batch. Tolerance: torchtitan's grouped experts
    produce their weight gradients in bfloat16 over each process's rows (rounded at 2^-8 relative before FSDP
    averages them in float32), so each parameter agrees to lr * 2^-7 * max|grad| of its tensor; a wrong scaling of
    the loss or a lost gradient (a factor 2) is far outside it."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    one = torchrun("--nproc-per-node", "1", str(script), str(tmp_path / "one.pt"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("--nproc-per-node", "2", str(script), str(tmp_path / "two.pt"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        tolerance = 0.1 * 2.0 ** -7 * a["grads"][name].abs().max().item() + 1e-7
        assert (a["params"][name] - b["params"][name]).abs().max().item() <= tolerance, name
    router = "layers.0.moe.router.gate.weight"
    assert a["grads"][router].abs().max() > 0


# --------------------------------------------------------------------- the launcher's check, before the trainer
def tiny_trainer_config(estimator=None, ep=1, **routing):
    """The trainer config `--config gradest_qwen3_moe_tiny` parses to, with gradest's routing override and the EP
    degree set (what torchtitan's config manager would make of the command line)."""
    from gradest.titan.config_registry import gradest_qwen3_moe_tiny
    from gradest.titan.train import ROUTING_OVERRIDE
    config = gradest_qwen3_moe_tiny()
    if estimator is not None:
        config.override.imports = [(ROUTING_OVERRIDE, {"estimator": estimator, **routing})]
    config.parallelism.expert_parallel_degree = ep
    return config


def test_the_launcher_checks_gradests_settings_against_the_model_and_ep():
    """`check_settings` refuses, in one line, what would otherwise fail inside torchtitan's trainer (the converter
    or parallelize raising under torchrun): it reads the model flavour's routers (top_k 1, 4 experts, softmax) and
    the EP degree from the parsed config."""
    from gradest.titan.models import torchtitan_moe
    from gradest.titan.train import check_settings
    valid_k1 = ", ".join(trainable(GATED, 1))
    assert check_settings(tiny_trainer_config()) == []  # gradest not selected: nothing to check
    assert check_settings(tiny_trainer_config("sparsemixer", ep=2)) == ["sparsemixer"]
    one_line_error(lambda: check_settings(tiny_trainer_config("exact")), "exact", "enumerates", valid_k1)
    one_line_error(lambda: check_settings(tiny_trainer_config("nope")), "unknown estimator 'nope'")
    one_line_error(lambda: check_settings(tiny_trainer_config("topk:k=2")), "k=2", "top_k=1")
    one_line_error(lambda: check_settings(tiny_trainer_config("topk", extra=1)), "'extra'", "estimator, sigmoid")
    one_line_error(lambda: check_settings(tiny_trainer_config("densemixer", ep=2)), "densemixer", "dense",
                   "expert parallelism", "sparsemixer")
    assert check_settings(tiny_trainer_config("densemixer", ep=1)) == ["densemixer"]
    config = tiny_trainer_config("topk")
    for _, router, _, _ in config.model_spec.model.traverse(torchtitan_moe().TokenChoiceTopKRouter.Config):
        router.score_func = "sigmoid"
    one_line_error(lambda: check_settings(config), "sigmoid", "softmax")
    config.override.imports[0][1]["sigmoid"] = "softmax"
    assert check_settings(config) == ["topk"]
    # a converter in the config function (model_registry(..., converters=[...])): its blocks are checked too
    config = tiny_trainer_config()
    config.model_spec.model = GradestRouting.Config(estimator="exact").build().convert(config.model_spec.model)
    one_line_error(lambda: check_settings(config), "exact", "enumerates")


def launcher(*args, code=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    argv = ["-c", code] if code else ["-m", "gradest.titan.train"]
    return subprocess.run([sys.executable, *argv, "--module", "gradest.titan", "--config", "gradest_qwen3_moe_tiny",
                           *args], capture_output=True, text=True, env=env, timeout=300)


def test_the_launcher_refuses_a_bad_estimator_in_one_line_before_the_trainer(tmp_path):
    """`python -m gradest.titan.train` with `exact`: one line on stderr, exit 2, nothing started (no dump folder)."""
    result = launcher("--override.imports", 'gradest.titan.converter.gradest_routing={"estimator": "exact"}',
                      "--dump_folder", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'exact'" in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_launcher_refusals_under_torchrun_and_without_torchtitan(tmp_path):
    """Under torchrun (2 ranks, EP degree 2) a dense estimator is refused by the pre-check in each worker: exit 2,
    the one line printed once (rank 0), no traceback from gradest or torchtitan's trainer (torchrun's own summary of
    the failed workers follows it). Without torchtitan the launcher says which extra to install, in one line."""
    result = torchrun("--nproc-per-node", "2", "-m", "gradest.titan.train", "--module", "gradest.titan", "--config",
                      "gradest_qwen3_moe_tiny", "--override.imports",
                      'gradest.titan.converter.gradest_routing={"estimator": "reinmax"}',
                      "--parallelism.expert_parallel_degree", "2", "--training.disable_cuda_graphs",
                      "--dump_folder", str(tmp_path / "run"), timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "'reinmax' is dense" in errors[0], log[-3000:]
    assert "gradest/titan" not in log and "trainer.py" not in log, log[-3000:]
    assert "exitcode: 2" in log or "exitcode : 2" in log, log[-3000:]
    assert not (tmp_path / "run").exists()
    missing = launcher(code="import sys; sys.modules['torchtitan'] = None; sys.argv[0] = 'train'; "
                            "from gradest.titan.train import main; main()")
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "gradest[titan]" in lines[0], missing.stderr[-2000:]
