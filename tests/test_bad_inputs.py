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
from gradest.errors import GradestError

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
    (["run", "--estimator", "switch", "--model", "n_layer=1"], ["n_layer=1", "moe_every=2", "no MoE layer"], None),
    (["figures", "--reports", "nowhere"], ["--reports nowhere", "not a directory"], None),
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


def checkpoint(step=2, hf=False, **changes):
    """A run directory `ck/` whose checkpoint loads but does not fit: its `step`, and `changes` to its record of
    settings (None: the setting is missing); `hf`: a Hugging Face run's."""
    def write(path: Path):
        import torch
        from gradest.config import TrainConfig
        settings = TrainConfig(estimator="switch").settings()
        if hf:
            settings["hf"] = "mixtral"
        for key, value in changes.items():
            if value is None:
                settings.pop(key)
            else:
                settings[key] = value
        (path / "ck").mkdir()
        torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "data_generator": None, "rng": [], "step": step,
                    "rows": [], "seconds": 0.0, "config": settings}, path / "ck" / "checkpoint.pt")
    return write


def spec_bytes(data: bytes):
    def write(path: Path):
        (path / "bad.toml").write_bytes(data)
    return write


HUGE = str(2 ** 64)
HF_TINY = ["--hf", "mixtral", "--estimator", "topk", "--steps", "2"]
MORE_CASES = [
    # a checkpoint that loads but does not fit this gradest (row 1)
    (["run", "--resume", "ck", "--steps", "4"], ["ck/checkpoint.pt", "step is '2.5'", "integer >= 0"],
     checkpoint(step="2.5")),
    (["run", "--resume", "ck"], ["ck/checkpoint.pt", "step is 1.5"], checkpoint(step=1.5)),
    (["run", "--resume", "ck"], ["ck/checkpoint.pt", "newkey", "another version"], checkpoint(newkey=1)),
    (["run", "--resume", "ck"], ["ck/checkpoint.pt", "lr is missing"], checkpoint(lr=None)),
    (["compare", "--problem", "switch-lm", "--checkpoint", "ck", "--samples", "5"], ["newkey", "another version"],
     checkpoint(newkey=1)),
    (["compare", "--problem", "switch-lm", "--checkpoint", "ck", "--samples", "5"], ["Hugging Face run",
                                                                                    "hf=mixtral"],
     checkpoint(hf=True)),
    # options that would be ignored or write into the working directory (row 2)
    (["compare", "--problem", "moe-regression", "--checkpoint", "X"], ["--checkpoint", "switch-lm", "moe-regression"],
     None),
    (["compare", "--problem", "poly", "--seq-len", "4"], ["--seq-len", "hf"], None),
    (["compare", "--problem", "poly", "--out", ""], ["--out", "empty path"], None),
    (["run", "--problem", "poly", "--estimator", "st", "--out", ""], ["--out", "empty path"], None),
    (["doctor", "--hf", "mixtral", "--out", ""], ["--out", "empty path"], None),
    # sizes that cannot fit in memory, refused with both numbers before anything starts (row 3)
    (["run", "--estimator", "switch", "--model", "block_size=100000"], ["memory", "available", "block_size"], None),
    (["run", "--estimator", "switch", "--batch-size", "50000000"], ["memory", "available", "--batch-size"], None),
    (["run", "--estimator", "switch", "--model", "n_layer=1000000"], ["memory", "available", "n_layer"], None),
    (["compare", "--problem", "moe-regression", "--estimators", "rb-gumbel:draws=10000000"],
     ["rb-gumbel(draws=10000000)", "memory", "available", "draws"], None),
    (["compare", "--problem", "moe-regression", "--experts", "16", "--top-k", "8"],
     ["n=16, k=8", "memory", "expert tuples"], None),
    (["compare", "--problem", "moe-regression", "--samples", "10000000000"], ["K=10000000000", "memory"], None),
    (["run", "--problem", "moe-regression", "--estimator", "rb-gumbel:draws=10000000"], ["memory", "draws"], None),
    (["study", "run", "bad.toml", "--results", "res"], ["K=10000000000", "memory", "available"],
     study("compare", 'problem = "moe-regression"\nsamples = 10000000000')),
    (["study", "run", "bad.toml", "--results", "res"], ["memory", "block_size"],
     study("train", "block_size = 100000\nsteps = 2")),
    # integers beyond 64 bits, one declared range (row 4)
    (["run", "--estimator", "switch", "--batch-size", HUGE], ["batch_size", HUGE, "below 2**63"], None),
    (["run", "--estimator", "switch", "--model", f"d_model={HUGE}"], ["d_model", "below 2**63"], None),
    (["run", "--problem", "poly", "--estimator", "st", "--tokens", HUGE], ["--tokens", "below 2**63"], None),
    (["compare", "--problem", "poly", "--samples", HUGE], ["--samples", "below 2**63"], None),
    (["compare", "--problem", "poly", "--experts", HUGE], ["--experts", "below 2**63"], None),
    (["study", "run", "bad.toml", "--results", "res"], ["samples", "below 2**63", HUGE],
     study("compare", f'problem = "moe-regression"\nsamples = {HUGE}')),
    (["study", "run", "bad.toml", "--results", "res"], ["tokens", "below 2**63"],
     study("compare", f'problem = "moe-regression"\ntokens = {HUGE}')),
    # a spec that is not UTF-8 (row 6)
    (["study", "run", "bad.toml"], ["bad.toml", "not UTF-8", "0xff"], spec_bytes(b'[study]\nname = "x\xff"\n')),
    (["report", "bad.toml"], ["bad.toml", "not UTF-8"], spec_bytes(b"\xfe\xff[study]")),
    (["study", "status", "bad.toml"], ["bad.toml", "not UTF-8"], spec_bytes(b"\xfe\xff[study]")),
    # learning rates and scales that overflow (row 7)
    (["run", "--estimator", "switch", "--lr", "1e308", *TINY_RUN], ["lr=1e+308", "<= 1e+06"], None),
    (["run", "--problem", "moe-regression", "--estimator", "st", "--lr", "1e308"], ["lr", "<= 1e+06"], None),
    (["compare", "--problem", "moe-regression", "--sharpness", "1e300"], ["sharpness", "<= 1e+06"], None),
    # refused after the settings, before the run directory (rows 8-10)
    (["run", "--estimator", "reinforce:baseline=mean", "--batch-size", "1", *TINY_RUN[:2], *TINY_RUN[4:]],
     ["reinforce(baseline=mean)", "batch of at least 2", "batch_size=1"], None),
    (["run", *HF_TINY, "--hf-set", "num_attention_heads=5"], ["num_attention_heads=5", "hidden_size=64"], None),
    (["run", *HF_TINY, "--hf-set", "num_key_value_heads=3"], ["num_key_value_heads=3", "valid"], None),
    (["run", *HF_TINY, "--hf-set", "num_hidden_layers=0"], ["num_hidden_layers=0", ">= 1"], None),
    (["run", *HF_TINY, "--hf-set", "num_hidden_layers=-2"], ["num_hidden_layers=-2", ">= 1"], None),
    (["run", *HF_TINY, "--hf-set", "num_local_experts=0"], ["num_local_experts=0", "at least one expert"], None),
    # more of the same spirit
    (["run", "--estimator", "switch", "--lr", "nan", *TINY_RUN], ["lr=nan"], None),
    (["run", "--estimator", "switch", "--weight-decay", "inf", *TINY_RUN], ["weight_decay=inf"], None),
    (["compare", "--problem", "poly", "--sharpness", "nan"], ["sharpness", "nan"], None),
    (["run", "--estimator", "st", "--set", "tau=nan", *TINY_RUN], ["tau", "nan"], None),
    (["--threads", "0", "list"], ["--threads", "0", "1 to 1,024"], None),
    (["--threads", HUGE, "list"], ["--threads", "1 to 1,024"], None),
    (["study", "run", "bad.toml", "--jobs", "0"], ["--jobs", "0"], study("compare", 'problem = "poly"')),
    (["study", "run", "."], ["."], None),
    (["compare", "--problem", "switch-lm", "--checkpoint", "nowhere"], ["nowhere"], None),
    (["compare", "--problem", "poly", "--samples", "2"], ["--samples", "2", ">= 3"], None),
    (["compare", "--problem", "hf", "--hf", "mixtral", "--seq-len", "100000"], ["memory", "--seq-len"], None),
    (["doctor", "--hf", "mixtral", "--seq-len", "100000"], ["memory", "--seq-len"], None),
    (["run", *HF_TINY, "--model", "block_size=100000"], ["memory", "block_size"], None),
]


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


ALL_CASES = CASES + MORE_CASES


@pytest.mark.parametrize("args,words,before", ALL_CASES, ids=[" ".join(case[0][:7]) for case in ALL_CASES])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, monkeypatch, args, words, before):
    monkeypatch.chdir(tmp_path)
    if "hf" in args or "--hf" in args:
        pytest.importorskip("transformers")
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


def test_a_leave_one_out_baseline_needs_two_sequences_in_each_process(monkeypatch):
    """Under torchrun each process scores its own share of the batch: REINFORCE's leave-one-out mean needs two
    sequences in every share, not in the whole batch."""
    from gradest.config import TrainConfig
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(GradestError, match=r"at least 2 sequences in each process, got batch_size=4 over 4 "
                                           r"processes \(1 each\); valid: batch_size >= 8"):
        TrainConfig(estimator="reinforce:baseline=mean", batch_size=4).build_estimator()
    assert TrainConfig(estimator="reinforce:baseline=mean", batch_size=8).build_estimator().min_batch == 2


def test_the_study_memory_check_covers_this_shards_cells_only(tmp_path, monkeypatch):
    """A cell too large for this machine is refused when this machine would run it, and not when another
    shard (another machine) has it."""
    from gradest.study import load_study
    from gradest.study.spec import shard
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(textwrap.dedent("""
        [study]
        name = "sizes"
        kind = "compare"
        description = "a small cell and one too large for any machine"
        [grid]
        samples = [20, 10000000000]
        [settings]
        problem = "moe-regression"
        estimator = "switch"
        """))
    spec = load_study(tmp_path / "s.toml")
    cells = spec.cells(None, tmp_path / "res")
    small = next(i for i in range(2) if shard(cells, i, 2)[0].config["samples"] == 20)
    refused = CliRunner().invoke(main, ["study", "run", "s.toml", "--results", "res", "--shard", f"{1 - small}/2"])
    assert refused.exit_code == 2 and "memory" in refused.output and not (tmp_path / "res").exists(), refused.output
    ran = CliRunner().invoke(main, ["study", "run", "s.toml", "--results", "res", "--shard", f"{small}/2"])
    assert ran.exit_code == 0, ran.output
    assert [cell.done for cell in spec.cells(None, tmp_path / "res")] == [i == small for i in range(2)]
