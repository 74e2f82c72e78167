"""The estimator contract: a new estimator is one class, and every part of gradest sees it.

A throwaway estimator is registered here and run through `gradest list`, `gradest compare`, the MoE layer,
`gradest run` and a study; the registry refuses a second class under a taken name; declared hyper-parameters are
plain typed attributes; and no module outside gradest/estimators/ tests an estimator's name.
"""

from __future__ import annotations

import re
import textwrap
import typing

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from gradest.cli import main
from gradest.errors import GradestError
from gradest.estimators import (REGISTRY, Estimator, Objective, Routing, get_estimator, hparam, register,
                                unregister)
from gradest.estimators.base import softmax, unit_interval
from gradest.moe import MoE
from helpers import REPO


class EpsilonGreedy(Estimator):
    """A throwaway estimator: the arg-max expert, or with probability eps a uniformly random one; gate path only.
    (Not a real method: it shows what a new estimator needs and nothing more.)"""

    name = "eps-greedy"
    family = "test"
    reference = "none (a test fixture)"
    eps: float = hparam(0.2, unit_interval, "probability of a uniformly random expert")

    def noise_dim(self, n):
        return 2

    def sample(self, logits, noise, kind):
        n = logits.shape[-1]
        random = (noise[..., 1:] * n).long().clamp_max(n - 1)
        d = torch.where(noise[..., :1] < self.eps, random, logits.detach().argmax(-1, keepdim=True))
        return Routing(d.unsqueeze(-2), softmax(logits).gather(-1, d).unsqueeze(-2))


@pytest.fixture
def throwaway():
    register(EpsilonGreedy)
    try:
        yield EpsilonGreedy
    finally:
        unregister(EpsilonGreedy.name)


def cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_throwaway_estimator_in_list_compare_layer_and_run(throwaway, tmp_path):
    listed = cli("list")
    assert listed.exit_code == 0 and "eps-greedy" in listed.output and "eps=0.2" in listed.output

    out = tmp_path / "compare"
    result = cli("compare", "--problem", "moe-regression", "--experts", "3", "--tokens", "4", "--samples", "50",
                 "--estimators", "eps-greedy:eps=0.5,switch", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "summary.csv")
    assert set(rows.estimator) == {"eps-greedy(eps=0.5)", "switch"} and rows.mse.notna().all()
    assert (rows.target == "exact(k=1)").all()

    layer = MoE(8, 16, 4, get_estimator("eps-greedy"))
    x = torch.randn(5, 8, requires_grad=True)
    layer(x).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0

    result = cli("run", "--estimator", "eps-greedy", "--steps", "2", "--batch-size", "2", "--model",
                 "n_layer=2", "--model", "d_model=16", "--model", "d_ff=32", "--model", "n_head=2", "--model",
                 "block_size=16", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv")) == 2


def test_throwaway_estimator_in_a_study(throwaway, tmp_path):
    from gradest.study import load_study, run_study, write_report

    path = tmp_path / "throwaway.toml"
    path.write_text(textwrap.dedent("""
        [study]
        name = "throwaway"
        kind = "compare"
        description = "a throwaway estimator in a study"
        [grid]
        estimator = ["eps-greedy", "switch"]
        seed = [0, 1, 2]
        [settings]
        problem = "moe-regression"
        experts = 3
        tokens = 4
        samples = 20
        """))
    study = load_study(path)
    summary = run_study(study, results=tmp_path / "results", progress=False)
    assert len(summary.done) == 6 and summary.failed == []
    out = write_report(study, results=tmp_path / "results", out=tmp_path / "report")
    assert {"eps-greedy", "switch"} <= set(pd.read_csv(out / "summary.csv").estimator)


def test_registry_refuses_a_second_class_under_a_taken_name(throwaway):
    class Impostor(EpsilonGreedy):
        """Another class with the same name."""

    with pytest.raises(GradestError, match="already registered"):
        register(Impostor)
    assert REGISTRY["eps-greedy"] is EpsilonGreedy
    register(EpsilonGreedy)  # the same class again (a module re-imported) is not a second one


def test_hyper_parameters_are_typed_attributes():
    estimator = get_estimator("sparsemixer", jitter_eps=0.2)
    assert estimator.jitter_eps == 0.2 and estimator.mask == "reference"
    hints = typing.get_type_hints(type(estimator))
    assert hints["jitter_eps"] is float and hints["mask"] is str
    for name, cls in REGISTRY.items():
        instance = cls()
        for key, param in cls.params.items():
            assert getattr(instance, key) == param.default, (name, key)
        assert list(cls.params)[:1] == ["k"] or "k" not in cls.params  # the routing's shape first


def test_objective_value_and_label():
    assert Objective(k=1, mask="none", r=0.3) == Objective(k=1)  # no mask has no width
    assert Objective(k=2, mask="reference", r=0.1, temperature=2.0).label == \
        "exact(k=2, temperature=2, mask=reference r=0.1)"
    for name in REGISTRY:
        objective = get_estimator(name).objective()
        assert isinstance(objective, Objective)
        assert objective.exact().objective() == objective
    with pytest.raises(GradestError, match="unknown mask"):
        Objective(mask="bogus")


def test_no_name_test_of_an_estimator_outside_its_module():
    """Callers ask an estimator what it can do (`enumerates`, `dense`, `stateful`, ...), never what it is called."""
    pattern = re.compile(r"""\b(estimator|e|cls|est)\.name\s*(==|!=|in\b)|(==|!=)\s*["']exact["']"""
                         r"""|startswith\(["']exact""")
    offenders = []
    for path in sorted((REPO / "gradest").rglob("*.py")):
        if "estimators" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_no_file_cites_a_document_outside_the_repo():
    pattern = re.compile("DESI" + r"GN(\.md)?\b|\.\./shared")  # split, so that this file does not match itself
    offenders = []
    for path in sorted(REPO.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(REPO).parts) \
                or path.suffix not in (".py", ".md", ".toml", ".txt", ".sh", ".cfg"):
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(REPO)}" for _ in [0] if pattern.search(text)]
    assert offenders == []
