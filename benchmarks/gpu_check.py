"""One prepared GPU run: every estimator on CUDA gives the CPU's numbers, routes float32/bf16 logits, and the
vectorised engine's speed on the GPU. Needs a CUDA device; prints a table, writes JSON to --out if given.

Run: python benchmarks/gpu_check.py [--out results.json]
"""

import argparse
import json
import time

import torch

from gradest.estimators import REGISTRY, expand_estimators
from gradest.measure import gradient_samples, gradient_samples_loop
from gradest.problems import make_problem

SIZES = {"moe-regression": dict(experts=4, tokens=6, dim=4, out_dim=3),
         "moe-classify": dict(experts=4, tokens=6, dim=4, out_dim=3, classes=3),
         "poly": dict(experts=3, tokens=6)}


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "agreement": [], "dtypes": [],
              "speed": []}

    # 1. CPU and CUDA give the same gradient samples (float64, same noise), every estimator, top-1 and top-2
    worst = 0.0
    for name, sizes in SIZES.items():
        for k in (1, 2):
            cpu = make_problem(problem=name, top_k=k, seed=1, **sizes)
            gpu = make_problem(problem=name, top_k=k, seed=1, **sizes).to("cuda")
            for estimator in expand_estimators("all", cpu.kind, k):
                a = gradient_samples(cpu, estimator, 64, "all", seed=2)
                b = gradient_samples(gpu, estimator, 64, "all", seed=2).cpu()
                err = float((a - b).norm() / a.norm().clamp_min(1e-300))
                worst = max(worst, err)
                report["agreement"].append({"problem": name, "k": k, "estimator": estimator.label, "rel_err": err})
    print(f"CPU vs CUDA gradient samples, float64, {len(report['agreement'])} cases: worst relative error "
          f"{worst:.2e}")

    # 2. routing float32 and bf16 logits on CUDA, training and inference, and float32 logits under bf16 autocast
    for name, cls in REGISTRY.items():
        estimator = cls(k=2) if cls.supports_topk else cls()
        for dtype in (torch.float32, torch.bfloat16):
            z = torch.randn(4096, 8, device="cuda", dtype=dtype, requires_grad=True)
            for training in (True, False):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    routing = estimator.route(z, training=training)
                ok = bool(torch.isfinite(routing.gates).all())
                routing.gates.float().sum().backward()
                ok &= bool(torch.isfinite(z.grad).all())
                z.grad = None
                report["dtypes"].append({"estimator": name, "dtype": str(dtype), "training": training, "ok": ok,
                                         "gate_dtype": str(routing.gates.dtype)})
    bad = [r for r in report["dtypes"] if not r["ok"]]
    print(f"routing float32/bf16 logits on CUDA: {len(report['dtypes']) - len(bad)} ok, {len(bad)} not: {bad}")

    # 3. the vectorised engine on the GPU: against a loop on the GPU, and against the CPU
    print(f"{'estimator':<14} {'K':>6} {'GPU vec s':>10} {'GPU loop s':>11} {'vec/loop':>9} {'CPU vec s':>10}")
    for name in ("sparsemixer", "reinforce", "reinmax", "exact"):
        cpu = make_problem(problem="moe-regression", experts=8, tokens=64, dim=16, out_dim=8, seed=0)
        gpu = make_problem(problem="moe-regression", experts=8, tokens=64, dim=16, out_dim=8, seed=0).to("cuda")
        estimator = expand_estimators([name], cpu.kind, 1)[0]
        for K in (2000, 20000):
            vec = timed(lambda: gradient_samples(gpu, estimator, K, seed=1))
            loop = timed(lambda: gradient_samples_loop(gpu, estimator, 200, seed=1), repeats=1) * K / 200
            host = timed(lambda: gradient_samples(cpu, estimator, K, seed=1), repeats=2)
            report["speed"].append({"estimator": name, "K": K, "gpu_vectorised_s": vec, "gpu_loop_s_est": loop,
                                    "cpu_vectorised_s": host})
            print(f"{name:<14} {K:>6} {vec:>10.4f} {loop:>11.3f} {loop / vec:>8.0f}x {host:>10.4f}")
    # 4. gradest.titan on the GPU (needs the titan extra): a torchtitan Qwen3-MoE training step under bf16 autocast,
    # grouped experts (torch._grouped_mm), patched against native; targets topk <= 1.03x, sparsemixer <= 1.05x
    try:
        import importlib
        bench_titan = importlib.import_module("bench_titan")
    except ImportError as error:
        print(f"gradest.titan: skipped ({error})")
    else:
        titan_args = argparse.Namespace(dim=1024, layers=4, experts=8, seq=1024, batch=8, vocab=32000, repeats=15,
                                        warmup=3, device="cuda", dtype="bfloat16")
        report["titan"] = []
        for name, k in (("topk", 2), ("sparsemixer", 1)):
            row = bench_titan.measure(titan_args, name, k)
            report["titan"].append(row)
            print(f"gradest.titan {name} k={k}: {row['ratio']:.3f}x native, {row['tokens_per_s']:,.0f} tokens/s (bf16)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
