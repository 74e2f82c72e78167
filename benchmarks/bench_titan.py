"""A torchtitan Qwen3-MoE (the `debugmodel_moe` blocks, shrunk) patched by gradest.titan against the unpatched model.

Issue targets (CPU, float32): a training step (forward, backward, AdamW) with `topk` (torchtitan's own rule, k=2)
costs <= 1.03x the native one, with `sparsemixer` (k=1 model) <= 1.05x. Both models run in one process with the
same weights, interleaved (the order alternating every repeat), and each ratio is the median of the per-pair
ratios (robust to a busy machine), printed with the medians of each side and tokens/s.
Run: python benchmarks/bench_titan.py [--dim 256] [--layers 4] [--experts 8] [--seq 256] [--batch 8] [--repeats 15]
     [--estimators topk:2,sparsemixer:1] [--device cpu] [--dtype float32]
"""

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def measure(args, estimator: str, k: int) -> dict:
    from gradest import titan
    from gradest.titan.models import build_model, forward, qwen3_moe_config

    config = lambda: qwen3_moe_config(dim=args.dim, layers=args.layers, heads=4, kv_heads=2, head_dim=args.dim // 4,
                                      hidden=2 * args.dim, experts=args.experts, top_k=k, vocab=args.vocab,
                                      max_seq_len=args.seq)
    native = build_model(config(), seed=0, device=args.device)
    patched = build_model(config(), seed=0, device=args.device)
    titan.patch(patched, estimator)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(args.device)
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (native, patched)}
    dtype = getattr(torch, args.dtype)

    def step(m):
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32):
            logits = forward(m, ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizers[id(m)].step()
        optimizers[id(m)].zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step(native), step(patched)
    ratios, times = [], {"native": [], "patched": []}
    for r in range(args.repeats):
        order = [("native", native), ("patched", patched)][:: 1 if r % 2 == 0 else -1]
        pair = {name: step(m) for name, m in order}
        for name in pair:
            times[name].append(pair[name])
        ratios.append(pair["patched"] / pair["native"])
    tokens = args.batch * args.seq
    return {"estimator": estimator, "k": k, "ratio": statistics.median(ratios),
            "native_s": statistics.median(times["native"]), "patched_s": statistics.median(times["patched"]),
            "tokens_per_s": tokens / statistics.median(times["patched"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--estimators", default="topk:2,sparsemixer:1", help="NAME:K,... (K: the model's top_k)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    print(f"torchtitan Qwen3-MoE: dim {args.dim}, {args.layers} layers, {args.experts} experts, batch {args.batch} x "
          f"{args.seq} tokens, {args.device} {args.dtype}, {args.repeats} interleaved pairs, {torch.get_num_threads()} "
          f"threads")
    for item in args.estimators.split(","):
        name, k = item.rsplit(":", 1)
        row = measure(args, name, int(k))
        print(f"{row['estimator']:>14} k={row['k']}: {row['ratio']:.3f}x native  (native {row['native_s'] * 1e3:.1f} ms, "
              f"patched {row['patched_s'] * 1e3:.1f} ms, {row['tokens_per_s']:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
