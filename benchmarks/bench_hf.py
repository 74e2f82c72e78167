"""A transformers Mixtral patched by gradest.hf with `topk` (its native routing rule) against the unpatched model.

Issue target: the patched training step (forward + backward) costs <= 1.05x the native one on the CPU. Both run
on the same model in one process, interleaved (patch, step, undo; step), the order alternating every repeat, and
the ratio is the median of the per-pair ratios (robust to a busy machine), with the medians of each side.
Run: python benchmarks/bench_hf.py [--hidden 256] [--layers 4] [--experts 8] [--k 2] [--seq 128] [--batch 8]
     [--repeats 15] [--estimator topk] [--dtype float32]
"""

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--estimator", default="topk")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--experts-implementation", default=None, help="eager, grouped_mm, ... (model default)")
    args = parser.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM, MixtralConfig

    from gradest import hf

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                           num_local_experts=args.experts, num_experts_per_tok=args.k, vocab_size=args.vocab,
                           max_position_embeddings=max(args.seq, 128))
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, args.dtype)).train()
    if args.experts_implementation:
        model.set_experts_implementation(args.experts_implementation)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        return time.perf_counter() - start

    def patched_step() -> float:
        with hf.patch(model, args.estimator):
            return step()

    with hf.patch(model, args.estimator) as patched:
        print(f"{patched}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"experts implementation {model.config._experts_implementation}, {args.dtype}, "
          f"tokens {args.batch}x{args.seq}")
    for _ in range(args.warmup):
        step(), patched_step()
    native, ours = [], []
    for r in range(args.repeats):
        order = (step, patched_step) if r % 2 == 0 else (patched_step, step)
        times = {fn: fn() for fn in order}
        native.append(times[step])
        ours.append(times[patched_step])
    ratios = [o / n for o, n in zip(ours, native)]
    print(f"native  step: median {statistics.median(native) * 1e3:8.1f} ms, best {min(native) * 1e3:8.1f} ms")
    print(f"patched step: median {statistics.median(ours) * 1e3:8.1f} ms, best {min(ours) * 1e3:8.1f} ms")
    print(f"ratio patched/native: median of pairs {statistics.median(ratios):.3f}x, "
          f"best/best {min(ours) / min(native):.3f}x (target <= 1.05x)")


if __name__ == "__main__":
    main()
