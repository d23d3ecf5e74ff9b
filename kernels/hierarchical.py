"""Grouped probe-and-scan over coarse cells: the fine stage of hierarchical search, one Triton launch.

Every query probes ``nprobe`` coarse cells; each cell's codewords are stored contiguously (sorted
by cell, ``cell_offsets[c]:cell_offsets[c + 1]``). Instead of one program per query walking its
cells (a GEMV per probe: every codeword read once per query), the (query, probe) pairs are grouped
by cell and every cell's queries are cut into tiles of BLOCK_Q: a work item is (cell, query tile),
and a program computes that tile's BLOCK_Q x BLOCK_K dot products against the cell's codewords
with ``tl.dot`` -- a grouped GEMM whose groups are the cells, so each codeword tile is loaded once
per query tile and feeds the tensor cores (wgmma on sm_90 for bf16/fp16).

The distance matrix is never written: each program keeps a running (min, argmin) per query row in
registers and writes one (value, codeword position) per (query, probe) pair into an (N, nprobe)
partial buffer. At N = 2916, nprobe = 64 and ~500 codewords per cell that is 93M fp32 scores that
stay on chip; the launcher's reduction over nprobe is then a tiny torch op.

The work-item list is built by the launcher with a few torch ops: pairs sorted by cell (stable, so
a cell's queries stay in query order), tiles of BLOCK_Q pairs per cell, items ordered by cell size,
largest first, so the skew of real cell sizes does not leave a long tail of one big cell at the end
of the grid. Ties: ``tl.argmin`` breaks ties to the left inside a tile and a later tile replaces
the running minimum only when strictly smaller, so a cell's lowest sorted position wins; positions
within a cell follow the original codeword order, so that is the lowest original id in the cell.

Codeword offsets are int64 (K x d = 576M elements at K = 500K, d = 1152) and so is every product
of a row index by a stride.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl

#: default tile configs for H100 (sm_90). A cell holds ~500 codewords and, at N = 2916 and
#: nprobe = 8, ~25 queries: BLOCK_Q = 64 is the smallest wgmma M (one warpgroup, 4 warps), so
#: half-empty query tiles waste the least; fp32 with exact ("ieee") products does not use tensor
#: cores and gets smaller tiles that keep the accumulator in registers without spilling.
DEFAULT_CONFIGS: Dict[str, Dict[str, int]] = {
    "tensor_core": dict(BLOCK_Q=64, BLOCK_K=128, BLOCK_D=64, num_warps=4, num_stages=3),
    "fp32": dict(BLOCK_Q=32, BLOCK_K=64, BLOCK_D=32, num_warps=4, num_stages=2),
}


@triton.jit
def _probe_scan_kernel(
    x_ptr,             # (N, D) queries
    c_ptr,             # (K, D) residual codewords c - m (m: their cell's centroid), sorted by cell
    c_sq_ptr,          # (K,) fp32 ||c - m||^2 in sorted order
    m_ptr,             # (n_coarse, D) fp32 cell centroids
    cell_offsets_ptr,  # (n_coarse + 1,) int64 first sorted position of each cell
    pair_query_ptr,    # (P,) int64 query of each (query, probe) pair, pairs grouped by cell
    pair_slot_ptr,     # (P,) int64 where the pair's result goes: query * nprobe + probe rank
    item_cell_ptr,     # (W,) int64 cell of each work item
    item_start_ptr,    # (W,) int64 first pair of the item
    item_stop_ptr,     # (W,) int64 one past its last pair
    part_val_ptr,      # (N * nprobe,) fp32 ||c - m||^2 - 2 <x - m, c - m> of the pair's best codeword
    part_pos_ptr,      # (N * nprobe,) int64 sorted position of that codeword
    D,
    stride_xn, stride_xd, stride_ck, stride_cd, stride_mc, stride_md,
    IEEE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    item = tl.program_id(0)
    cell = tl.load(item_cell_ptr + item)
    pair_start = tl.load(item_start_ptr + item)
    pair_stop = tl.load(item_stop_ptr + item)
    offs_p = pair_start + tl.arange(0, BLOCK_Q).to(tl.int64)
    mask_p = offs_p < pair_stop
    query = tl.load(pair_query_ptr + offs_p, mask=mask_p, other=0)
    k_start = tl.load(cell_offsets_ptr + cell)
    k_end = tl.load(cell_offsets_ptr + cell + 1)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)

    best_val = tl.full((BLOCK_Q,), float("inf"), tl.float32)
    best_pos = tl.zeros((BLOCK_Q,), tl.int64)
    x_rows = x_ptr + query[:, None] * stride_xn
    m_row = m_ptr + cell * stride_mc
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < k_end
        c_rows = c_ptr + offs_k[:, None] * stride_ck
        acc = tl.zeros((BLOCK_Q, BLOCK_K), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cur_d = d0 + offs_d
            mask_d = cur_d < D
            x_tile = tl.load(x_rows + cur_d[None, :] * stride_xd, mask=mask_p[:, None] & mask_d[None, :], other=0.0)
            c_tile = tl.load(c_rows + cur_d[None, :] * stride_cd, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            # residual form, x - m in fp32 before the dot's dtype: no cancellation on tight cells
            m_tile = tl.load(m_row + cur_d * stride_md, mask=mask_d, other=0.0)
            x_tile = (x_tile.to(tl.float32) - m_tile[None, :]).to(c_tile.dtype)
            if IEEE:
                acc = tl.dot(x_tile, tl.trans(c_tile), acc, input_precision="ieee")
            else:
                acc = tl.dot(x_tile, tl.trans(c_tile), acc)
        # ||x - m||^2 is the same for every codeword of a (query, cell) pair: the caller adds it.
        c_sq = tl.load(c_sq_ptr + offs_k, mask=mask_k, other=0.0)
        dist = tl.where(mask_k[None, :], c_sq[None, :] - 2.0 * acc, float("inf"))
        blk_val = tl.min(dist, axis=1)
        blk_pos = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int64) + k0
        better = blk_val < best_val
        best_val = tl.where(better, blk_val, best_val)
        best_pos = tl.where(better, blk_pos, best_pos)

    slot = tl.load(pair_slot_ptr + offs_p, mask=mask_p, other=0)
    tl.store(part_val_ptr + slot, best_val, mask=mask_p)
    tl.store(part_pos_ptr + slot, best_pos, mask=mask_p)


def config_for(dtype: torch.dtype) -> Dict[str, int]:
    """The tile config the launcher uses for inputs of ``dtype``."""
    return DEFAULT_CONFIGS["fp32" if dtype == torch.float32 else "tensor_core"]


def work_items(probes: torch.Tensor, cell_offsets: torch.Tensor, block_q: int) -> Tuple[torch.Tensor, ...]:
    """The (cell, query tile) work list of a probe table.

    Args:
        probes: (N, nprobe) int64 cell ids probed by each query.
        cell_offsets: (n_coarse + 1,) int64 first sorted codeword position of each cell.
        block_q: pairs per tile.

    Returns:
        pair_query (P,), pair_slot (P,): the pairs grouped by cell, queries ascending within a cell,
        and each pair's flat index in probes; item_cell, item_start, item_stop (W,): each item's
        cell and pair range, items of larger cells first. All int64, on probes' device.
    """
    # probes: (N, nprobe)
    n_coarse = cell_offsets.shape[0] - 1
    nprobe = probes.shape[1]
    cells = probes.reshape(-1)
    pair_slot = torch.sort(cells, stable=True).indices
    pair_query = torch.div(pair_slot, nprobe, rounding_mode="floor")
    pairs_per_cell = torch.bincount(cells, minlength=n_coarse)
    pair_offsets = torch.zeros(n_coarse + 1, dtype=torch.int64, device=probes.device)
    torch.cumsum(pairs_per_cell, 0, out=pair_offsets[1:])
    tiles = torch.div(pairs_per_cell + block_q - 1, block_q, rounding_mode="floor")
    cell_size = cell_offsets[1:] - cell_offsets[:-1]
    # largest cells first: a big cell's items start early instead of trailing the grid
    cell_order = torch.sort(cell_size, descending=True, stable=True).indices
    item_cell = torch.repeat_interleave(cell_order, tiles[cell_order])
    first_item = torch.cumsum(tiles[cell_order], 0) - tiles[cell_order]
    tile_in_cell = torch.arange(item_cell.shape[0], device=probes.device) - torch.repeat_interleave(
        first_item, tiles[cell_order])
    item_start = pair_offsets[item_cell] + tile_in_cell * block_q
    item_stop = torch.minimum(item_start + block_q, pair_offsets[item_cell + 1])
    return pair_query, pair_slot, item_cell, item_start, item_stop


def probe_scan_triton(
    x: torch.Tensor,
    codes: torch.Tensor,
    codes_sq: torch.Tensor,
    cell_offsets: torch.Tensor,
    probes: torch.Tensor,
    centroids: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best codeword of every probed cell for every query, with the grouped Triton kernel.

    Residual form, relative to each cell's centroid m: the plain expansion ||c||^2 - 2 <x, c>
    cancels catastrophically for tight cells far from the origin (its rounding scales with
    ||x|| ||c||, not with the cell radius), as the torch scan found on a clustered codebook.

    Args:
        x: (N, d) queries, fp32 / fp16 / bf16, any strides.
        codes: (K, d) residual codewords c - m sorted by cell, same dtype and device as ``x``.
        codes_sq: (K,) fp32 ||c - m||^2 of ``codes``.
        cell_offsets: (n_coarse + 1,) int64, non-decreasing, from 0 to K.
        probes: (N, nprobe) int64 cells to scan for each query.
        centroids: (n_coarse, d) fp32 centroid m of each cell.

    Returns:
        part_val (N, nprobe) fp32: min over the probed cell of ``||c - m||^2 - 2 <x - m, c - m>``
        (the caller adds ||x - m||^2; inf for an empty cell); part_pos (N, nprobe) int64: the
        sorted position of that codeword (lowest on ties).

    Raises:
        ValueError / TypeError for shape, dtype or device problems.
    """
    # x: (N, d), codes: (K, d), codes_sq: (K,), cell_offsets: (n_coarse + 1,), probes: (N, nprobe)
    if x.dim() != 2 or codes.dim() != 2 or x.shape[1] != codes.shape[1]:
        raise ValueError(f"x and codes must be (N, d) and (K, d), got {tuple(x.shape)} and {tuple(codes.shape)}")
    if x.dtype != codes.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x and codes need one dtype among float32/float16/bfloat16, got {x.dtype} and {codes.dtype}")
    if probes.dim() != 2 or probes.shape[0] != x.shape[0] or probes.dtype != torch.int64:
        raise ValueError(f"probes must be ({x.shape[0]}, nprobe) int64, got {tuple(probes.shape)} {probes.dtype}")
    if codes_sq.shape != (codes.shape[0],) or codes_sq.dtype != torch.float32:
        raise ValueError(f"codes_sq must be ({codes.shape[0]},) float32, got {tuple(codes_sq.shape)} {codes_sq.dtype}")
    if cell_offsets.dim() != 1 or cell_offsets.dtype != torch.int64:
        raise ValueError(f"cell_offsets must be 1-D int64, got {tuple(cell_offsets.shape)} {cell_offsets.dtype}")
    if centroids.shape != (cell_offsets.shape[0] - 1, x.shape[1]) or centroids.dtype != torch.float32:
        raise ValueError(f"centroids must be ({cell_offsets.shape[0] - 1}, {x.shape[1]}) float32, got "
                         f"{tuple(centroids.shape)} {centroids.dtype}")
    devices = {t.device for t in (x, codes, codes_sq, cell_offsets, probes, centroids)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    n, nprobe = probes.shape
    part_val = torch.empty((n, nprobe), dtype=torch.float32, device=x.device)
    part_pos = torch.empty((n, nprobe), dtype=torch.int64, device=x.device)
    if n == 0:
        return part_val, part_pos

    cfg = config_for(x.dtype)
    pair_query, pair_slot, item_cell, item_start, item_stop = work_items(probes, cell_offsets, cfg["BLOCK_Q"])
    grid = (item_cell.shape[0],)
    _probe_scan_kernel[grid](
        x, codes, codes_sq, centroids, cell_offsets, pair_query, pair_slot, item_cell, item_start, item_stop,
        part_val, part_pos, x.shape[1],
        x.stride(0), x.stride(1), codes.stride(0), codes.stride(1), centroids.stride(0), centroids.stride(1),
        IEEE=x.dtype == torch.float32,
        BLOCK_Q=cfg["BLOCK_Q"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return part_val, part_pos


def aot_specs() -> List[dict]:
    """Signatures the ahead-of-time compile report builds this kernel with, one per dtype."""
    specs = []
    for dtype in ("bf16", "fp32"):
        cfg = DEFAULT_CONFIGS["fp32" if dtype == "fp32" else "tensor_core"]
        specs.append(
            dict(
                name="hierarchical",
                dtype=dtype,
                fn=_probe_scan_kernel,
                signature={
                    "x_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "c_sq_ptr": "*fp32", "m_ptr": "*fp32",
                    "cell_offsets_ptr": "*i64",
                    "pair_query_ptr": "*i64", "pair_slot_ptr": "*i64",
                    "item_cell_ptr": "*i64", "item_start_ptr": "*i64", "item_stop_ptr": "*i64",
                    "part_val_ptr": "*fp32", "part_pos_ptr": "*i64",
                    "D": "i32",
                    "stride_xn": "i64", "stride_xd": "i64", "stride_ck": "i64", "stride_cd": "i64",
                    "stride_mc": "i64", "stride_md": "i64",
                    "IEEE": "constexpr", "BLOCK_Q": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr",
                },
                constexprs=dict(
                    IEEE=dtype == "fp32", BLOCK_Q=cfg["BLOCK_Q"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
                ),
                # contiguous (N, 1152) queries and (K, 1152) codewords: unit strides become
                # constants, the row strides and D get divisibility hints (vectorised loads)
                runtime_values=dict(D=1152, stride_xn=1152, stride_xd=1, stride_ck=1152, stride_cd=1,
                                    stride_mc=1152, stride_md=1),
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
                expect_wgmma=dtype != "fp32",
            )
        )
    return specs
