"""What several test modules share: the repository's root, running the CLI and checking its one-line errors;
a small study spec; prepared random draws."""

import itertools
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gradest.cli import main
from gradest.errors import GradestError

REPO = Path(__file__).resolve().parents[1]  # tests run in a temporary working directory (conftest.py)


def cli(*args):
    """`gradest ARGS...` in-process; arguments may be paths or numbers."""
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_one_line_error(result, *words):
    """Exit code 2, one line `error: ...` on stderr naming `words`, no traceback anywhere."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


# a study of six fast compare cells (two arms, three seeds)
SMALL = """
[study]
name = "small"
kind = "compare"
description = "a test study"

[grid]
estimator = ["switch", "st:tau=0.5"]
seed = [0, 1, 2]

[settings]
problem = "moe-regression"
experts = 3
tokens = 4
samples = 20
"""


def write_spec(tmp_path, text=SMALL, name="small.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def one_line_error(call, *words) -> str:
    """`call()` raises a GradestError whose message is one line naming `words`; returns the message."""
    with pytest.raises(GradestError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


class Drawn(torch.Tensor):
    """A prepared draw: redrawing it in place (`exponential_`, `uniform_`) keeps its values; operations on it give
    plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def exponential_(self, *args, **kwargs):
        return self

    def uniform_(self, *args, **kwargs):
        return self


def brute_force_J(site, W, k: int) -> float:
    """The probe's objective at an engine site (gradest.probe.EngineSite) by brute force: mean_b sum_D
    prod_t P_t(D_t) L_b(D) over every assignment D of every sequence, P from softmax(W u) with the router weight
    `W` as it is now (a finite-difference test moves it in place)."""
    from gradest.estimators import Objective
    from gradest.probe import ForcedRouting, installed, probing
    with torch.no_grad():
        p = torch.softmax(site.u @ W.T.to(site.u.dtype), -1)  # (B, T, n)
    tuples = list(itertools.permutations(range(site.n), k))
    total = 0.0
    for b in range(site.B):
        assignments = list(itertools.product(range(len(tuples)), repeat=site.T))
        experts = torch.tensor([[tuples[a] for a in combo] for combo in assignments])  # (R, T, k)
        prob = torch.ones(len(assignments), dtype=torch.float64)
        for t in range(site.T):
            first = p[b, t, experts[:, t, 0]]
            prob = prob * first
            if k == 2:
                prob = prob * p[b, t, experts[:, t, 1]] / (1 - first)
        forced = ForcedRouting(Objective(k), experts.reshape(-1, k), leaf=False)
        with probing(site.model), installed(site.layer, forced), torch.no_grad():
            losses = site.losses(torch.full((len(assignments),), b))
        total += float((prob * losses).sum())
    return total / site.B
