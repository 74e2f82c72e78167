#!/usr/bin/env bash
# One prepared GPU run for the Switch Transformer: the MoE layer against a dense FFN, training-step time
# of each estimator against switch with tokens/s and MFU, and the default run, all on CUDA in bf16 (and fp32 for
# the layer). Writes logs under $OUT (or ./gpu-out). Run from the repository root on a CUDA machine.
set -euo pipefail
out="${OUT:-gpu-out}"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
for dtype in bfloat16 float32; do
  python3 benchmarks/bench_moe.py --device cuda --dtype $dtype --tokens 65536 --d-model 1024 --d-ff 4096 \
    --repeats 20 2>&1 | tee "$out/moe_$dtype.log"
done
python3 benchmarks/bench_train.py --device cuda --dtype bfloat16 --steps 40 2>&1 | tee "$out/train_bf16.log"
python3 -m gradest.cli run --estimator sparsemixer --device cuda --dtype bfloat16 --out "$out/run" 2>&1 \
  | tee "$out/run.log"
python3 -m gradest.cli run --estimator switch --device cuda --dtype bfloat16 --out "$out/run-switch" 2>&1 \
  | tee "$out/run-switch.log"
