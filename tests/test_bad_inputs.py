"""Every bad input a user can type, through the CLI: one line `error: ...` naming the bad value and what is valid,
exit code 2, no traceback, and nothing written or overwritten.

Each case runs in a fresh working directory. Cases that need something on disk first (an earlier report, a
study spec) set it up with `before`, and the test checks that every file there is unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from gradest.cli import main

TINY_RUN = ["--steps", "2", "--batch-size", "2", "--model", "n_layer=2", "--model", "d_model=16", "--model",
            "d_ff=32", "--model", "n_head=2", "--model", "block_size=16"]
STUDY = """
[study]
name = "bad"
kind = "{kind}"
description = "a study with one bad cell"
[grid]
seed = [0, 1]
[settings]
{settings}
"""


def earlier_report(path: Path):
    (path / "runs" / "compare").mkdir(parents=True)
    (path / "runs" / "compare" / "summary.csv").write_text("an earlier report\n")


def earlier_synthetic_run(path: Path):
    (path / "out").mkdir()
    (path / "out" / "metrics.csv").write_text("an earlier run\n")


def study(kind: str, settings: str):
    def write(path: Path):
        (path / "bad.toml").write_text(textwrap.dedent(STUDY.format(kind=kind, settings=settings)))
    return write


CASES = [
    # zeros are values, never "use the default"
    (["run", "--estimator", "topk", "--top-k", "0", *TINY_RUN], ["top_k=0", "integer >= 1"], None),
    (["run", "--estimator", "topk", "--experts", "0", *TINY_RUN], ["experts", "0"], None),
    (["run", "--estimator", "topk", "--lr", "0", *TINY_RUN], ["lr=0", "> 0"], None),
    (["run", "--problem", "moe-regression", "--estimator", "switch", "--lr", "0"], ["lr", "0", "> 0"], None),
    (["run", "--problem", "moe-regression", "--estimator", "topk", "--top-k", "0"], ["top_k", "0"], None),
    # --model
    (["run", "--estimator", "switch", "--model", "n_head=3"], ["n_head=3", "divide d_model=128"], None),
    (["run", "--estimator", "switch", "--model", "dropout=2"], ["dropout=2", "[0, 1)"], None),
    (["run", "--estimator", "switch", "--model", "n_layer=abc"], ["n_layer='abc'", "integer >= 1"], None),
    (["run", "--estimator", "switch", "--model", "n_layer=2.5"], ["n_layer=2.5", "integer >= 1"], None),
    (["run", "--estimator", "switch", "--model", "n_layer=-2"], ["n_layer=-2", "integer >= 1"], None),
    (["run", "--estimator", "switch", "--model", "moe_every=-1"], ["moe_every=-1", "integer >= 0"], None),
    (["run", "--estimator", "switch", "--model", "post_ln=maybe"], ["post_ln='maybe'", "true or false"], None),
    (["run", "--estimator", "switch", "--model", "vocab_size=5"], ["vocab_size", "task's data"], None),
    (["run", "--estimator", "switch", "--model", "experts=1"], ["experts=1", "integer >= 2"], None),
    (["run", "--estimator", "switch", "--experts", "4", "--model", "experts=16"], ["experts=4", "experts=16"],
     None),
    (["run", "--estimator", "switch", "--model", "nosuch=1"], ["nosuch", "n_layer"], None),
    # devices
    (["run", "--estimator", "switch", "--device", "bogus", *TINY_RUN], ["bogus", "cpu"], None),
    (["run", "--estimator", "switch", "--device", "cuda:7", *TINY_RUN], ["cuda:7", "not available", "cpu"], None),
    # step counts no run could keep
    (["run", "--problem", "moe-regression", "--estimator", "switch", "--steps", "99999999999999"],
     ["steps=99999999999999", "10,000,000"], None),
    (["run", "--estimator", "switch", "--steps", "99999999999999"], ["steps=99999999999999", "10,000,000"], None),
    # results already there
    (["compare", "--problem", "moe-regression", "--estimators", "switch", "--samples", "20", "--out",
      "runs/compare"], ["runs/compare", "already holds results", "--out"], earlier_report),
    (["run", "--problem", "moe-regression", "--estimator", "switch", "--steps", "2", "--out", "out"],
     ["out", "already holds results", "--out"], earlier_synthetic_run),
    # study cells, all checked before the first runs
    (["study", "run", "bad.toml", "--results", "res"], ["samples", "lots"],
     study("compare", 'problem = "moe-regression"\nsamples = "lots"')),
    (["study", "run", "bad.toml", "--results", "res"], ["device", "bogus"],
     study("train", 'device = "bogus"\nsteps = 2')),
]


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args,words,before", CASES, ids=[" ".join(case[0][:6]) for case in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, monkeypatch, args, words, before):
    monkeypatch.chdir(tmp_path)
    if before:
        before(tmp_path)
    files = snapshot(tmp_path)
    result = CliRunner().invoke(main, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert snapshot(tmp_path) == files  # nothing written, nothing overwritten
