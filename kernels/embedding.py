"""Gathered-embedding backward as a sorted segment reduce: one Triton kernel, no atomics.

The forward pass gathered ``weight[ids]`` for N ids into a K x d table. Its weight gradient is
non-zero only on the U <= N distinct ids, so the backward returns a row-sparse gradient: the
sorted unique ids and, for each, the sum of the upstream gradient rows of the positions that
gathered it. A dense K x d gradient would be 2.3 GB of fp32 at K = 500K, d = 1152, almost all
zeros, written and then read again by the optimizer; here only U x d values are written.

The launcher sorts the ids (stable, so equal ids keep their original order) and cuts the sorted
sequence into segments of equal ids. One program owns one (unique id, d-tile): it walks its
segment BLOCK_R positions at a time, loads those gradient rows through the sort permutation,
sums them in fp32 and writes one output row tile. No two programs touch the same output, so
there are no atomics, and the summation order is fixed by the sort, so the result is bitwise
reproducible run to run (fp32 atomics would make it depend on scheduling).

All row offsets are int64: a K x d table at K = 500K, d = 1152 already has 576M elements, and an
upstream gradient with a large row stride can pass 2^31.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl

#: tile sizes for H100 (sm_90): 16 gathered rows x 128 columns per step is 16 fp32 values per
#: thread with 4 warps -- enough loads in flight to hide the gather latency, few enough registers
#: that nothing spills. Most Zipf-distributed ids occur once, so a larger BLOCK_R would only load
#: masked rows; hot ids with hundreds of duplicates loop.
DEFAULT_CONFIG: Dict[str, int] = dict(BLOCK_R=16, BLOCK_D=128, num_warps=4, num_stages=2)

GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _embedding_backward_kernel(
    grad_ptr,         # (N, D) upstream gradient, one row per gathered position
    order_ptr,        # (N,) int64: positions sorted by their id (stable)
    seg_offsets_ptr,  # (U + 1,) int64: segment u is order[seg_offsets[u]:seg_offsets[u + 1]]
    out_ptr,          # (U, D) summed rows, one per unique id, in the gradient's dtype
    D,
    stride_gn, stride_gd, stride_on,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_u = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = offs_d < D
    seg_start = tl.load(seg_offsets_ptr + pid_u)
    seg_end = tl.load(seg_offsets_ptr + pid_u + 1)

    acc = tl.zeros((BLOCK_D,), tl.float32)
    for r0 in range(seg_start, seg_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask_r = offs_r < seg_end
        positions = tl.load(order_ptr + offs_r, mask=mask_r, other=0)
        rows = tl.load(
            grad_ptr + positions[:, None] * stride_gn + offs_d[None, :] * stride_gd,
            mask=mask_r[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc += tl.sum(rows.to(tl.float32), axis=0)
    tl.store(out_ptr + pid_u.to(tl.int64) * stride_on + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


def sorted_segments(ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of ``ids`` cut into runs of equal ids.

    Args:
        ids: (N,) int64.

    Returns:
        unique_ids (U,) sorted ascending, order (N,) int64 positions of ``ids`` in sorted order
        (equal ids keep their original order), seg_offsets (U + 1,) int64 with segment u =
        order[seg_offsets[u]:seg_offsets[u + 1]].
    """
    # ids: (N,)
    sorted_ids, order = torch.sort(ids, stable=True)
    unique_ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    seg_offsets = torch.zeros(unique_ids.shape[0] + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, dim=0, out=seg_offsets[1:])
    return unique_ids, order, seg_offsets


def embedding_backward_triton(grad_rows: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-sparse weight gradient of ``weight[ids]`` with the segment-reduce kernel.

    Args:
        grad_rows: (N, d) upstream gradient (fp32 / fp16 / bf16, any strides).
        ids: (N,) int64 ids that were gathered, same device.

    Returns:
        unique_ids (U,) int64 sorted ascending and values (U, d) in ``grad_rows``' dtype: the fp32
        sum of the gradient rows of each unique id, rounded once at the end.

    Raises:
        ValueError / TypeError for shape, dtype or device problems.
    """
    # grad_rows: (N, d), ids: (N,)
    if grad_rows.dim() != 2 or ids.dim() != 1 or grad_rows.shape[0] != ids.shape[0]:
        raise ValueError(
            f"expected grad_rows (N, d) and ids (N,), got shapes {tuple(grad_rows.shape)} and {tuple(ids.shape)}"
        )
    if grad_rows.dtype not in GRAD_DTYPES:
        raise TypeError(f"triton backend needs a float32/float16/bfloat16 gradient, got {grad_rows.dtype}")
    if ids.dtype != torch.int64:
        raise TypeError(f"ids must be int64, got {ids.dtype}")
    if grad_rows.device != ids.device:
        raise ValueError(f"grad_rows is on {grad_rows.device} but ids are on {ids.device}")
    d = grad_rows.shape[1]

    unique_ids, order, seg_offsets = sorted_segments(ids)
    n_unique = unique_ids.shape[0]
    values = torch.empty((n_unique, d), dtype=grad_rows.dtype, device=grad_rows.device)
    if n_unique == 0 or d == 0:
        return unique_ids, values

    cfg = DEFAULT_CONFIG
    grid = (n_unique, triton.cdiv(d, cfg["BLOCK_D"]))
    _embedding_backward_kernel[grid](
        grad_rows, order, seg_offsets, values, d,
        grad_rows.stride(0), grad_rows.stride(1), values.stride(0),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return unique_ids, values


def aot_specs() -> List[dict]:
    """Signatures the ahead-of-time compile report builds this kernel with, one per gradient dtype."""
    cfg = DEFAULT_CONFIG
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        specs.append(
            dict(
                name="embedding_backward",
                dtype=dtype,
                fn=_embedding_backward_kernel,
                signature={
                    "grad_ptr": f"*{dtype}", "order_ptr": "*i64", "seg_offsets_ptr": "*i64",
                    "out_ptr": f"*{dtype}",
                    "D": "i32",
                    "stride_gn": "i64", "stride_gd": "i64", "stride_on": "i64",
                    "BLOCK_R": "constexpr", "BLOCK_D": "constexpr",
                },
                constexprs=dict(BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"]),
                # a contiguous (N, 1152) upstream gradient: unit column stride becomes a constant,
                # the row strides get divisibility hints (vectorised loads and stores)
                runtime_values=dict(D=1152, stride_gn=1152, stride_gd=1, stride_on=1152),
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
                expect_wgmma=False,
            )
        )
    return specs
