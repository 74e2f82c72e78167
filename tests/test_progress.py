"""Long work shows progress as lines a captured log keeps: `gradest.progress.Pace` (what the rest will take, a
line when slow work has been quiet), a line per estimator of `gradest compare`, per layer of `gradest doctor`,
per chunk of a long reference, and the start line and paced lines of `gradest run`."""

import logging
import re

import pytest

import gradest.progress
from gradest.estimators import Objective
from gradest.probe import SwitchSite, enumerate_reference, rao_blackwell_reference
from gradest.progress import Pace, duration_text

from helpers import cli
from test_probe import tiny_lm


class Clock:
    """time.perf_counter under the test's control."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(gradest.progress.time, "perf_counter", clock)
    return clock


def test_duration_text():
    assert [duration_text(s) for s in (0.4, 89, 90, 5399, 5400, 12600)] == ["0 s", "89 s", "2 min", "90 min",
                                                                             "1.5 h", "3.5 h"]


def test_pace_estimates_the_rest_after_the_first_unit_only_when_it_is_long(clock):
    quick = Pace(100)
    clock.now += 0.1  # 0.1 s a step: 9.9 s for the rest, too short to announce
    assert quick.remark(1) is None
    slow = Pace(100)
    clock.now += 2.0  # 2 s a step: 198 s for the other 99
    assert slow.remark(1) == "the first took 2.0 s: about 3 min for the rest at that pace"
    five = Pace(1000)
    clock.now += 5.0
    assert five.remark(5) == "the first 5 took 5.0 s: about 17 min for the rest at that pace"  # 995 s


def test_pace_speaks_after_quiet_seconds_and_an_outside_line_restarts_the_quiet(clock):
    pace = Pace(10)
    clock.now += 10
    assert pace.remark(1).startswith("the first took 10.0 s")  # 90 s left: announced
    clock.now += gradest.progress.QUIET_SECONDS - 1
    assert pace.remark(2) is None  # quiet for less than QUIET_SECONDS since the last line
    clock.now += 1
    assert pace.remark(3) == f"{10 + gradest.progress.QUIET_SECONDS:.0f} s elapsed, about 2 min left"  # 7 more at 40/3 s
    clock.now += gradest.progress.QUIET_SECONDS
    pace.shown()  # an evaluation line was printed
    assert pace.remark(4) is None
    clock.now += gradest.progress.QUIET_SECONDS
    assert pace.remark(10) is None  # the work is done: nothing left to announce


def test_tick_logs_what_how_far_and_the_remark(clock, caplog):
    pace = Pace(4, "samples")
    clock.now += 60
    with caplog.at_level(logging.INFO, logger="gradest"):
        pace.tick(1, "st")
    assert caplog.messages == ["st 1/4 samples: the first took 60.0 s: about 3 min for the rest at that pace"]


def test_a_long_reference_reports_its_pace(monkeypatch, caplog):
    """With QUIET_SECONDS at 0, every chunk of both references logs how far it is of how many sequences."""
    monkeypatch.setattr(gradest.progress, "QUIET_SECONDS", 0)
    model, batch = tiny_lm(seed=1)
    site = SwitchSite(model, batch, 0)
    with caplog.at_level(logging.INFO, logger="gradest"):
        enumerate_reference(site, Objective(1), max_elements=40)
        rao_blackwell_reference(site, Objective(1), draws=5, seed=0, max_elements=40)
    enumeration = [m for m in caplog.messages if "(enumeration)" in m]
    draws = [m for m in caplog.messages if "(Rao-Blackwell, 5 draws)" in m]
    assert len(enumeration) > 1 and len(draws) > 1, caplog.messages
    for lines in (enumeration, draws):
        counts = [tuple(map(int, re.search(r" ([\d,]+)/([\d,]+) sequences", m).group(1, 2))) for m in lines]
        done = [d for d, _ in counts]
        assert done == sorted(done) and counts[-1][0] < counts[-1][1]  # the last chunk has nothing left to say
        assert len({total for _, total in counts}) == 1


def test_compare_prints_a_line_per_estimator_before_its_table(tmp_path):
    result = cli("compare", "--problem", "moe-regression", "--estimators", "switch,st,reinforce", "--samples", 20,
                 "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    progress = [line for line in lines if line.startswith("compare ")]
    assert [re.sub(r", \d+ s elapsed$", "", line) for line in progress] == [
        f"compare {i}/3: moe-regression (n=4, k=1), {name}" for i, name in enumerate(["switch", "st", "reinforce"], 1)]
    assert lines.index(progress[-1]) < next(i for i, line in enumerate(lines) if line.startswith("estimator"))


def test_run_announces_itself_and_paces_slow_steps(tmp_path, monkeypatch):
    """The start line names the run and its memory; with QUIET_SECONDS at 0 every step between evaluations has a
    line, in order (a run of slow steps is never silent)."""
    monkeypatch.setattr(gradest.progress, "QUIET_SECONDS", 0)
    result = cli("run", "--estimator", "st", "--steps", 6, "--eval-interval", 3, "--batch-size", 4,
                 "--model", "n_layer=2", "--model", "d_model=16", "--model", "d_ff=16", "--model", "n_head=2",
                 "--model", "block_size=16", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"st on lm: 6 steps of 4 sequences of 16 tokens, peak memory about \S+ [MG]B of the "
                        r"\S+ [MG]B available", lines[0]), lines[0]
    steps = [int(re.match(r"step (\d+)/6: train loss", line).group(1)) for line in lines if line.startswith("step ")]
    assert steps == [1, 2, 3, 4, 5, 6], lines
    assert "the first took" in lines[1] and "val loss" in lines[3] and "val loss" in lines[6]
