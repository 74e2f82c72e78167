"""A run setting is declared once (gradest.config.RUN_SETTINGS): TrainConfig, a study spec's types and defaults, the
record of a run (and so a study cell's hash), the `gradest run` options and the `--resume` check all come from that
one entry. A throwaway setting registered here reaches all of them with no other edit; every committed cell, its
stored configuration resolved again by today's code, keeps the hash it is filed under."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradest.config import RUN_SETTINGS, RunSetting, TrainConfig, register_run_setting, unregister_run_setting
from gradest.estimators.base import integer_at_least
from gradest.study import load_study, make_cell, parse_study

from helpers import cli

ROOT = Path(__file__).resolve().parents[1]
CELL_STORE = ROOT / "studies" / "cells"
TINY = ["--steps", "2", "--batch-size", "2", "--model", "n_layer=2", "--model", "d_model=16", "--model", "d_ff=32",
        "--model", "n_head=2", "--model", "block_size=16", "--eval-interval", "1", "--eval-batches", "1"]



@pytest.mark.slow
def test_every_committed_cell_resolves_again_to_its_hash():
    """Each committed cell's stored configuration, made into a cell by today's code (defaults filled, checked,
    optional settings at their defaults left out; every setting counts as given, so a preset fills nothing more),
    hashes to the directory it is filed under."""
    cells = sorted(CELL_STORE.glob("*/*/cell.json"))
    assert cells
    for path in cells:
        stored = json.loads(path.read_text())
        cell = make_cell(stored["kind"], stored["config"], CELL_STORE, given=stored["config"])
        assert cell.hash == path.parent.name, path.parent
        assert cell.config == stored["config"]


@pytest.fixture
def patience():
    """A throwaway run setting, added the way a contributor would (one table entry): read by nothing in the loop,
    so it changes no number, only the record of a run."""
    setting = register_run_setting(RunSetting("patience", 0, integer_at_least(0), "evaluations without improvement "
                                              "before stopping (0: never)", int, stored="set"))
    try:
        yield setting
    finally:
        unregister_run_setting(setting.name)


def test_a_new_setting_reaches_the_config_the_cli_the_spec_the_hash_and_resume(patience, tmp_path):
    assert TrainConfig().patience == 0 and "patience" not in TrainConfig().settings()  # stored only when set
    assert TrainConfig(patience=3).settings()["patience"] == 3
    with pytest.raises(Exception, match="invalid run setting patience=-1; valid: an integer >= 0"):
        TrainConfig(patience=-1)

    out = tmp_path / "run"
    result = cli("run", "--estimator", "switch", *TINY, "--patience", "3", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["config"]["patience"] == 3
    refused = cli("run", "--resume", out, "--steps", "3", "--patience", "4")
    assert refused.exit_code == 2 and "--patience 4 (the run's: --patience 3)" in refused.output
    resumed = cli("run", "--resume", out, "--steps", "3", "--patience", "3")  # its own value is no change
    assert resumed.exit_code == 0, resumed.output

    spec = {"study": {"name": "p", "kind": "train"}, "grid": {"patience": [0, 5]},
            "settings": {"estimator": "switch", "steps": 2}}
    zero, five = sorted(parse_study(spec).cells(None, tmp_path), key=lambda c: c.config.get("patience", 0))
    assert "patience" not in zero.config and five.config["patience"] == 5
    plain = parse_study({**spec, "grid": {}}).cells(None, tmp_path)[0]
    assert plain.hash == zero.hash != five.hash  # at its default the cell is the one it was before the setting
    bad = {**spec, "grid": {}, "settings": {**spec["settings"], "patience": "soon"}}
    with pytest.raises(Exception, match="patience must be an integer, got 'soon'"):
        parse_study(bad).cells(None, tmp_path)


def test_the_table_drives_the_resume_check_and_the_options():
    """Only the settings the table marks resumable may change on --resume; every setting with an option is one."""
    assert {name for name, s in RUN_SETTINGS.items() if s.resumable} == {"steps", "device"}
    result = cli("run", "--help")
    for setting in RUN_SETTINGS.values():
        if setting.flag:
            assert setting.flag in result.output
    assert load_study(ROOT / "studies" / "ablations.toml").cells("quick", ROOT / "results-none")
