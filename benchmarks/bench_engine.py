"""Vectorised gradient samples vs a Python loop of K backward passes, measured in the same process.

Target: K = 2000 samples on moe-regression (n = 8, 64 tokens), router weights as target: >= 20x.
Run: python benchmarks/bench_engine.py [--samples 2000] [--repeats 3]
"""

import argparse
import statistics
import time

import torch

from gradest.estimators import get_estimator
from gradest.measure import gradient_samples, gradient_samples_loop
from gradest.problems import make_problem


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--estimators", default="sparsemixer,reinforce,reinmax,exact")
    args = parser.parse_args()
    problem = make_problem(problem="moe-regression", experts=8, tokens=64, dim=16, out_dim=8, seed=0)
    print(f"moe-regression n=8 T=64 dim=16 out_dim=8, K={args.samples}, wrt=router, float64, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'estimator':<14} {'vectorised s':>12} {'loop s':>9} {'speed-up':>9}")
    for name in args.estimators.split(","):
        estimator = get_estimator(name)
        fast, fast_median, a = best_of(lambda: gradient_samples(problem, estimator, args.samples, seed=1),
                                       args.repeats)
        slow, slow_median, b = best_of(lambda: gradient_samples_loop(problem, estimator, args.samples, seed=1),
                                       args.repeats)
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), "vectorised and loop disagree"
        print(f"{name:<14} {fast:>12.4f} {slow:>9.3f} {slow / fast:>8.1f}x   (medians {fast_median:.4f} / "
              f"{slow_median:.3f})")


if __name__ == "__main__":
    main()
