"""The router-gradient probe on a Switch Transformer (docs/estimators.md §4.5): its exact reference against finite
differences and a brute-force enumeration through the model's own forward, the Rao-Blackwellised reference
against enumeration, vectorised samples against a per-sample loop, and the rows it returns."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

from gradest.errors import GradestError
from gradest.estimators import Objective, Routing, expand_estimators, get_estimator
from gradest.measure import bias_variance, bias_variance_mc, compare
from gradest.model import SwitchConfig, SwitchLM, SwitchSeq2Seq
from gradest.probe import (ForcedRouting, SwitchSite, enumerate_reference, installed,
                           layer_gradient_samples, probe, probing, rao_blackwell_reference, sample_seeds,
                           switch_probe)
from gradest.problems import ProblemConfig
from gradest.measure import CONFIG_COLUMNS
from gradest.report import SUMMARY_COLUMNS, write_compare_report

PLAIN = Objective(k=1)
OBJECTIVES = [PLAIN, Objective(k=1, mask="reference", r=0.5), Objective(k=2),
              Objective(k=1, mask="paper", r=0.8, temperature=2.0)]


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(model, seed, router_scale=0.4):
    """Weights large enough that routing matters (at GPT-2 init the experts' outputs are tiny)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.moe_layers():
            for name, p in m.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (router_scale if "router" in name else 0.5))
    return model


def tiny_lm(seed=0, n=3, tokens=2, batch=2, router_scale=0.4):
    """A float64 2-layer LM, both layers MoE (so layer 0 has attention and another MoE layer above it)."""
    cfg = SwitchConfig(vocab_size=11, block_size=4, n_layer=2, n_head=2, d_model=6, d_ff=8, experts=n, moe_every=1)
    torch.manual_seed(seed)
    model = randomise(SwitchLM(cfg, get_estimator("switch")).double(), seed, router_scale)
    g = torch.Generator().manual_seed(seed + 100)
    return model, (torch.randint(11, (batch, tokens), generator=g), torch.randint(11, (batch, tokens), generator=g))


def tiny_mt(seed=0, n=3):
    """A float64 encoder-decoder, every layer MoE, with padding on both sides (pad id 0)."""
    cfg = SwitchConfig(vocab_size=13, block_size=4, n_layer=2, n_encoder_layer=2, n_head=2, d_model=6, d_ff=8,
                       experts=n, moe_every=1, pad_id=0)
    torch.manual_seed(seed)
    model = randomise(SwitchSeq2Seq(cfg, get_estimator("switch"), pad_id=0).double(), seed)
    src = torch.tensor([[3, 4], [5, 0]])
    tgt_in = torch.tensor([[1, 6], [1, 7]])
    tgt_out = torch.tensor([[6, 2], [7, 0]])  # the second sequence's last position is padding
    return model, (src, tgt_in, tgt_out)


def model_losses(model, batch, copies=1):
    """Each copy's sequence losses (copies, B) from the model's own forward (float64 cross-entropy)."""
    if isinstance(model, SwitchLM):
        idx, targets = batch
        logits = model.head(model.decoder(idx.repeat(copies, 1)))
        ignore = model.config.pad_id
    else:
        src, tgt_in, targets = batch
        logits = model.decode(tgt_in.repeat(copies, 1), *model.encode(src.repeat(copies, 1)))
        ignore = model.pad_id
    targets = targets.repeat(copies, 1)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=ignore, reduction="none")
    return (ce.sum(-1) / (targets != ignore).sum(-1)).reshape(copies, -1)


def brute_force_J(model, batch, layer, objective, tokens):
    """J = sum over every joint assignment of ALL `tokens` tokens at the layer of prod_t P_t L, by the model's
    full forward on one copy of the batch per assignment (no prefix re-use, no per-sequence split, no leaf)."""
    moe = model.moe_layers()[layer]
    k = objective.k
    tuples = torch.tensor(list(itertools.permutations(range(moe.experts), k)))
    joint = torch.tensor(list(itertools.product(range(len(tuples)), repeat=tokens)))
    forced = ForcedRouting(objective, tuples[joint].reshape(-1, k), leaf=False)
    with probing(model), installed(moe, forced):
        losses = model_losses(model, batch, len(joint)).mean(-1)
        weights = forced.gates.prod(-1).reshape(len(joint), tokens).prod(-1)
        return (weights * losses).sum()


# ------------------------------------------------------------------------------------------ exact reference
@pytest.mark.parametrize("objective", OBJECTIVES, ids=["plain", "mask-reference", "top2", "mask-paper-t2"])
def test_enumeration_equals_finite_differences(objective):
    """grad J w.r.t. layer 0's router weights by enumeration = central finite differences of a brute-force J
    (T = 4 tokens, n = 3), and = autograd through the brute force; top-1, top-2, masks, temperature."""
    model, batch = tiny_lm()
    site = SwitchSite(model, batch, 0)
    assert int(site.relevant.sum()) == 4
    reference = site.router_gradient(enumerate_reference(site, objective).grad_z)
    weight = model.moe_layers()[0].router.weight
    (autograd,) = torch.autograd.grad(brute_force_J(model, batch, 0, objective, 4), weight)
    torch.testing.assert_close(reference, autograd.flatten(), rtol=1e-10, atol=1e-14)
    eps, fd = 1e-5, torch.zeros(weight.numel(), dtype=torch.float64)
    with torch.no_grad():
        for i in range(weight.numel()):
            weight.view(-1)[i] += eps
            plus = brute_force_J(model, batch, 0, objective, 4)
            weight.view(-1)[i] -= 2 * eps
            minus = brute_force_J(model, batch, 0, objective, 4)
            weight.view(-1)[i] += eps
            fd[i] = (plus - minus) / (2 * eps)
    assert reference.norm() > 1e-4  # not trivially zero
    torch.testing.assert_close(reference, fd, rtol=1e-5, atol=1e-6 * float(fd.abs().max()))


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_translation_enumeration_skips_padding(layer):
    """Encoder-decoder: enumeration over each sequence's relevant tokens (padding and positions after the last
    target left out) = autograd of the brute force over every token at the layer, encoder and decoder layers."""
    model, batch = tiny_mt()
    site = SwitchSite(model, batch, layer)
    expected = [[True, True], [True, False]]  # encoder: src padding; decoder: position 1 of sequence 1 scores nothing
    assert site.relevant.tolist() == expected
    ref = enumerate_reference(site, PLAIN)
    (autograd,) = torch.autograd.grad(brute_force_J(model, batch, layer, PLAIN, 4),
                                      model.moe_layers()[layer].router.weight)
    torch.testing.assert_close(site.router_gradient(ref.grad_z), autograd.flatten(), rtol=1e-10, atol=1e-14)
    assert ref.rows == 9 + 3  # 3^2 assignments for the full sequence, 3 for the padded one
    assert site.router_gradient(ref.grad_z).norm() > 1e-4


def test_rao_blackwell_agrees_with_enumeration_and_its_error_shrinks():
    """The Rao-Blackwellised reference is within its own CI of enumeration (per-coordinate z-test, Bonferroni
    at 1%), and its standard error shrinks like 1/sqrt(S)."""
    model, batch = tiny_lm(seed=1)
    site = SwitchSite(model, batch, 0)
    for objective in (PLAIN, OBJECTIVES[2]):
        exact = site.router_gradient(enumerate_reference(site, objective).grad_z)
        draws = rao_blackwell_reference(site, objective, draws=400, seed=3).values(site, "router")
        se = draws.std(0) / math.sqrt(len(draws))
        assert float(se.min()) > 0  # layer 0's tokens interact through the attention above: the draws vary
        z = (draws.mean(0) - exact) / se
        assert z.abs().max() < norm.ppf(1 - 0.01 / (2 * len(z))), z
    small = rao_blackwell_reference(site, PLAIN, draws=100, seed=5)
    large = rao_blackwell_reference(site, PLAIN, draws=1600, seed=6)
    ratio = small.relative_se(site, "router") / large.relative_se(site, "router")
    assert 3.0 < ratio < 5.3  # sqrt(1600 / 100) = 4


def test_rao_blackwell_is_exact_without_interactions():
    """On the last layer nothing above mixes tokens, so E[L | D_-t] does not depend on D_-t: zero variance."""
    model, batch = tiny_lm(seed=2)
    site = SwitchSite(model, batch, 1)
    exact = enumerate_reference(site, PLAIN).grad_z
    rb = rao_blackwell_reference(site, PLAIN, draws=5, seed=0)
    torch.testing.assert_close(rb.draws, exact.expand_as(rb.draws), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------- estimator samples
def loop_samples(model, batch, layer, estimator, seeds):
    """The naive baseline, as the Trainer computes a step's gradient: for each sample, layer l alone in training
    mode draws its own noise after torch.manual_seed(seed), the model's forward, the surrogate (REINFORCE with
    f and log P per sequence), backward into the router weight."""
    moe = model.moe_layers()[layer]
    saved, out = (moe.estimator, moe.k), []
    model.eval()
    moe.estimator, moe.k = estimator, estimator.k
    moe.train()
    try:
        for seed in seeds:
            model.zero_grad()
            torch.manual_seed(seed)
            losses = model_losses(model, batch)[0]
            log_prob = model.routing_log_prob()
            if log_prob is None:
                objective = losses.mean()
            else:
                f_zero = None
                if estimator.needs_zero_output:
                    moe.zero_output = True
                    with torch.no_grad():
                        f_zero = model_losses(model, batch)[0]
                    moe.zero_output = False
                routing = Routing(experts=None, gates=log_prob.new_empty(0), log_prob=log_prob)
                objective = estimator.surrogate(losses[:, None], routing, f_zero).mean()
            objective.backward()
            out.append(moe.router.weight.grad.flatten().clone())
    finally:
        moe.estimator, moe.k = saved
        model.zero_grad()
    return torch.stack(out)


CASES = [(spec, 1) for spec in ["switch", "topk", "st", "gumbel-st", "reinmax", "reinforce", "reinforce:baseline=zero",
                                "reinforce:baseline=mean", "first-order", "sparsemixer", "sparsemixer:mask=none",
                                "sparsemixer-v2", "sparsemixer-v2*"]] + \
        [(spec, 2) for spec in ["topk", "reinforce:baseline=mean", "first-order", "sparsemixer-v2*"]]


@pytest.mark.parametrize("spec,k", CASES)
def test_vectorised_samples_equal_a_per_sample_loop(spec, k):
    """K samples from one replicated forward/backward (chunked to 2 samples a pass) = K separate training
    forwards in which layer l draws its own noise: same numbers for every kind of estimator."""
    model, batch = tiny_lm(seed=3, tokens=3)
    (estimator,) = expand_estimators([spec], "gated", k)
    site = SwitchSite(model, batch, 0)
    fast = site.router_gradient(layer_gradient_samples(site, estimator, 5, seed=7,
                                                       max_elements=2 * 2 * 3 * 24))
    slow = loop_samples(model, batch, 0, estimator, sample_seeds(7, 5))
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-13)
    if estimator.noise_dim(3) > 0 and spec != "switch" and estimator.objective().mask == "none":
        assert not torch.equal(fast[0], fast[1])  # the samples' noise differs


@pytest.mark.parametrize("layer", [0, 2])
def test_vectorised_samples_equal_loop_on_translation(layer):
    model, batch = tiny_mt(seed=4)
    site = SwitchSite(model, batch, layer)
    for spec in ("reinforce:baseline=zero", "st"):
        (estimator,) = expand_estimators([spec], "gated", 1)
        fast = site.router_gradient(layer_gradient_samples(site, estimator, 4, seed=1))
        torch.testing.assert_close(fast, loop_samples(model, batch, layer, estimator, sample_seeds(1, 4)),
                                   rtol=1e-9, atol=1e-13)


def test_stateful_estimator_routes_with_the_layers_state_or_its_steady_state():
    """A stateful estimator (default-moe) is sampled with the state layer l holds when the layer holds one of its
    kind (what training left), else with its steady state at the current parameters; a sample then equals the
    Trainer's gradient with the layer holding that state, and the probe leaves the layer's buffers alone."""
    model, batch = tiny_lm(seed=3, tokens=3)
    (estimator,) = expand_estimators(["default-moe"], "gated", 1)
    site = SwitchSite(model, batch, 0)
    steady = site.estimator_state(estimator)["default"]
    assert steady.dtype == torch.float64 and steady.abs().sum(-1).gt(0).any()  # experts with tokens have one
    first = site.router_gradient(layer_gradient_samples(site, estimator, 2, seed=1))

    moe = model.moe_layers()[0]
    moe.hold(estimator)
    model.double()  # the buffers hold() registered, as a float64 model's
    with torch.no_grad():
        moe.state_default.copy_(steady)
    held = moe.state_default.clone()
    site = SwitchSite(model, batch, 0)
    assert torch.equal(site.estimator_state(estimator)["default"], held)
    second = site.router_gradient(layer_gradient_samples(site, estimator, 2, seed=1))
    assert torch.equal(moe.state_default, held)  # the probe updated no buffer
    torch.testing.assert_close(first, second, rtol=1e-12, atol=1e-15)
    # one training forward (it updates the state after the forward, so a second would see another one)
    torch.testing.assert_close(second[:1], loop_samples(model, batch, 0, estimator, sample_seeds(1, 1)), rtol=1e-9,
                               atol=1e-13)


def mean_z(samples, reference):
    """Largest per-coordinate |z| of the samples' mean against the reference, and its Bonferroni bound at 0.1%."""
    z = (samples.mean(0) - reference) / (samples.std(0) / math.sqrt(len(samples)))
    return z.abs().max(), norm.ppf(1 - 0.001 / (2 * len(z)))


def test_reinforce_unbiased_switch_biased():
    """Against the enumeration reference, REINFORCE's mean is within its CI of the exact gradient (per-coordinate
    z, Bonferroni at 0.1% for each of the five) and its bias interval does not lie above 0 (f, log P per sequence as the Trainer, or per
    batch); Switch, which has no routing gradient nabla_0, is far off. Against a Rao-Blackwell reference, with
    its noise accounted for, the same."""
    model, batch = tiny_lm(seed=5)
    site = SwitchSite(model, batch, 0)
    exact = site.router_gradient(enumerate_reference(site, PLAIN).grad_z)
    for spec, score in [("reinforce", "sequence"), ("reinforce:baseline=mean", "sequence"),
                        ("reinforce:baseline=zero", "sequence"), ("reinforce", "batch"),
                        ("reinforce:baseline=zero", "batch")]:
        (estimator,) = expand_estimators([spec], "gated", 1)
        samples = layer_gradient_samples(site, estimator, 4000, seed=2, score=score)
        z, bound = mean_z(site.router_gradient(samples), exact)
        assert z < bound, (spec, score)
    samples = layer_gradient_samples(site, get_estimator("switch"), 4000, seed=2)
    z, bound = mean_z(site.router_gradient(samples), exact)
    assert z > 10 * bound

    # The rows' bias intervals (a 95% jackknife interval; below 0 when the mean lands closer than its noise)
    rows = probe(model, batch, 0, ["reinforce", "reinforce:baseline=mean", "switch"], 3000, reference="enumeration",
                 seed=2).set_index("estimator")
    assert (rows.loc[["reinforce", "reinforce(baseline=mean)"], "bias_sq_lo"] <= 0).all()
    assert rows.loc["switch", "bias_sq_lo"] > 0 and rows.loc["switch", "rel_bias"] > 0.1
    assert (rows["reference"] == "enumeration").all() and (rows["reference_se"] == 0).all()
    mc = probe(model, batch, 0, ["reinforce:baseline=mean", "switch"], 3000, reference="rao-blackwell", draws=20,
               seed=2).set_index("estimator")
    assert mc.loc["reinforce(baseline=mean)", "bias_sq_lo"] <= 0
    assert mc.loc["switch", "bias_sq_lo"] > 0
    assert (mc["reference"] == "rao-blackwell").all() and (mc["reference_se"] > 0).all()


@pytest.mark.parametrize("bias", [0.0, 1.0])
def test_noisy_reference_bias_is_unbiased_and_covered(bias):
    """bias_variance_mc on synthetic Gaussians against a noisy reference (8 draws of sd 2 in 10 dimensions): its
    squared bias averages the true one and its interval covers it about 95% of the time, where bias_variance
    against the mean draw is off by E||mean draw - g*||^2 = 5 and almost never covers."""
    g = torch.Generator().manual_seed(0)
    P, K, S, runs = 10, 30, 8, 300
    corrected, covered, naive_covered = [], 0, 0
    for _ in range(runs):
        mu = torch.randn(P, generator=g, dtype=torch.float64)
        samples = mu + torch.randn(K, P, generator=g, dtype=torch.float64)
        samples[:, 0] += bias
        draws = mu + 2 * torch.randn(S, P, generator=g, dtype=torch.float64)
        out = bias_variance_mc(samples, draws)
        naive = bias_variance(samples, draws.mean(0))
        corrected.append(out["bias_sq"])
        covered += out["bias_sq_lo"] <= bias ** 2 <= out["bias_sq_hi"]
        naive_covered += naive["bias_sq_lo"] <= bias ** 2 <= naive["bias_sq_hi"]
    corrected = torch.tensor(corrected)
    assert abs(corrected.mean() - bias ** 2) < 3 * corrected.std() / math.sqrt(runs)
    assert covered / runs > 0.9 and naive_covered / runs < 0.2


# --------------------------------------------------------------------------------------------------- rows
def compare_columns():
    synthetic = compare([ProblemConfig(experts=3, tokens=4, dim=2, out_dim=2)], ["switch"], samples=4)
    return set(synthetic.columns) - {"out_dim", "classes", "power", "center"}  # synthetic problems' own settings


def test_rows_have_the_compare_columns(tmp_path):
    rows = switch_probe("lm", estimators="switch,reinforce:baseline=mean,st", samples=8, draws=4,
                        wrt=("router", "logits"))
    assert compare_columns() <= set(rows.columns)
    assert set(SUMMARY_COLUMNS + CONFIG_COLUMNS) <= set(rows.columns)  # what the compare report needs
    assert {"reference", "reference_se", "reference_draws"} <= set(rows.columns)
    assert set(rows["problem"]) == {"switch-lm"} and set(rows["wrt"]) == {"router", "logits"}
    assert rows["reference"].isin(["enumeration", "rao-blackwell"]).all()
    write_compare_report(rows, tmp_path, {"seed": 0})
    assert (tmp_path / "summary.md").read_text().count("switch-lm") >= 1


@pytest.mark.slow
def test_translation_and_top2_rows():
    rows = switch_probe("mt", estimators="reinforce:baseline=zero,sparsemixer-v2", samples=6, draws=3)
    assert set(rows["problem"]) == {"switch-mt"} and rows["rel_bias"].notna().all()
    rows = switch_probe("lm", top_k=2, estimators="all", samples=4, draws=3, seq_len=4)
    assert set(rows["top_k"]) == {2}
    assert set(rows["estimator"]) == {e.label for e in expand_estimators("all", "gated", 2) if e.name != "exact"}


def test_same_seed_same_numbers_and_model_left_alone():
    """Determinism, and the model is returned as it came: modes, estimators, no gradients, global RNG."""
    model, batch = tiny_lm(seed=6)
    model.train()
    estimators = [m.estimator for m in model.moe_layers()]
    state = torch.random.get_rng_state()
    a = probe(model, batch, 0, "all", 6, reference="rao-blackwell", draws=4, seed=3)
    b = probe(model, batch, 0, "all", 6, reference="rao-blackwell", draws=4, seed=3)
    c = probe(model, batch, 0, "all", 6, reference="rao-blackwell", draws=4, seed=4)
    timing = [col for col in a.columns if "seconds" in col or col == "sec_per_sample"]
    assert a.drop(columns=timing).equals(b.drop(columns=timing))
    assert not a.drop(columns=timing).equals(c.drop(columns=timing))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(m.training for m in model.modules())
    assert [m.estimator for m in model.moe_layers()] == estimators and all(m.k == 1 for m in model.moe_layers())
    assert all(p.grad is None for p in model.parameters())


def test_trained_checkpoint(tmp_path):
    """A Trainer's checkpoint is probed as it is (its own estimator at the other layers)."""
    from gradest.train import TrainConfig, Trainer
    config = TrainConfig(task="lm", estimator="sparsemixer", experts=3, steps=2, batch_size=2, block_size=8,
                         eval_interval=2, eval_batches=1, model=dict(n_layer=2, n_head=2, d_model=8, d_ff=8))
    Trainer(config, tmp_path).run()
    rows = switch_probe("lm", checkpoint=tmp_path, estimators="sparsemixer,reinforce", samples=4, draws=3)
    assert set(rows["experts"]) == {3}


def test_bad_inputs():
    model, batch = tiny_lm()
    with pytest.raises(GradestError, match="exact"):
        probe(model, batch, 0, ["exact"], 4)
    with pytest.raises(GradestError, match="layer"):
        probe(model, batch, 5, ["switch"], 4)
    with pytest.raises(GradestError, match="reference"):
        probe(model, batch, 0, ["switch"], 4, reference="bogus")
    with pytest.raises(GradestError, match="score='sequence'"):
        probe(model, batch, 0, ["reinforce:baseline=mean"], 4, score="batch")
    with pytest.raises(GradestError, match="capacity"):
        model.moe_layers()[1].capacity_factor = 1.0
        probe(model, batch, 0, ["switch"], 4)
