"""What several test modules share: the repository's root, running the CLI and checking its one-line errors;
prepared random draws."""

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
