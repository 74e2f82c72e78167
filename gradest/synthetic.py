"""Training on a synthetic problem: does an estimator's gradient lower the exact objective J as fast as J's own
gradient does?

An estimator's bias and variance (measure.py) say how good one gradient is; this says what they cost along a
whole optimisation. Every parameter of the problem is trained with Adam from one gradient sample per step, and J
(the common objective: top-k of softmax(z), no mask) is evaluated exactly after each step, next to a run that
follows the exact gradient from the same start.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import pandas as pd
import torch

from gradest.errors import GradestError
from gradest.estimators import Estimator, get_estimator
from gradest.estimators.base import MAX_STEPS, NonFiniteLogits, check_settings, integer_between, learning_rate
from gradest.problems import Problem, ProblemConfig, make_problem
from gradest.progress import Pace

SYNTHETIC_STEPS = 300  # `gradest run --problem P` defaults
SYNTHETIC_LR = 0.05

# progress(items, description) -> the same items, e.g. wrapped in a progress bar
Progress = Callable[[Iterable, str], Iterable]


def train_synthetic(config: ProblemConfig, estimator: Estimator, steps: int = SYNTHETIC_STEPS,
                    lr: float = SYNTHETIC_LR, seed: int = 0,
                    progress: Progress | None = None) -> pd.DataFrame:
    """Train the problem's parameters with `estimator` and, from the same start, with the exact gradient.

    One row per step (step 0 is the initial parameters): the exact objective J, the estimator's own objective
    (J under the mask and temperature it samples with; equal to J for most), and the loss under deterministic
    inference routing (each run routes with its own estimator's inference rule), for both runs, and `seconds`,
    the estimator run's cumulative time in forward, backward and optimiser steps (evaluation excluded). The
    routing noise comes from a generator seeded with `seed`, so the same arguments give the same numbers.
    """
    check_settings("run", {"steps": steps}, {"steps": integer_between(1, MAX_STEPS)})
    if not learning_rate(lr):
        raise GradestError(f"lr must be {learning_rate.text}, got {lr!r}")
    from gradest.memory import check_compare
    check_compare([config], lambda _: [estimator], 1, "all")  # one sample a step, every parameter
    problem = make_problem(config)
    estimator.check(problem.n, problem.kind)
    exact = get_estimator("exact", k=config.top_k)
    trained = _train(problem, estimator, steps, lr, seed, progress)
    reference = _train(problem, exact, steps, lr, seed, progress)
    return pd.DataFrame({"step": range(steps + 1),
                         "objective": trained["objective"],
                         "own_objective": trained["own_objective"],
                         "inference_loss": trained["inference_loss"],
                         "objective_exact_run": reference["objective"],
                         "inference_loss_exact_run": reference["inference_loss"],
                         "seconds": trained["seconds"]})


def diverged(estimator: Estimator, step: int, lr: float, what: str) -> GradestError:
    return GradestError(f"the {estimator.label} run diverged at step {step} ({what}); nothing was written; try a "
                        f"lower --lr, e.g. --lr {lr / 10:g} (a tenth of {lr:g})")


def _train(problem: Problem, estimator: Estimator, steps: int, lr: float, seed: int,
           progress: Progress | None) -> dict[str, list[float]]:
    params = {name: p.detach().clone().requires_grad_() for name, p in problem.params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    # every step's routing randomness from one seeded generator (the numbers draw_noise would give for all steps
    # at once, drawn a step at a time): global RNG state plays no part, and memory does not grow with steps
    generator = torch.Generator().manual_seed(seed)
    noise_shape = (problem.T, estimator.noise_dim(problem.n))
    history = {"objective": [], "own_objective": [], "inference_loss": [], "seconds": []}
    elapsed = 0.0

    def record():
        history["objective"].append(problem.objective_value(params))
        history["own_objective"].append(problem.objective_value(params, estimator.objective()))
        with torch.no_grad():
            history["inference_loss"].append(problem.loss(params, estimator, training=False)[0].item())
        history["seconds"].append(elapsed)

    record()
    step_indices, pace = range(steps), Pace(steps)
    for step in (progress(step_indices, estimator.label) if progress else step_indices):
        start = time.perf_counter()
        optimizer.zero_grad()
        noise = torch.rand(noise_shape, generator=generator, dtype=torch.float64).to(problem.device)
        try:
            loss, _ = problem.loss(params, estimator, noise=noise)
        except NonFiniteLogits:  # parameters blown up by the last update reach the router first
            raise diverged(estimator, step, lr, "router logits NaN or inf") from None
        loss.sum().backward()
        optimizer.step()
        if not all(torch.isfinite(p).all() for p in params.values()):
            raise diverged(estimator, step + 1, lr, "parameters NaN or inf")
        elapsed += time.perf_counter() - start
        record()
        pace.tick(step + 1, f"{estimator.label} on {problem.config.problem}")
    return history
