"""What several test modules share: the repository's root, running the CLI and checking its one-line errors;
prepared random draws."""

from pathlib import Path

import torch
from click.testing import CliRunner

from gradest.cli import main

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


class Drawn(torch.Tensor):
    """A prepared draw: redrawing it in place (`exponential_`, `uniform_`) keeps its values; operations on it give
    plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def exponential_(self, *args, **kwargs):
        return self

    def uniform_(self, *args, **kwargs):
        return self
