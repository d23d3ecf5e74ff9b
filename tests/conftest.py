"""Test set-up: Triton kernels run in Triton's interpreter on machines without a CUDA device.

TRITON_INTERPRET must be set before any @triton.jit function is created, i.e. before the first
``unicode2_fast.kernels`` import, so it is set here, at collection time.
"""
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The repository root holds kernels/ (installed as unicode2_fast.kernels, see setup.py). With the
# root on sys.path (``python -m pytest`` puts the working directory there) it shadows the PyPI
# package ``kernels``, which transformers >= 5.25 installs and imports: ``import transformers``'s
# model classes then fail ("cannot import name 'CUDAProperties' from 'kernels'"). The installed
# package needs no root on the path; child processes (torchrun, ``python -m unicode2_fast``) started
# from the root get PYTHONSAFEPATH (Python >= 3.11: no working directory on their path either).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _ROOT]
os.environ.setdefault("PYTHONSAFEPATH", "1")

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
