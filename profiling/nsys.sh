#!/usr/bin/env bash
# Nsight Systems timeline of the exact-search benchmark on a CUDA machine.
# The u2 stages appear as NVTX ranges (domain "unicode2_fast") when the nvtx package is installed:
#   pip install nvtx        (or: pip install -e ".[gpu]")
# Usage: profiling/nsys.sh [OUT_BASENAME] [extra bench_nearest.py args]
# Example: profiling/nsys.sh nearest_h100 --k 500000 --n 2916 --methods triton_bf16 torch_cublas_bf16
set -euo pipefail
out="${1:-nearest_timeline}"
shift || true
cd "$(dirname "$0")/.."
nsys profile --trace=cuda,nvtx,osrt --cuda-memory-usage=true --force-overwrite=true -o "$out" \
  python bench/bench_nearest.py --repeats 3 --out bench_out/nsys "$@"
nsys stats --report cuda_gpu_kern_sum,nvtx_sum "$out.nsys-rep"
