"""``u2.nearest``: exact nearest-codeword search with backend dispatch.

Backends:
    "triton"  fused distance + argmin kernel (kernels/nearest.py) on CUDA tensors;
    "torch"   on CPU, the exact search of ``_nearest_cpu`` (small l2 codebooks: a direct-form fp32
              scan whose error bound is relative to the distance; l2 codebooks up to 16,384 rows
              on AVX-512 BF16 CPUs: a fused bf16 scan; else a certified int8 filter where an int8
              GEMM is fast -- torch._int_mm on AVX-512 VNNI, fbgemm's 7-bit kernels on AVX2 --, else a
              certified flat scan (FAISS's algorithm: fp32 GEMM blocks and a running minimum),
              and for tightly clustered l2 / cos codebooks the cell scan of ``_cells``; float64
              re-ranking of near ties);
              on CUDA, blocked cuBLAS matmul + argmin (float64 inputs: in float64);
    "faiss"   IndexFlatL2 / IndexFlatIP, results converted to our (ids, dists) meaning (fp32:
              FAISS's own answer, which may differ from the exact one on near-ties);
    "auto"    Triton for fp32 / fp16 / bf16 CUDA tensors, "torch" otherwise (_dispatch.resolve).
              Measured speeds, worst case included, are in the README (real photographs, tight
              clusters, near-duplicates): the CPU path is not yet faster than FAISS on all data.

Every backend returns the same meaning: ``dists`` is the squared L2 distance ("l2"), minus the
inner product ("ip") or one minus the cosine similarity ("cos"), so smaller is always nearer, and
ties go to the lowest code index.
"""
from __future__ import annotations

from typing import Any, Tuple, Union

import torch

from . import _dispatch, _nearest_cpu, _scaling
from ._cache import per_tensor
from ._certified import ieee_fp32_matmul
from ._checks import (
    array_kind,
    check_finite,
    check_float,
    check_no_zero_rows,
    flatten_queries,
    from_tensor,
    to_tensor,
)
from .codebook import Codebook, codebook_matrix
from .profiling import stage

METRICS = ("l2", "ip", "cos")
BACKENDS = _dispatch.backends("nearest")

def nearest(
    x: Any,
    codebook: Union[Codebook, Any],
    metric: str = "l2",
    backend: str = "auto",
) -> Tuple[Any, Any]:
    """Exact nearest codeword of every query.

    Args:
        x: (..., d) queries: torch tensor, NumPy or CuPy array; float32, float16, bfloat16 or
            float64; any strides.
        codebook: (K, d) codewords (same kinds and dtypes) or a :class:`Codebook`.
        metric: "l2" (squared Euclidean), "ip" (maximum inner product) or "cos" (cosine).
        backend: "auto" | "triton" | "torch" | "faiss".

    Returns:
        ``(ids, dists)``: ids int64 and dists float32, both of shape x.shape[:-1], as the array kind
        of ``x``. dists is the squared L2 distance, ``-<x, c>`` or ``1 - cos(x, c)``. Ties go to the
        lowest code index. Neither carries a gradient (inputs that require grad are searched
        detached on every backend); a differentiable distance is computed from the gathered
        codewords, as the quantizers do.

    Raises:
        TypeError: a non-float dtype, or an unsupported array type.
        ValueError: NaN/Inf, dimension mismatch, empty codebook, devices that differ, an unknown
            metric or backend, or a zero vector with metric "cos".
    """
    with stage("nearest"):
        return _nearest(x, codebook, metric, backend)


def _nearest(x: Any, codebook: Any, metric: str, backend: str) -> Tuple[Any, Any]:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    kind = array_kind(x)
    # a search has no gradient (like torch.argmin or FAISS): detached, no backend records a graph
    xt = to_tensor(x, "x").detach()
    check_float(xt, "x")
    cb = codebook_matrix(codebook)  # not detached: the per-codebook caches key on this very tensor
    if xt.device != cb.device:
        raise ValueError(f"x is on {xt.device} but the codebook is on {cb.device}; move one of them")
    # no_grad: a codebook that requires grad (a Parameter) records nothing either; IEEE fp32: the
    # exact path's error bounds assume fp32 rounding, not TF32 / bf16 (whatever the user set)
    with torch.no_grad(), ieee_fp32_matmul(cuda=xt.device.type == "cuda"):
        ids, dists, lead = _search(xt, cb, metric, backend)
    return from_tensor(ids.reshape(lead), kind), from_tensor(dists.reshape(lead), kind)


def _search(xt: torch.Tensor, cb: torch.Tensor, metric: str, backend: str):
    """Validated, detached inputs to (ids, dists, leading shape) of ``nearest``."""
    x2d, lead = flatten_queries(xt, cb.shape[1])
    x_absmax = check_finite(x2d, "x")
    resolved = _dispatch.resolve("nearest", backend, xt.device, (xt.dtype, cb.dtype))
    if metric == "cos":
        check_no_zero_rows(x2d, "x")
        check_no_zero_rows(cb, "codebook")

    # (the finiteness pass found x's largest magnitude)
    x2d, cb, exponent = _scaling.in_range(x2d, cb, metric, x_absmax)

    with stage(f"nearest/{resolved}"):
        if resolved == "triton":
            ids, dists = _nearest_triton(x2d, cb, metric)
        elif resolved == "faiss":
            ids, dists = _nearest_faiss(x2d, cb, metric)
        elif xt.device.type == "cpu":
            ids, dists = _nearest_cpu.nearest_cpu(x2d, cb, metric)
        else:
            ids, dists = _nearest_torch_gpu(x2d, cb, metric)
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < cb.shape[0]):
        # a backend bug must never reach the caller as an out-of-range read of C2
        raise RuntimeError(f"internal error: backend {resolved!r} returned an id outside [0, {cb.shape[0]})")
    if exponent:
        dists = _scaling.unscaled_dists(dists, exponent, metric)
    return ids, dists, lead


def _nearest_triton(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    from .kernels import nearest as kernel  # imported on first use: importing the package compiles nothing

    common = _dispatch.kernel_dtype(x.dtype, codebook.dtype)
    if not _dispatch.has_kernel_layout(codebook, common):
        # cached: only a converted copy, never the codebook itself (a cache value that holds its
        # own key would keep the codebook alive forever)
        codebook = per_tensor(codebook, ("triton_layout", common), lambda c: _dispatch.kernel_layout(c, common))
    x = _dispatch.kernel_layout(x, common)
    cstat = per_tensor(codebook, ("triton", metric), lambda c: kernel.codebook_stat(c, metric))
    return kernel.nearest_triton(x, codebook, metric, cstat=cstat)


def _nearest_torch_gpu(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blocked matmul + argmin on CUDA with torch ops only (the baseline the kernel is measured
    against, and the float64 path: computed in float64 when either input is float64)."""
    dtype = _dispatch.torch_dtype(x, codebook)
    x32 = x.to(dtype)
    if metric == "cos":
        x32 = x32 / x32.norm(dim=1, keepdim=True)
    best = torch.full((x.shape[0],), float("inf"), dtype=dtype, device=x.device)
    best_idx = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    block = 16384
    for start in range(0, codebook.shape[0], block):
        c = codebook[start:start + block].to(dtype)
        if metric == "cos":
            c = c / c.norm(dim=1, keepdim=True)
        if metric == "l2":
            obj = torch.addmm(c.pow(2).sum(dim=1).unsqueeze(0), x32, c.t(), alpha=-2.0)
        else:
            obj = -(x32 @ c.t())
        val, idx = obj.min(dim=1)
        better = val < best
        best = torch.where(better, val, best)
        best_idx = torch.where(better, idx + start, best_idx)
    if metric == "l2":
        best = (best + x32.pow(2).sum(dim=1)).clamp_min(0.0)
    elif metric == "cos":
        best = 1.0 + best
    return best_idx, best.float()


def _nearest_faiss(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """FAISS IndexFlatL2 / IndexFlatIP, converted to our (ids, dists) meaning.

    FAISS computes in float32, so float16/bfloat16/float64 inputs are converted to float32.
    """
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
        raise ImportError("backend='faiss' needs the faiss-cpu (or faiss-gpu) package") from exc
    xs = x.float().contiguous().numpy()
    if metric == "cos":
        xs = xs.copy()
        faiss.normalize_L2(xs)
    index = per_tensor(codebook, ("faiss", metric), lambda c: _faiss_flat_index(c, metric))
    if xs.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float32)
    dist, ids = index.search(xs, 1)
    ids = torch.from_numpy(ids[:, 0]).long()
    dist = torch.from_numpy(dist[:, 0]).float()
    if metric == "ip":
        dist = -dist
    elif metric == "cos":
        dist = 1.0 - dist
    return ids, dist


def _faiss_flat_index(codebook: torch.Tensor, metric: str):
    import faiss

    cs = codebook.detach().float().contiguous().numpy()
    if metric == "cos":
        cs = cs.copy()
        faiss.normalize_L2(cs)
    index = faiss.IndexFlatL2(cs.shape[1]) if metric == "l2" else faiss.IndexFlatIP(cs.shape[1])
    index.add(cs)
    return index
