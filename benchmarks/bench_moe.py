"""MoE layer (n experts, top-1) forward + backward vs a dense FFN of one expert's size, on the same tokens.

Issue target: the MoE layer costs <= 1.5x the dense FFN (it does the same FLOPs per token plus routing and
dispatch). Both run in the same process, alternating, best and median of several repeats.
Run: python benchmarks/bench_moe.py [--tokens 8192] [--d-model 256] [--d-ff 1024] [--experts 8] [--repeats 10]
     [--skew 0]   (> 0: tokens lean towards expert 0's router direction, so that expert loads are uneven)
     [--profile]   (adds a torch.profiler table of each layer's step, to see where dispatch time goes)
"""

import argparse
import statistics
import time

import torch
from torch import nn

from gradest.estimators import get_estimator
from gradest.moe import MoE


def one_step(module, x, grad_y, extra_loss, autocast) -> float:
    """Seconds for one forward + backward (synchronised on a GPU)."""
    module.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast:
        y = module(x)
    ((y.float() * grad_y).sum() + extra_loss(module)).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def no_extra_loss(module):
    return 0


def balance_loss(moe):
    return moe.aux.balance_loss  # what a trainer adds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--estimators", default="switch,sparsemixer")
    parser.add_argument("--skew", type=float, default=0.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, device=args.device)
    grad_y = torch.randn(args.tokens, args.d_model, device=args.device)
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                              enabled=args.dtype == "bfloat16")
    dense = nn.Sequential(nn.Linear(args.d_model, args.d_ff, bias=False), nn.GELU(),
                          nn.Linear(args.d_ff, args.d_model, bias=False)).to(args.device)
    print(f"tokens={args.tokens} d_model={args.d_model} d_ff={args.d_ff} experts={args.experts} top-1, {args.dtype}, "
          f"skew {args.skew}, {args.device},\n"
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    moes = {f"MoE {name}": MoE(args.d_model, args.d_ff, args.experts, get_estimator(name)).to(args.device)
            for name in args.estimators.split(",")}
    router = next(iter(moes.values())).router.weight.detach()
    with torch.no_grad():
        for moe in moes.values():  # one router for all, so that every MoE sees the same expert loads
            moe.router.weight.copy_(router)
    if args.skew:
        x += args.skew * router[0] / router[0].norm()
    layers = {"dense FFN": (dense, no_extra_loss), **{label: (moe, balance_loss) for label, moe in moes.items()}}
    # steps interleaved (one of each layer per round, after a warm-up round) so that every layer sees the same
    # machine state; best-of-repeats is the figure least disturbed by other processes
    times = {label: [] for label in layers}
    for round_ in range(args.repeats + 1):
        for label, (module, extra_loss) in layers.items():
            seconds = one_step(module, x, grad_y, extra_loss, autocast)
            if round_:
                times[label].append(seconds)
    dense_best, dense_median = min(times["dense FFN"]), statistics.median(times["dense FFN"])
    print(f"{'layer':<16} {'best ms':>8} {'median ms':>10} {'ratio best':>11} {'ratio median':>13}")
    for label, (module, extra_loss) in layers.items():
        best, median = min(times[label]), statistics.median(times[label])
        load = f"   tokens per expert {module.aux.stats['tokens_per_expert']}" if isinstance(module, MoE) else ""
        print(f"{label:<16} {1e3 * best:>8.1f} {1e3 * median:>10.1f} {best / dense_best:>10.2f}x "
              f"{median / dense_median:>12.2f}x{load}")
    if args.profile:
        for label, (module, extra_loss) in layers.items():
            with torch.profiler.profile() as prof:
                for _ in range(3):
                    one_step(module, x, grad_y, extra_loss, autocast)
            print(label, "(3 steps)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
