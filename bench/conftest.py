"""pytest-benchmark set-up for the per-op microbenchmarks in bench/test_microbench.py.

They live under bench/, outside the default run (pyproject's ``testpaths = ["tests"]``):

    pytest bench/ --benchmark-only                       # about 2-3 minutes on 2 cores
    U2F_BENCH_SCALE=0.05 pytest bench/ --benchmark-only  # a few seconds: smoke test
    pytest bench/ --benchmark-disable                    # each benchmark once, as a plain test

``U2F_BENCH_SCALE`` (float, default 1) multiplies every op's codebook / vocabulary size K; N and d
stay fixed so that the shapes the kernels see stay representative.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="the microbenchmarks need pytest-benchmark (pip install -e .[dev])")

SCALE_ENV = "U2F_BENCH_SCALE"


def bench_scale() -> float:
    """The K multiplier from ``U2F_BENCH_SCALE``; raises on a value that is not a positive float."""
    raw = os.environ.get(SCALE_ENV, "1")
    try:
        scale = float(raw)
    except ValueError:
        raise pytest.UsageError(f"{SCALE_ENV} must be a positive float, got {raw!r}") from None
    if not scale > 0:
        raise pytest.UsageError(f"{SCALE_ENV} must be a positive float, got {raw!r}")
    return scale


@dataclass(frozen=True)
class Sizes:
    """Every op's benchmark shape. K scales with ``U2F_BENCH_SCALE``; N, d and the rest do not."""

    scale: float
    # nearest: (N, d) queries against a (K, d) codebook
    nearest_k: int
    nearest_n: int
    nearest_d: int
    # hierarchical: the same shapes; n_coarse cells, nprobe of them searched per query
    hier_k: int
    hier_n: int
    hier_d: int
    hier_n_coarse: int
    hier_nprobe: int
    # embedding step: N ids per step into a (K, d) table
    emb_k: int
    emb_n: int
    emb_d: int
    # cross-entropy: (N, h) hidden states against a (K, h) classifier
    ce_k: int
    ce_n: int
    ce_h: int
    # build: k codewords from N training rows of dimension d, niter Lloyd iterations
    build_k: int
    build_n: int
    build_d: int
    build_niter: int


def _scaled(k: int, scale: float, floor: int) -> int:
    return max(floor, round(k * scale))


@pytest.fixture(scope="session")
def sizes() -> Sizes:
    scale = bench_scale()
    hier_k = _scaled(20_000, scale, 64)
    build_k = _scaled(500, scale, 16)
    return Sizes(
        scale=scale,
        nearest_k=_scaled(20_000, scale, 16), nearest_n=729, nearest_d=1152,
        # cells of ~500 codewords (the paper's 500K / 1000), and at least 2 x nprobe of them
        hier_k=hier_k, hier_n=729, hier_d=1152, hier_n_coarse=max(8, hier_k // 500), hier_nprobe=4,
        emb_k=_scaled(20_000, scale, 64), emb_n=2916, emb_d=1152,
        ce_k=_scaled(20_000, scale, 16), ce_n=256, ce_h=1024,
        build_k=build_k, build_n=20 * build_k, build_d=256, build_niter=10,
    )


@pytest.fixture(scope="session", autouse=True)
def same_threads():
    """FAISS and torch run on the same number of threads, as in the bench scripts."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())


def pytest_benchmark_update_machine_info(config, machine_info):
    """Stamp the saved benchmark JSON with the library versions, thread count and scale."""
    import faiss
    import numpy

    import unicode2_fast

    machine_info.update({
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": numpy.__version__,
        "unicode2_fast": unicode2_fast.__version__,
        "torch_threads": torch.get_num_threads(),
        SCALE_ENV: os.environ.get(SCALE_ENV, "1"),
    })
