"""Named ranges for profilers: NVTX for Nsight Systems, record_function for the torch profiler.

``with stage("nearest/filter"):`` marks a stage of the hot path. On a CUDA machine with the
``nvtx`` package installed (extra ``gpu``) it pushes an NVTX range that ``nsys`` shows on its
timeline; while a torch profiler records it is a ``torch.profiler.record_function`` range, which
the torch profiler's Chrome trace shows on CPU and GPU alike. Without a profiler
attached a stage costs a flag check (NVTX without a collector is a few nanoseconds).

A leaf module: it imports nothing of the package, so every layer can mark its stages. The
``unicode2-fast profile`` command (``unicode2_fast.cli.profile``) writes a trace of one op.
"""
from __future__ import annotations

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
    global _NVTX_ON
    if _NVTX_ON is None:
        _NVTX_ON = _nvtx is not None and torch.cuda.is_available()
    return _NVTX_ON and _nvtx is not None


#: nvtx_available()'s answer, found on the first call (CUDA's availability does not change)
_NVTX_ON = None
_profiler_enabled = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None)


def _profiling() -> bool:
    """Whether a torch profiler (Kineto, legacy, emit_nvtx) is recording: only then is a
    record_function range worth its two dispatcher calls (~10 us per range on the CI machine,
    a third of a tiny search's time)."""
    return True if _profiler_enabled is None else bool(_profiler_enabled())


class stage:
    """Mark one stage (e.g. "nearest/kernel") for Nsight and the torch profiler: ``with stage(name):``.

    An NVTX range where :func:`nvtx_available`, a ``torch.profiler.record_function`` range while a
    torch profiler records; nothing otherwise."""

    __slots__ = ("name", "_nvtx_range", "_record")

    def __init__(self, name: str):
        self.name = name
        self._nvtx_range = None
        self._record = None

    def __enter__(self) -> None:
        if nvtx_available():
            self._nvtx_range = _nvtx.annotate(self.name, color=NVTX_COLOR, domain=NVTX_DOMAIN)
            self._nvtx_range.__enter__()
        if _profiling():
            self._record = torch.profiler.record_function(self.name)
            self._record.__enter__()

    def __exit__(self, *exc) -> None:
        if self._record is not None:
            self._record.__exit__(*exc)
            self._record = None
        if self._nvtx_range is not None:
            self._nvtx_range.__exit__(*exc)
            self._nvtx_range = None
