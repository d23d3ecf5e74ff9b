"""Test set-up: Triton kernels run in Triton's interpreter on machines without a CUDA device.

TRITON_INTERPRET must be set before any @triton.jit function is created, i.e. before the first
``unicode2_fast.kernels`` import, so it is set here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A bounded thread count keeps the suite predictable on the 2-core CI machine.
torch.manual_seed(0)
