"""Named ranges for profilers: NVTX for Nsight Systems, record_function for the torch profiler.

``with stage("nearest/filter"):`` marks a stage of the hot path. On a CUDA machine with the
``nvtx`` package installed (extra ``gpu``) it pushes an NVTX range that ``nsys`` shows on its
timeline; it is always a ``torch.profiler.record_function`` range, which the torch profiler's
Chrome trace shows on CPU and GPU alike. Without a profiler attached both are near no-ops
(record_function checks a flag; NVTX without a collector is a few nanoseconds).

A leaf module: it imports nothing of the package, so every layer can mark its stages. The
``unicode2-fast profile`` command (``unicode2_fast.cli.profile``) writes a trace of one op.
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
