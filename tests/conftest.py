"""Test set-up: Triton kernels run in Triton's interpreter on machines without a CUDA device.

TRITON_INTERPRET must be set before any @triton.jit function is created, i.e. before the first
``unicode2_fast.kernels`` import, so it is set here, at collection time.
"""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A bounded thread count keeps the suite predictable on the 2-core CI machine.
torch.manual_seed(0)


@pytest.fixture(scope="module")
def bench(request):
    """The module's benchmark script, unicode2_fast.bench.<BENCH_NAME> (set BENCH_NAME in the test module)."""
    return importlib.import_module(f"unicode2_fast.bench.{request.module.BENCH_NAME}")


@pytest.fixture(scope="module")
def tiny_run(bench, request, tmp_path_factory):
    """(return code, output dir) of one ``--tiny`` run of the module's benchmark."""
    out = tmp_path_factory.mktemp(request.module.BENCH_NAME)
    threads = torch.get_num_threads()  # the benchmarks set the process-wide thread count
    try:
        rc = bench.main(["--tiny", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return rc, out
