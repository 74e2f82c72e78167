"""What several test modules share: the repository's root, running the CLI and checking its one-line errors;
a small study spec; prepared random draws."""

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
