#!/usr/bin/env bash
# Nsight Compute, full section set, on ONE launch of the fused nearest kernel (after warm-up).
# Reports achieved FLOP/s, tensor-core (wgmma) utilisation, shared memory, occupancy, stalls.
# Usage: profiling/ncu.sh [K] [N] [dtype: bf16|fp16|fp32]
# Example: profiling/ncu.sh 500000 2916 bf16
set -euo pipefail
k="${1:-500000}"; n="${2:-2916}"; dtype="${3:-bf16}"
cd "$(dirname "$0")/.."
ncu --set full --kernel-name regex:_nearest_kernel --launch-skip 2 --launch-count 1 \
  --force-overwrite -o "nearest_${dtype}_k${k}_n${n}" \
  python - "$k" "$n" "$dtype" <<'PY'
import sys
import torch
import unicode2_fast as u2
from unicode2_fast.data import siglip_like

k, n, dtype = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[sys.argv[3]])
data = siglip_like(k, n)
x = data.queries.to("cuda", dtype)
codebook = data.codebook.to("cuda", dtype)
for _ in range(4):  # launches 0-1 compile and warm up; ncu captures launch 2
    u2.nearest(x, codebook, backend="triton")
torch.cuda.synchronize()
PY
echo "open nearest_${dtype}_k${k}_n${n}.ncu-rep in ncu-ui, or: ncu --import nearest_${dtype}_k${k}_n${n}.ncu-rep --page details"
