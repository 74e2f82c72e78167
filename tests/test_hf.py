"""gradest.hf: gradest estimators routing transformers MoE models, checked against the models' own routing.

Cross-implementation checks (float64, eager experts): a model patched with the estimator that implements its native
routing rule gives the same logits, loss and parameter gradients as the unpatched model:
  Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS with `topk` (renormalize = the model's flag);
  PhiMoE with `sparsemixer-v2` (jitter_eps = router_jitter_noise), in eval and in training with the same draws;
  SwitchTransformers with `switch` at jitter 0, expert capacity included.
Tiny random models built from configs: nothing is downloaded.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.models.phimoe import modeling_phimoe  # noqa: E402

from gradest import GradestError  # noqa: E402
from gradest import hf  # noqa: E402
from helpers import Drawn, one_line_error  # noqa: E402
from gradest.estimators import GATED, get_estimator, trainable  # noqa: E402

transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")


BATCH, SEQ = 2, 8


def config(arch: str, k: int = 2, **overrides):
    return hf.tiny_config(arch, k=k, **overrides)


def tiny(arch: str, k: int = 2, dtype=torch.float32, **overrides) -> nn.Module:
    torch.manual_seed(0)
    model = hf.model_from_config(config(arch, k, **overrides)).to(dtype)
    if dtype == torch.float64:
        model.set_experts_implementation("eager")  # grouped_mm refuses float64
        for module in model.modules():  # Switch routes in `router_dtype`, which the config limits to 32 bits
            if type(module).__name__ == "SwitchTransformersTop1Router":
                module.dtype = torch.float64
    return model


def batch(arch: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids, "output_router_logits": True}


def step(model: nn.Module, inputs: dict, train: bool):
    """Logits, loss (with the model's router losses) and every parameter's gradient of one forward + backward."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same(native, patched, tol: float = 1e-10, rtol: float = 0.0):
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = native, patched
    torch.testing.assert_close(logits_b, logits_a, atol=tol, rtol=rtol)
    torch.testing.assert_close(loss_b, loss_a, atol=tol, rtol=rtol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=tol, rtol=rtol, msg=name)


def router_weight(block: hf.PatchedBlock) -> torch.Tensor:
    return block.router_weight()


@contextlib.contextmanager
def float64_routing():
    """transformers' routers round to float32 even in a float64 model (`logits.float()`, `softmax(...,
    dtype=torch.float)`), where gradest routes in float64. Inside, those casts keep float64, for the native and
    the patched run alike, so the two routings are compared at float64 precision."""
    float_, softmax = torch.Tensor.float, torch.nn.functional.softmax
    own_float = torch.Tensor.__dict__.get("float")  # None: inherited from the C tensor base

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else float_(self, *args, **kwargs)

    def softmax64(input, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and input.dtype == torch.float64:
            dtype = torch.float64
        return softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    torch.Tensor.float, torch.nn.functional.softmax = keep_float64, softmax64
    try:
        yield
    finally:
        if own_float is None:
            del torch.Tensor.float
        else:
            torch.Tensor.float = own_float
        torch.nn.functional.softmax = softmax


# --------------------------------------------------------------------------------- native top-k: topk estimator
NATIVE_TOPK = [("mixtral", {}, True), ("qwen2_moe", {}, False), ("qwen3_moe", {}, True),
               ("olmoe", {}, False), ("olmoe", {"norm_topk_prob": True}, True), ("gpt_oss", {}, True)]


@pytest.mark.parametrize("arch,overrides,renormalize", NATIVE_TOPK,
                         ids=[f"{a}-renorm{r}" for a, _, r in NATIVE_TOPK])
def test_topk_equals_native(arch, overrides, renormalize):
    model = tiny(arch, dtype=torch.float64, **overrides)
    inputs = batch(arch)
    with float64_routing():
        native = step(model, inputs, train=True)
        native_eval = step(model, inputs, train=False)
        with hf.patch(model, "topk", renormalize=renormalize) as patched:
            assert patched.estimator.renormalize == renormalize
            assert all(b.k == 2 and b.n == 4 and b.architecture == arch for b in patched.blocks)
            assert_same(native, step(model, inputs, train=True))
            assert_same(native_eval, step(model, inputs, train=False))
    # the default `patch` picks is the model's own flag
    with hf.patch(model, "topk") as patched:
        assert patched.estimator.renormalize == renormalize


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_topk_matches_native_in_float32(arch):
    """Without lifting anything: the same routing up to float32 rounding of the router softmax (torch's kernel
    and gradest's softmax differ in the last bit)."""
    model = tiny(arch)
    inputs = batch(arch)
    native = step(model, inputs, train=True)
    with hf.patch(model, "topk"):
        assert_same(native, step(model, inputs, train=True), tol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ PhiMoE: SparseMixer-v2
class NativeDraws:
    """Stands in for `torch` inside transformers' phimoe module, so that its `sparsemixer` sees the uniforms the
    patched run was given (`uniforms`, one (T, 2k) tensor per routed block, in call order: gradest's noise layout,
    the k selection uniforms then the k coin uniforms).

    The native code draws, per stage j: exponentials E (T, n) for Gumbel-max, argmax(masked z - log E), then one
    uniform r per token for the Heun coin, r > 0.75. gradest picks stage j's expert by inverse CDF of the same
    masked softmax at uniform u_j and keeps scale 1 when its coin uniform c_j < 0.25. Here E is 1 except a tiny
    value on the inverse-CDF expert of u_j (so Gumbel-max picks that expert), and r = 1 - c_j. With
    `exact_thirds`, the native Heun scale constant 0.3333 (torch.add(0.3333, mask, alpha=0.6667), in float32)
    becomes 1/3 in float64, gradest's."""

    def __init__(self, uniforms: list[torch.Tensor], k: int, exact_thirds: bool):
        self.uniforms, self.k, self.exact_thirds = list(uniforms), k, exact_thirds
        self.stage = {"select": 0, "coin": 0}
        self.current = None

    def __getattr__(self, name):
        return getattr(torch, name)

    def column(self, kind: str) -> torch.Tensor:
        j = self.stage[kind]
        if j == 0 and kind == "select":
            self.current = self.uniforms.pop(0)
        self.stage[kind] = (j + 1) % 2
        if j >= self.k:  # k = 1: the native code still routes a second expert; the reference drops it
            return torch.full_like(self.current[:, 0], 0.5)
        return self.current[:, j if kind == "select" else self.k + j]

    def empty_like(self, masked_gates, **kwargs):
        u = self.column("select")
        p = torch.softmax(masked_gates, -1)
        cdf = p.cumsum(-1)
        cdf = (cdf / cdf[:, -1:]).contiguous()
        chosen = torch.searchsorted(cdf, u[:, None].contiguous(), right=True).clamp_max(p.shape[-1] - 1)
        exponentials = torch.ones_like(masked_gates).scatter(-1, chosen, 1e-300)
        return exponentials.as_subclass(Drawn)

    def rand_like(self, like, **kwargs):
        return (1 - self.column("coin")).reshape(like.shape).to(like.dtype).as_subclass(Drawn)

    def add(self, input, other, *, alpha=1, **kwargs):
        if self.exact_thirds and isinstance(input, float) and input == 0.3333 and alpha == 0.6667:
            return torch.where(other, torch.tensor(1.0, dtype=torch.float64), torch.tensor(1 / 3, dtype=torch.float64))
        return torch.add(input, other, alpha=alpha, **kwargs)


def native_top_k(monkeypatch):
    """transformers' `sparsemixer` ignores its top_k and routes 2 experts; the k = 1 reference keeps the first
    (its first stage does not depend on the second)."""
    sparsemixer = modeling_phimoe.sparsemixer

    def first_k(scores, jitter_eps, training, top_k=2):
        multiplier, experts = sparsemixer(scores, jitter_eps, training, top_k)
        return multiplier[:, :top_k], experts[:, :top_k]

    monkeypatch.setattr(modeling_phimoe, "sparsemixer", first_k)


PHI_JITTER = 0.4  # a wide mask, so that non-arg-max experts are sampled and the Heun coins matter


@pytest.mark.parametrize("k", [1, 2])
def test_phimoe_sparsemixer_equals_native_in_eval(k, monkeypatch):
    native_top_k(monkeypatch)
    model = tiny("phimoe", k=k, dtype=torch.float64, router_jitter_noise=PHI_JITTER)
    inputs = batch("phimoe")
    native = step(model, inputs, train=False)
    with hf.patch(model, "sparsemixer-v2") as patched:
        assert patched.estimator.jitter_eps == PHI_JITTER and patched.estimator.mask == "reference"
        assert patched.estimator.k == k
        assert_same(native, step(model, inputs, train=False))


def phimoe_training_runs(k, exact_thirds, monkeypatch):
    """One training step of a tiny PhiMoE patched with sparsemixer-v2 (noise from a seeded generator, recorded),
    then one of the native model fed the same draws."""
    native_top_k(monkeypatch)
    model = tiny("phimoe", k=k, dtype=torch.float64, router_jitter_noise=PHI_JITTER)
    inputs = batch("phimoe")
    generator = torch.Generator().manual_seed(2)
    given, seen_logits = [], []
    with hf.patch(model, "sparsemixer-v2") as patched:
        def noise(name, logits):
            u = torch.rand(logits.shape[0], 2 * k, generator=generator, dtype=logits.dtype)
            given.append(u)
            seen_logits.append(logits.detach())
            return u

        patched.noise = noise
        ours = step(model, inputs, train=True)
        experts = [b.routing.experts[:, 0] for b in patched.blocks]
    draws = NativeDraws(given, k, exact_thirds)
    monkeypatch.setattr(modeling_phimoe, "torch", draws)
    native = step(model, inputs, train=True)
    assert not draws.uniforms  # the native run consumed every draw the patched run was given
    return native, ours, given, seen_logits, experts


@pytest.mark.parametrize("k", [1, 2])
def test_phimoe_sparsemixer_equals_native_in_training_with_same_draws(k, monkeypatch):
    native, ours, given, logits, experts = phimoe_training_runs(k, exact_thirds=True, monkeypatch=monkeypatch)
    assert len(given) == 2  # one draw per block, both consumed by the native run
    # the draws matter: some first choices are not the arg-max, and some of those lose the Heun coin (scale 1/3)
    u, z, d = torch.cat(given), torch.cat(logits), torch.cat(experts)
    not_max = d[:, 0] != z.argmax(-1)
    assert not_max.any() and (not_max & (u[:, k] >= 0.25)).any()
    assert_same(native, ours)


@pytest.mark.parametrize("k", [1, 2])
def test_phimoe_as_shipped_differs_only_by_its_rounded_third(k, monkeypatch):
    """transformers' sparsemixer scales a non-arg-max expert by 0.3333 (float32), not 1/3: 1e-4 relative."""
    native, ours, *_ = phimoe_training_runs(k, exact_thirds=False, monkeypatch=monkeypatch)
    assert_same(native, ours, tol=1e-6, rtol=1e-3)
    with pytest.raises(AssertionError):
        assert_same(native, ours)


# ----------------------------------------------------------------------------------- SwitchTransformers: switch
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_switch_equals_native_with_capacity(train):
    model = tiny("switch_transformers", dtype=torch.float64, router_jitter_noise=0.0, expert_capacity=2)
    inputs = batch("switch_transformers")
    # capacity binds: the native routers drop some tokens
    dropped = []
    hooks = [m.register_forward_hook(lambda mod, args, out: dropped.append((out[0].sum(-1) == 0).sum().item()))
             for m in model.modules() if type(m).__name__ == "SwitchTransformersTop1Router"]
    native = step(model, inputs, train=train)
    for h in hooks:
        h.remove()
    assert sum(dropped) > 0
    with hf.patch(model, "switch", jitter_eps=0.0) as patched:
        assert [b.k for b in patched.blocks] == [1, 1]
        ours = step(model, inputs, train=train)
        assert all(b.routing is not None for b in patched.blocks)  # routed by the estimator
        assert_same(native, ours)


def test_switch_dense_and_topk_respect_capacity():
    model = tiny("switch_transformers", dtype=torch.float64, expert_capacity=2)
    inputs = batch("switch_transformers")
    for name, k in (("st", 1), ("topk", 2), ("densemixer", 2)):
        with hf.patch(model, name, k=k) as patched:
            model.train()
            block = patched.blocks[0]
            hidden = torch.randn(BATCH, SEQ, 32, dtype=torch.float64)
            dispatch, gates, _ = block.router(hidden)
            m = 4 if patched.estimator.dense else k
            assert dispatch.shape == (BATCH, SEQ, m, 4) and gates.shape == (BATCH, SEQ, m)
            used = (gates != 0).unsqueeze(-1) & dispatch.bool()  # pairs that reach an expert with weight
            per_expert = used.sum((2,)).sum(1)  # (batch, n) per sequence
            assert (per_expert <= 2).all(), name
            step(model, inputs, train=True)


# ---------------------------------------------------------------------------- every estimator on a tiny Mixtral
def mixtral_cases():
    return [(name, k) for k in (1, 2) for name in trainable(GATED, k)]


@pytest.mark.parametrize("name,k", mixtral_cases(), ids=[f"{n}-k{k}" for n, k in mixtral_cases()])
def test_every_layer_estimator_trains_a_mixtral_and_undo_restores_it(name, k):
    model = tiny("mixtral", k=k)
    inputs = batch("mixtral")
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
    patched = hf.patch(model, name)
    assert patched.estimator.name == name and patched.estimator.k == k
    seen = []
    hook = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, a: seen.append(a[1].shape[-1]))
    model.train()
    out = model(**inputs)
    loss = out.loss
    if patched.estimator.score_function:
        log_prob = model.model.layers[0].mlp.gradest_log_prob
        assert log_prob is not None and log_prob.shape == (BATCH * SEQ,)
        loss = hf.score_loss(model, out.loss.expand(BATCH).clone()).mean()
        torch.testing.assert_close(loss, out.loss)
    loss.backward()
    hook.remove()
    assert seen[0] == (4 if patched.estimator.dense else k)  # dense: every expert reaches the experts module
    for block in patched.blocks:
        grad = router_weight(block).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, block.name
    if patched.estimator.stateful:
        assert "model.layers.0.mlp.gradest_state_default" in model.state_dict()
    patched.undo()
    patched.undo()  # a second undo does nothing
    assert not any("gradest" in key for key in model.state_dict())
    for module in model.modules():
        assert "forward" not in module.__dict__ and "_gradest_patch" not in module.__dict__
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


# ------------------------------------------------------------------------------------------ every architecture
ARCHS = list(hf.SUPPORTED)  # a new entry of the table is trained here without another edit


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_trains_with_sparse_dense_stateful_and_score_estimators(arch):
    model = tiny(arch)
    inputs = batch(arch)
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
    for name, k in (("sparsemixer-v2", None), ("st", 1), ("default-moe", None), ("reinforce", None)):
        with hf.patch(model, name, k=k) as patched:
            assert {b.architecture for b in patched.blocks} == {arch} and patched.blocks
            assert hf.SUPPORTED[arch].model_type == arch
            model.train()
            model.zero_grad(set_to_none=True)
            out = model(**inputs)
            loss = hf.score_loss(model, out.loss.expand(BATCH).clone()).mean()
            loss.backward()
            assert torch.isfinite(out.loss)
            for block in patched.blocks:
                grad = router_weight(block).grad
                assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (name, block.name)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_deepseek_keeps_routed_scaling_and_drops_the_correction_bias():
    model = tiny("deepseek_v3", dtype=torch.float64)
    model.set_experts_implementation("eager")
    with hf.patch(model, "topk") as patched:
        block = patched.blocks[0]
        assert patched.estimator.renormalize  # norm_topk_prob
        block.router.e_score_correction_bias.fill_(100.0)  # would force the native choice; unused when patched
        model.eval()
        hidden = torch.randn(5, 32, dtype=torch.float64)
        logits, weights, index = block.router(hidden)
        p = torch.softmax(hidden @ block.router.weight.T, -1)
        top, expected = p.topk(2, -1)
        torch.testing.assert_close(index, expected)
        torch.testing.assert_close(weights, 2.5 * top / top.sum(-1, keepdim=True))


# ------------------------------------------------------------------------------------------ stateful: default-moe
def test_default_moe_state_is_the_mean_of_routed_expert_outputs():
    model = tiny("mixtral", dtype=torch.float64)
    inputs = batch("mixtral")
    with hf.patch(model, "default-moe", beta=0.5) as patched:
        block = patched.blocks[0]
        state = block.block.gradest_state_default
        model.eval()
        model(**inputs)
        assert state.abs().sum() == 0  # eval never writes the state
        captured = []
        hook = block.block.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
        model.train()
        model(**inputs)
        hook.remove()
        # independently: each expert's SwiGLU output on the tokens routed to it, averaged; state = (1 - beta) mean
        x = captured[0].reshape(-1, 32)
        experts = block.block.experts
        chosen = torch.softmax(x @ block.router.weight.T, -1).topk(2, -1).indices
        expected = torch.zeros(4, 32, dtype=torch.float64)
        for i in range(4):
            rows = (chosen == i).any(-1)
            if rows.any():
                gate, up = (x[rows] @ experts.gate_up_proj[i].T).chunk(2, -1)
                expected[i] = 0.5 * ((experts.act_fn(gate) * up) @ experts.down_proj[i].T).mean(0)
        assert (expected != 0).any()
        torch.testing.assert_close(state.double(), expected, atol=1e-6, rtol=1e-5)
        # the next forward adds the offset sum_{i not chosen} p_i state_i to the routed (top-k) output
        with torch.no_grad():
            model.eval()
            hidden = torch.randn(3, 32, dtype=torch.float64)
            y = block.block(hidden[None])[0]
            p = torch.softmax(hidden @ block.router.weight.T, -1)
            top, index = p.topk(2, -1)
            routed = block.experts_forward(hidden, index, top / top.sum(-1, keepdim=True))
            offset = p.scatter(-1, index, 0.0) @ state.double()
            torch.testing.assert_close(y, routed + offset, atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------------------- score function: reinforce
def test_score_loss_adds_the_score_term_and_zero_baseline_uses_zero_output():
    model = tiny("mixtral")
    inputs = batch("mixtral")
    with hf.patch(model, "reinforce:baseline=zero") as patched:
        model.train()
        out = model(**inputs)
        per_sequence = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), inputs["labels"][:, 1:],
                                                         reduction="none").mean(-1)
        with torch.no_grad(), patched.zero_output():
            logits_zero = model(**inputs).logits
        zero = torch.nn.functional.cross_entropy(logits_zero[:, :-1].transpose(1, 2), inputs["labels"][:, 1:],
                                                 reduction="none").mean(-1)
        assert not torch.allclose(zero, per_sequence)
        total = hf.score_loss(model, per_sequence, loss_zero=zero)
        torch.testing.assert_close(total, per_sequence)
        weight = patched.blocks[0].router.weight
        with_score = torch.autograd.grad(total.sum(), weight, retain_graph=True)[0]
        gate_only = torch.autograd.grad(per_sequence.sum(), weight)[0]
        assert not torch.allclose(with_score, gate_only)
        with pytest.raises(GradestError, match="needs f\\(0\\)"):
            hf.score_loss(model, per_sequence)
        mask = torch.ones(BATCH, SEQ)
        hf.score_loss(model, per_sequence, loss_zero=zero, attention_mask=mask)
        with pytest.raises(GradestError, match="attention_mask"):
            hf.score_loss(model, per_sequence, loss_zero=zero, attention_mask=torch.ones(BATCH, SEQ + 1))
    with pytest.raises(GradestError, match="patched by gradest"):
        hf.score_loss(model, per_sequence)


# ---------------------------------------------------------------------------------------------------- errors


def test_unknown_architecture_lists_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16))
    one_line_error(lambda: hf.patch(gpt2, "topk"), "GPT2LMHeadModel", "gpt2", *ARCHS)
    one_line_error(lambda: hf.patch(nn.Linear(3, 3), "topk"), "Linear", "supported architectures", "mixtral")
    one_line_error(lambda: hf.patch("model", "topk"), "nn.Module")


def test_estimators_that_cannot_route_the_model_are_refused():
    model = tiny("mixtral", k=2)
    valid_k2 = ", ".join(trainable(GATED, 2))
    one_line_error(lambda: hf.patch(model, "exact"), "exact", "enumerates", valid_k2)
    one_line_error(lambda: hf.patch(model, get_estimator("exact", k=2)), "exact", "enumerates")
    one_line_error(lambda: hf.patch(model, "switch"), "switch", "num_experts_per_tok=2", valid_k2, "k=1")
    one_line_error(lambda: hf.patch(model, "gumbel-st"), "gumbel-st", valid_k2)
    one_line_error(lambda: hf.patch(model, "nope"), "unknown estimator", "topk")
    one_line_error(lambda: hf.patch(model, "topk", bogus=1), "bogus")
    one_line_error(lambda: hf.patch(model, "topk", k=9), "k=9", "n=4")
    one_line_error(lambda: hf.patch(model, get_estimator("topk"), k=2), "Estimator object")
    with hf.patch(model, "switch", k=1) as patched:  # top-1 in a top-2 model, when asked for
        assert patched.estimator.k == 1
        one_line_error(lambda: hf.patch(model, "topk"), "already patched")
    with hf.patch(model, get_estimator("topk", k=2)) as patched:
        assert not patched.estimator.renormalize  # an Estimator object is used as it is
        assert "model.layers.0.mlp" in repr(patched) and patched.modules == ["model.layers.0.mlp",
                                                                              "model.layers.1.mlp"]


@pytest.mark.slow
def test_only_the_hugging_face_modules_import_transformers():
    """transformers is an optional extra: gradest.hf imports it in one place (`models.transformers_module`, on first
    use); no module outside gradest/hf/ imports it or reaches it (such as `hf.transformers.AutoConfig` through the
    package), nor uses a private name of the package; and the core package, the CLI, the trainer and gradest.hf
    itself load without it."""
    import ast
    import pathlib
    import subprocess
    import sys

    import gradest
    root = pathlib.Path(gradest.__file__).parent

    def uses(tree) -> list[str]:
        """What a module does with transformers or with gradest.hf's private names."""
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] == "transformers"]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if module.split(".")[0] == "transformers":
                    found.append(f"from {module} import")
                if module.startswith("gradest.hf"):
                    found += [f"from {module} import {a.name}" for a in node.names
                              if a.name == "transformers" or a.name.startswith("_")]
            elif isinstance(node, ast.Attribute):
                if node.attr == "transformers":
                    found.append(".transformers")
                elif isinstance(node.value, ast.Name) and node.value.id == "hf" and node.attr.startswith("_"):
                    found.append(f"hf.{node.attr}")
        return found

    seen = {path.relative_to(root).as_posix(): uses(ast.parse(path.read_text())) for path in root.rglob("*.py")}
    assert {name: found for name, found in seen.items() if found} == {"hf/models.py": ["import transformers"]}
    code = ("import sys, gradest, gradest.cli, gradest.train, gradest.study, gradest.probe, gradest.hf; "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
