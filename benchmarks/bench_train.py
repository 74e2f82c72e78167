"""Training-step time of the default Switch LM with each estimator against `switch`, in one process, and the
default run's tokens/s and model-FLOPs utilisation (MFU) against this machine's measured matmul peak.

Target: sparsemixer / switch step time <= 1.03x (the paper reports the same time per update).
Steps of the estimators are interleaved so that machine noise hits all of them alike; the ratio is of medians.
Run: python benchmarks/bench_train.py [--steps 30] [--estimators sparsemixer,first-order] [--device cuda --dtype bfloat16]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gradest.train import Trainer, TrainConfig


def matmul_peak(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul: the ceiling MFU is measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / min(times[2:])


def flops_per_token(trainer: Trainer) -> float:
    """PaLM's estimate: 6 N_active (embedding and head excluded) + 12 L T d for attention, forward and backward."""
    model, c = trainer.model, trainer.model.config
    embedding = model.decoder.tok.weight.numel() + model.decoder.pos.weight.numel()
    active = model.num_parameters(active=True) - embedding
    return 6 * active + 12 * c.n_layer * trainer.config.model.block_size * c.d_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--estimators", default="sparsemixer,first-order,sparsemixer-v2,reinmax")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    names = ["switch", *args.estimators.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: Trainer(TrainConfig(estimator=name, device=args.device, dtype=args.dtype,
                                              steps=10 ** 6), Path(tmp) / name.replace("*", "star"))
                    for name in names}
        times = {name: [] for name in names}
        for step in range(args.steps + 3):
            for name, trainer in trainers.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                trainer.train_step()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if step >= 3:  # warm-up steps excluded
                    times[name].append(time.perf_counter() - start)
    default = trainers["switch"].config
    tokens = default.batch_size * default.model.block_size
    peak = matmul_peak(args.device, torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    print(f"default Switch LM: {trainers['switch'].model.num_parameters() / 1e6:.2f} M parameters, "
          f"{tokens} tokens/step, {args.device} {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; matmul peak {peak / 1e9:.1f} GFLOP/s")
    base = statistics.median(times["switch"])
    print(f"{'estimator':<16} {'median step s':>13} {'vs switch':>10} {'tokens/s':>9} {'MFU':>6}")
    for name in names:
        median = statistics.median(times[name])
        mfu = flops_per_token(trainers[name]) * tokens / median / peak
        print(f"{name:<16} {median:>13.4f} {median / base:>9.3f}x {tokens / median:>9.0f} {mfu:>6.1%}")


if __name__ == "__main__":
    main()
