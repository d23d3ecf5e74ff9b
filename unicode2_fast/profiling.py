"""Named ranges for profilers: NVTX for Nsight Systems, record_function for the torch profiler.

``with stage("nearest/filter"):`` marks a stage of the hot path. On a CUDA machine with the
``nvtx`` package installed (extra ``gpu``) it pushes an NVTX range that ``nsys`` shows on its
timeline; it is always a ``torch.profiler.record_function`` range, which the torch profiler's
Chrome trace shows on CPU and GPU alike. Without a profiler attached both are near no-ops
(record_function checks a flag; NVTX without a collector is a few nanoseconds).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

try:  # optional: pip install "unicode2_fast[gpu]"
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx = None

#: colour of every unicode2_fast range in Nsight Systems
NVTX_COLOR = "green"
NVTX_DOMAIN = "unicode2_fast"


def nvtx_available() -> bool:
    """Whether NVTX ranges are emitted (the nvtx package is installed and CUDA is available)."""
    return _nvtx is not None and torch.cuda.is_available()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark one stage (e.g. "nearest/kernel") for Nsight and the torch profiler."""
    with contextlib.ExitStack() as stack:
        if nvtx_available():
            stack.enter_context(_nvtx.annotate(name, color=NVTX_COLOR, domain=NVTX_DOMAIN))
        stack.enter_context(torch.profiler.record_function(name))
        yield


def profile_nearest(out_dir: str, k: int = 50_000, n: int = 729, d: int = 1152, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, repeats: int = 2) -> str:
    """Chrome trace of ``u2.nearest`` on synthetic SigLIP-like data; returns the trace path.

    One warm-up call (codebook statistics / kernel compile) runs outside the trace, then
    ``repeats`` traced calls. Open the JSON in chrome://tracing or https://ui.perfetto.dev.
    """
    import os

    from ._io import atomic_write
    from .data import siglip_like
    from .nearest import nearest

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    data = siglip_like(k, n, d)
    x = data.queries.to(device=device, dtype=dtype)
    codebook = data.codebook.to(device=device, dtype=dtype)
    nearest(x, codebook)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(repeats):
            nearest(x, codebook)
        if device == "cuda":
            torch.cuda.synchronize()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"trace_nearest_{device}_k{k}_n{n}.json")
    atomic_write(path, prof.export_chrome_trace)
    return path
