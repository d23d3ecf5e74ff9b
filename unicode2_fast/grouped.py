"""``u2.nearest_grouped``: exact nearest codeword per group, for multi-codebook quantizers.

UniTok splits each latent into G chunks and quantizes chunk g against its own sub-codebook g
(G = 8 sub-codebooks of 4096 codewords); a product quantizer does the same. One call searches all
groups:

    ids, dists = u2.nearest_grouped(x, codebooks)   # x (..., G, d), codebooks (G, K, d) -> (..., G)

Backends:
    "triton"  one launch of the fused distance + argmin kernel over (query tile, K-split, group)
              (kernels/grouped.py) on CUDA tensors;
    "torch"   on CPU, the certified-exact search of ``_grouped_cpu`` (one batched fp32 GEMM per
              block of queries over all groups on centred vectors, a rigorous rounding bound per
              (query, group), near ties settled in float64 from their fp32 candidate windows;
              float64 inputs, and every input on CPUs whose int8 GEMM is fast (AVX-512 VNNI),
              go through ``u2.nearest``'s exact CPU path group by group); on
              CUDA, blocked batched matmul + argmin (float64 inputs: in float64);
    "faiss"   one FAISS flat search per group (FAISS's own fp32 answer);
    "auto"    Triton for fp32 / fp16 / bf16 CUDA tensors, "torch" otherwise.

Meaning, dtypes and tie rule are those of ``u2.nearest``: dists is the squared L2 distance, minus
the inner product or one minus the cosine, smaller is nearer, ties go to the lowest code index,
and no N x K distance matrix is ever allocated.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple, Union

import torch

from . import _dispatch, _grouped_cpu, _scaling
from ._cache import per_tensor
from ._certified import ieee_fp32_matmul
from ._checks import array_kind, check_finite, check_float, check_no_zero_rows, from_tensor, to_tensor
from .codebook import Codebook
from .nearest import METRICS, nearest
from .profiling import stage

BACKENDS = _dispatch.backends("nearest_grouped")


def nearest_grouped(
    x: Any,
    codebooks: Union[Any, Sequence[Any]],
    metric: str = "l2",
    backend: str = "auto",
) -> Tuple[Any, Any]:
    """Exact nearest codeword of every query chunk in its group's codebook.

    Args:
        x: (..., G, d) query chunks: torch tensor, NumPy or CuPy array; float32, float16,
            bfloat16 or float64; any strides. Chunk g of a query is searched in codebook g.
        codebooks: (G, K, d) array of the same kind, or a sequence of G (K, d) arrays /
            :class:`u2.Codebook` objects (stacked; every one needs the same K and d).
        metric: "l2" (squared Euclidean), "ip" (maximum inner product) or "cos" (cosine).
        backend: "auto" | "triton" | "torch" | "faiss".

    Returns:
        ``(ids, dists)``: ids int64 and dists float32, shape x.shape[:-1] (the leading shape and
        G), as the array kind of ``x``; ids[..., g] indexes codebook g. Ties go to the lowest id.

    Raises:
        TypeError: a non-float dtype or an unsupported array type.
        ValueError: NaN/Inf, a group count or chunk dimension that does not match the codebooks,
            codebooks of different sizes, an empty codebook, devices that differ, an unknown
            metric or backend, or a zero vector with metric "cos".
    """
    with stage("nearest_grouped"):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        kind = array_kind(x)
        xt = to_tensor(x, "x").detach()
        check_float(xt, "x")
        cb = _codebook_stack(codebooks)
        groups, _, dim = cb.shape
        if xt.dim() < 2 or tuple(xt.shape[-2:]) != (groups, dim):
            raise ValueError(
                f"x must have shape (..., G, d) = (..., {groups}, {dim}) to match codebooks of shape "
                f"{tuple(cb.shape)}, got {tuple(xt.shape)}"
            )
        if xt.device != cb.device:
            raise ValueError(f"x is on {xt.device} but the codebooks are on {cb.device}; move one of them")
        lead = xt.shape[:-1]
        with torch.no_grad(), ieee_fp32_matmul():
            ids, dists = _search(xt.reshape(-1, groups, dim), cb, metric, backend)
        return from_tensor(ids.reshape(lead), kind), from_tensor(dists.reshape(lead), kind)


def _codebook_stack(codebooks: Any) -> torch.Tensor:
    """The validated (G, K, d) codebooks: an array as it is, a sequence stacked (a new tensor each
    call, so pass one (G, K, d) tensor to reuse the cached preparation). Finiteness of an array
    is checked once per tensor version."""
    if isinstance(codebooks, (list, tuple)):
        if not codebooks:
            raise ValueError("codebooks is an empty sequence; need G >= 1 codebooks of shape (K, d)")
        mats = [c.vectors if isinstance(c, Codebook) else to_tensor(c, f"codebooks[{i}]").detach()
                for i, c in enumerate(codebooks)]
        shapes = {tuple(m.shape) for m in mats}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"every codebook must be (K, d) with the same K and d, got shapes {sorted(shapes)}")
        if len({m.device for m in mats}) != 1:
            raise ValueError("the codebooks are on different devices")
        for i, m in enumerate(mats):
            check_float(m, f"codebooks[{i}]")
        cb = torch.stack([m.to(_dispatch.kernel_dtype(*(m.dtype for m in mats))) for m in mats])
    else:
        # not detached: the per-codebook caches (prepared blocks, norms) key on this very tensor
        cb = to_tensor(codebooks, "codebooks")
        if cb.dim() != 3:
            raise ValueError(f"codebooks must be a (G, K, d) array or a sequence of (K, d) ones, got shape {tuple(cb.shape)}")
        check_float(cb, "codebooks")
    if 0 in cb.shape:
        raise ValueError(f"empty codebooks: shape {tuple(cb.shape)}, need G >= 1, K >= 1 and d >= 1")
    if not cb.is_contiguous():
        cb = per_tensor(cb, ("contiguous",), lambda c: c.contiguous())
    per_tensor(cb, ("finite",), lambda c: check_finite(c, "codebooks"))
    return cb


def _search(x: torch.Tensor, cb: torch.Tensor, metric: str, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validated, detached (N, G, d) queries and (G, K, d) codebooks to (N, G) ids and dists."""
    x_absmax = check_finite(x, "x")
    resolved = _dispatch.resolve("nearest_grouped", backend, x.device, (x.dtype, cb.dtype))
    if metric == "cos":
        check_no_zero_rows(x.reshape(-1, x.shape[-1]), "x")
        check_no_zero_rows(cb.reshape(-1, cb.shape[-1]), "codebooks")
    x, cb, exponent = _scaling.in_range(x, cb, metric, x_absmax)

    with stage(f"nearest_grouped/{resolved}"):
        if resolved == "triton":
            ids, dists = _grouped_triton(x, cb, metric)
        elif resolved == "faiss":
            ids, dists = _grouped_faiss(x, cb, metric)
        elif x.device.type == "cpu":
            ids, dists = _grouped_cpu.nearest_grouped_cpu(x, cb, metric)
        else:
            ids, dists = _grouped_cpu.scan(x, cb, metric)
    k = cb.shape[1]
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < k):
        raise RuntimeError(f"internal error: backend {resolved!r} returned an id outside [0, {k})")
    if exponent:
        dists = _scaling.unscaled_dists(dists, exponent, metric)
    return ids, dists


def _grouped_triton(x: torch.Tensor, cb: torch.Tensor, metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    from .kernels import grouped as kernel  # imported on first use: importing the package compiles nothing
    from .kernels import nearest as nearest_kernel

    common = _dispatch.kernel_dtype(x.dtype, cb.dtype)
    pad = -cb.shape[-1] % 16  # rows a multiple of 16 elements: aligned, vectorised loads
    if cb.dtype != common or pad:
        cb = per_tensor(cb, ("triton_layout", common), lambda c: torch.nn.functional.pad(c.to(common), (0, pad)))
    if x.dtype != common or pad:
        x = torch.nn.functional.pad(x.to(common), (0, pad))  # zero columns change no distance
    cstat = per_tensor(cb, ("triton", metric), lambda c: nearest_kernel.codebook_stat(c, metric))
    return kernel.nearest_grouped_triton(x, cb, metric, cstat=cstat)


def _grouped_faiss(x: torch.Tensor, cb: torch.Tensor, metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    results = [nearest(x[:, g], cb[g], metric, backend="faiss") for g in range(cb.shape[0])]
    return torch.stack([r[0] for r in results], dim=1), torch.stack([r[1] for r in results], dim=1)
