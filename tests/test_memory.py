"""gradest.memory: the peak-memory estimates behind the memory check, against the peak a process really reaches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradest.errors import GradestError
from gradest import memory

# Runs one configuration in a fresh process: its estimate, and the growth of its peak resident memory (VmHWM)
# over its resident memory once gradest is imported, i.e. what the work itself took.
MEASURE = """
import json, resource, sys, tempfile
from pathlib import Path
import torch
torch.set_num_threads(1)
from gradest import memory
def resident():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()
kind, *args = sys.argv[1:]
if kind == "compare":
    from gradest.estimators import expand_estimators
    from gradest.measure import compare
    from gradest.problems import ProblemConfig
    spec, samples, tokens, experts, k = args[0], *map(int, args[1:])
    config = ProblemConfig(problem="moe-regression", tokens=tokens, experts=experts, top_k=k)
    (estimator,) = expand_estimators([spec], "gated", k, {})
    estimate, before = memory.compare_peak(config, estimator, samples, "router"), resident()
    compare([config], [spec], samples=samples)
else:
    from gradest.config import TrainConfig
    from gradest.train import Trainer
    batch, length, width = map(int, args)
    config = TrainConfig(estimator="switch", batch_size=batch, block_size=length, steps=1,
                         model={"d_model": width, "d_ff": 4 * width, "n_head": 4})
    estimate, before = memory.switch_training_peak(config), resident()
    Trainer(config, Path(tempfile.mkdtemp())).train_step()
# VmHWM, the peak of THIS image: ru_maxrss survives exec, so a child of a large process (pytest with transformers
# and torchtitan loaded) would report its parent's size as its own peak
with open("/proc/self/status") as handle:
    hwm = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
peak = hwm * 1024 - before
print(json.dumps({"estimate": estimate, "peak": peak}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status: Linux")
@pytest.mark.parametrize("case", [
    ["compare", "reinforce", "200", "16", "8", "4"],  # the exact gradient's 1680 expert tuples per token
    ["compare", "rb-gumbel:draws=20", "500", "64", "8", "1"],  # noise and relaxed samples of 20 draws x 8 experts
    ["compare", "st", "20000", "64", "8", "1"],  # K x P per-sample gradients, chunked passes
    ["train", "16", "256", "128"],  # a Switch training step: parameters, Adam, activations
])
def test_the_estimate_bounds_the_real_peak_within_a_small_factor(case):
    """The estimate is an upper bound of what the work adds to the process's peak memory, and at most 6 times it
    (measured: 1.5 to 5 times on these configurations): the check refuses what cannot fit without refusing what
    easily does. The slack is in the constants (SAVED activations a layer keeps, BASE for the process)."""
    result = subprocess.run([sys.executable, "-c", MEASURE, *case], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["peak"] <= numbers["estimate"] <= 6 * numbers["peak"], numbers


def test_available_memory_is_known_on_linux():
    available = memory.available_bytes()
    assert available is None or available > 0
    if sys.platform.startswith("linux"):
        assert isinstance(available, int) and available > 0


def test_the_check_names_both_numbers_and_what_to_shrink(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 2 ** 30)
    memory.check_memory(2 ** 29, "this run", "shrink it")  # fits: nothing happens
    with pytest.raises(GradestError) as error:
        memory.check_memory(3 * 2 ** 30, "this run", "shrink --batch-size")
    assert str(error.value) == ("this run would need about 3 GB of memory at its peak, more than the 1 GB available "
                                "on this machine (cpu); shrink --batch-size")
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": None)
    memory.check_memory(10 ** 30, "this run", "shrink it")  # unknown: no refusal


def test_the_exact_gradient_enumeration_dominates_large_top_k():
    from gradest.estimators import get_estimator
    from gradest.problems import ProblemConfig
    small = memory.compare_peak(ProblemConfig(experts=16, top_k=2), get_estimator("topk", k=2), 100, "router")
    large = memory.compare_peak(ProblemConfig(experts=16, top_k=8), get_estimator("topk", k=8), 100, "router")
    assert memory.enumerated_tuples(16, 8) == 518918400 and large > 1000 * small
