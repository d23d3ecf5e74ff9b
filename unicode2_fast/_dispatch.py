"""Backend choice for every op: one resolver, one interpreter check, one dtype promotion rule,
and the memory layout the Triton kernels read.

Each public op takes ``backend="auto" | "triton" | "torch" | ...`` and asks :func:`resolve` which
implementation runs. The rules are the same for every op:

- "auto": Triton on CUDA tensors whose dtypes the kernels compute (fp32 / fp16 / bf16), the torch
  path otherwise -- float64 on CUDA included, everywhere (the kernels have no fp64 variant).
  The large-vocabulary cross-entropy prefers cut-cross-entropy ("cce") on CUDA when installed.
- an explicit "triton" needs CUDA tensors, or Triton's interpreter (``TRITON_INTERPRET=1``) on
  the CPU, and fp32 / fp16 / bf16 tensors.
- "faiss" (nearest) wraps FAISS's CPU flat indexes; "cce" needs CUDA and the package.
- "native" (the row AdamW update of sparse_adamw) runs the C loop of ``_native`` on fp32 CPU
  tensors; "auto" picks it there whenever it compiles (else "torch").
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, Iterable, Optional, Tuple

import torch

from . import _native

#: dtypes the Triton kernels compute with; float64 always runs on the torch path
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: the backends each op accepts
OP_BACKENDS: Dict[str, Tuple[str, ...]] = {
    "nearest": ("auto", "triton", "torch", "faiss"),
    "nearest_grouped": ("auto", "triton", "torch", "faiss"),
    "hierarchical": ("auto", "triton", "torch"),
    "embedding": ("auto", "triton", "torch"),
    "sparse_adamw": ("auto", "triton", "torch", "native"),
    "cross_entropy": ("auto", "triton", "torch", "cce"),
}


def triton_interpreter() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cce_available() -> bool:
    """Whether the cut_cross_entropy package (apple/ml-cross-entropy) is installed."""
    return importlib.util.find_spec("cut_cross_entropy") is not None


def backends(op: str) -> Tuple[str, ...]:
    """The backends ``op`` accepts."""
    return OP_BACKENDS[op]


def check_backend(op: str, backend: str) -> None:
    """Raise ValueError unless ``backend`` is one of ``op``'s backends (checked before any work)."""
    if backend not in OP_BACKENDS[op]:
        raise ValueError(f"unknown backend {backend!r}; expected one of {OP_BACKENDS[op]}")


def resolve(op: str, backend: str, device: torch.device, dtypes: Iterable[torch.dtype]) -> str:
    """The implementation that runs ``op`` on tensors of ``dtypes`` on ``device``.

    Args:
        op: a key of OP_BACKENDS. backend: what the caller asked for.
        device: where the tensors live. dtypes: the floating dtypes of the op's inputs.

    Returns:
        "triton", "torch", "faiss", "cce" or "native" (never "auto").

    Raises:
        ValueError: an unknown backend, or one that cannot run on ``device`` / is not installed.
        TypeError: "triton" for float64 tensors.
    """
    check_backend(op, backend)
    dtypes = tuple(dtypes)
    kernel_dtypes = all(dtype in TRITON_DTYPES for dtype in dtypes)
    on_cuda = device.type == "cuda"
    native_dtypes = all(dtype == torch.float32 for dtype in dtypes)
    if backend == "auto":
        if not (on_cuda and kernel_dtypes):
            if "native" in OP_BACKENDS[op] and device.type == "cpu" and native_dtypes and _native.available():
                return "native"
            return "torch"
        return "cce" if op == "cross_entropy" and cce_available() else "triton"
    if backend == "triton":
        if not on_cuda and not triton_interpreter():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); use backend='torch' or 'auto' on the CPU "
                "(or set TRITON_INTERPRET=1 to run the kernel in Triton's interpreter)"
            )
        if not kernel_dtypes:
            raise TypeError(
                "backend='triton' computes in float32/float16/bfloat16; float64 input needs backend='torch' "
                f"(got {', '.join(str(dtype) for dtype in dtypes)})"
            )
    elif backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs compiled CPU loops; pass CPU tensors (got {device})")
        if not native_dtypes:
            raise TypeError("backend='native' computes float32 tables; use backend='torch' for "
                            f"{', '.join(str(dtype) for dtype in dtypes)}")
        if not _native.available():
            raise ValueError(f"backend='native' is unavailable here ({_native.failure()}); use backend='torch'")
    elif backend == "faiss" and device.type != "cpu":
        raise ValueError(f"backend='faiss' wraps FAISS's CPU indexes; pass CPU tensors (got {device})")
    elif backend == "cce":
        if not on_cuda:
            raise ValueError(f"backend='cce' needs CUDA tensors (got {device})")
        if not cce_available():
            raise ValueError("backend='cce' needs the cut_cross_entropy package (apple/ml-cross-entropy)")
    return backend


def kernel_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype a Triton kernel computes mixed inputs in: the wider one (fp32 for a bf16/fp16
    mix), so no input loses precision."""
    common = dtypes[0]
    for dtype in dtypes[1:]:
        common = torch.promote_types(common, dtype)
    return common


def torch_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype the torch paths compute in: float64 when any input (None: absent) is float64,
    else float32 (bf16 / fp16 inputs are computed in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def has_kernel_layout(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``t`` is already in :func:`kernel_layout` for ``dtype``."""
    return t.dtype == dtype and t.stride(1) == 1 and t.shape[1] % 16 == 0 and t.stride(0) % 16 == 0


def kernel_layout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as the kernel reads it fastest: ``dtype``, unit column stride, rows a multiple of 16
    elements long (zero-padded: zero columns change no distance).

    With a row length that is not a multiple of 16 the compiler cannot prove the loads aligned,
    loads element by element and spills registers (seen in the sm_90 compile report at d = 1153).
    """
    # t: (R, d)
    if has_kernel_layout(t, dtype):
        return t
    d = t.shape[1]
    padded = torch.zeros((t.shape[0], -(-d // 16) * 16), dtype=dtype, device=t.device)
    padded[:, :d] = t
    return padded
