"""Fused nearest-codeword search: distance GEMM + running argmin, one Triton kernel.

Each program owns a tile of BLOCK_N queries and a contiguous slice of the codebook (a "split").
It walks its slice BLOCK_K codewords at a time, computes the BLOCK_N x BLOCK_K dot products with
``tl.dot`` (bf16/fp16 on tensor cores -- wgmma on sm_90 -- and fp32 with exact "ieee" products),
turns them into distances with the precomputed codeword norms and folds them into a running
(min, argmin) kept in registers. The N x K distance matrix is never written: at N = 2916,
K = 500,000 that is 5.8 GB of fp32 stores and loads that the fusion removes; the only output is
(N x n_splits) partial minima, reduced by a second, tiny step.

Splitting K across programs keeps the GPU full when N is small (one image, N = 729, is only 6
query tiles of 128 for 132 SMs). Ties resolve to the lowest code index: ``tl.argmin`` breaks ties
to the left inside a block, a later block replaces the running minimum only when strictly smaller,
and the split reduction prefers the lowest split.

All offsets are computed in int64: K x d = 576M elements at K = 500K, d = 1152, and N x K partial
offsets pass 2^31.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

#: metric codes shared with the launcher (constexpr in the kernel)
METRIC_L2, METRIC_IP, METRIC_COS = 0, 1, 2
METRIC_CODES = {"l2": METRIC_L2, "ip": METRIC_IP, "cos": METRIC_COS}

#: default tile configs, chosen for H100 (sm_90): 128 x 128 x 64 bf16/fp16 tiles feed wgmma with
#: 8 warps (two warpgroups); fp32 with exact products does not use tensor cores, so it gets smaller
#: tiles that keep the accumulator in registers without spilling.
DEFAULT_CONFIGS: Dict[str, Dict[str, int]] = {
    "tensor_core": dict(BLOCK_N=128, BLOCK_K=128, BLOCK_D=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_N=64, BLOCK_K=64, BLOCK_D=32, num_warps=4, num_stages=2),
}

#: set UNICODE2_FAST_AUTOTUNE=1 to autotune tile sizes per (N, K, d) on first use instead
AUTOTUNE_ENV = "UNICODE2_FAST_AUTOTUNE"


@triton.jit
def _nearest_kernel(
    x_ptr,            # (G, N, D) queries: group g searches codebook g
    c_ptr,            # (G, K, D) codewords
    cstat_ptr,        # (G, K) fp32: ||c||^2 for l2, 1/||c|| for cos, unused for ip
    part_val_ptr,     # (n_splits, G, N) fp32 partial minima
    part_idx_ptr,     # (n_splits, G, N) int64 partial argmins
    N, K, D, G,
    stride_xg, stride_xn, stride_xd, stride_cg, stride_ck, stride_cd, stride_sg,
    k_per_split,      # codewords per split, a multiple of BLOCK_K; <= 0: cdiv(K, splits) in tiles
    METRIC: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_g = tl.program_id(2).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    split_len = k_per_split.to(tl.int64)
    if split_len <= 0:
        # the autotuned launch: each config's grid has its own split count (tl.num_programs(1));
        # the splits share K in whole BLOCK_K tiles (a trailing split may be empty)
        split_len = (tl.cdiv(tl.cdiv(K, tl.num_programs(1)), BLOCK_K) * BLOCK_K).to(tl.int64)
    k_start = pid_s.to(tl.int64) * split_len
    k_end = tl.minimum(k_start + split_len, K)
    x_ptr += pid_g * stride_xg
    c_ptr += pid_g * stride_cg
    cstat_ptr += pid_g * stride_sg

    best_val = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int64)
    x_rows = x_ptr + offs_n[:, None] * stride_xn
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < k_end
        c_rows = c_ptr + offs_k[:, None] * stride_ck
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cur_d = d0 + offs_d
            mask_d = cur_d < D
            x_tile = tl.load(x_rows + cur_d[None, :] * stride_xd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            c_tile = tl.load(c_rows + cur_d[None, :] * stride_cd, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(x_tile, tl.trans(c_tile), acc, input_precision="ieee")
            else:
                acc = tl.dot(x_tile, tl.trans(c_tile), acc)
        if METRIC == 0:
            # ||x||^2 is the same for every codeword of a query: added once by the launcher.
            cstat = tl.load(cstat_ptr + offs_k, mask=mask_k, other=0.0)
            dist = cstat[None, :] - 2.0 * acc
        elif METRIC == 1:
            dist = -acc
        else:
            cstat = tl.load(cstat_ptr + offs_k, mask=mask_k, other=0.0)
            dist = -acc * cstat[None, :]
        dist = tl.where(mask_k[None, :], dist, float("inf"))
        blk_val = tl.min(dist, axis=1)
        blk_idx = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int64) + k0
        better = blk_val < best_val
        best_val = tl.where(better, blk_val, best_val)
        best_idx = tl.where(better, blk_idx, best_idx)

    out = (pid_s.to(tl.int64) * G + pid_g) * N + offs_n
    tl.store(part_val_ptr + out, best_val, mask=mask_n)
    tl.store(part_idx_ptr + out, best_idx, mask=mask_n)


def _autotune_configs() -> List[triton.Config]:
    configs = []
    for bn, bk, bd, warps, stages in [
        (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3),
        (128, 64, 64, 4, 4), (256, 128, 64, 8, 3), (64, 64, 32, 4, 2), (128, 128, 32, 8, 4),
    ]:
        configs.append(triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd), num_warps=warps, num_stages=stages))
    return configs


_autotuned_kernel = None


def _get_autotuned_kernel():
    global _autotuned_kernel
    if _autotuned_kernel is None:
        # autotuning keys on the problem shape; each config's grid sizes its own K-splits and the
        # kernel derives its slice from the grid (k_per_split = 0). restore_value: the benchmark runs of every config write the shared partial buffers; each
        # run (and the final one) must start from the launcher's +inf, or a config with more
        # splits would leave its slots for the reduction
        _autotuned_kernel = triton.autotune(configs=_autotune_configs(), key=["N", "K", "D", "METRIC"],
                                            restore_value=["part_val_ptr", "part_idx_ptr"])(_nearest_kernel)
    return _autotuned_kernel


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the split heuristics size waves by it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a couple of splits exercise the reduction path


def choose_splits(n: int, k: int, block_n: int, block_k: int, num_sms: int) -> int:
    """How many K-splits keep about two waves of programs on the device.

    Each split must still hold at least a few BLOCK_K tiles so the per-program prologue and the
    partial-result traffic stay negligible next to the GEMM.
    """
    n_tiles = triton.cdiv(max(n, 1), block_n)
    want = triton.cdiv(2 * num_sms, n_tiles)
    max_useful = max(1, triton.cdiv(k, 4 * block_k))
    return int(max(1, min(want, max_useful)))


def grid_splits(n: int, k: int, block_n: int, block_k: int, num_sms: int) -> int:
    """The K-splits of a launch with these tile sizes: :func:`choose_splits`, less any that whole
    BLOCK_K tiles would leave empty (the count the kernel's ``k_per_split <= 0`` path sees)."""
    n_splits = choose_splits(n, k, block_n, block_k, num_sms)
    k_per_split = triton.cdiv(triton.cdiv(k, n_splits), block_k) * block_k
    return triton.cdiv(k, k_per_split)


def reduce_splits(part_val: torch.Tensor, part_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reduce (n_splits, ...) partial minima to (...), ties to the lowest code index.

    Among equal minima the smallest index wins (the tie rule), whichever split holds it: slots
    an autotuned launch left at +inf never do.
    """
    # part_val, part_idx: (S, ...) -- (S, G, N) from the kernel
    best_val = part_val.min(dim=0).values
    is_best = part_val == best_val.unsqueeze(0)
    sentinel = torch.iinfo(torch.int64).max
    best_idx = torch.where(is_best, part_idx, torch.full_like(part_idx, sentinel)).min(dim=0).values
    return best_val, best_idx


def nearest_triton(
    x: torch.Tensor,
    codebook: torch.Tensor,
    metric: str,
    cstat: Optional[torch.Tensor] = None,
    x_sq_norms: Optional[torch.Tensor] = None,
    x_inv_norms: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword for each row of ``x`` with the fused Triton kernel.

    Args:
        x: (N, d) queries, fp32 / fp16 / bf16, any strides.
        codebook: (K, d) codewords, same dtype and device as ``x``.
        metric: "l2", "ip" or "cos".
        cstat: (K,) fp32 codeword statistic: ||c||^2 for l2, 1/||c|| for cos (ignored for ip).
            Callers cache it per codebook; computed here when omitted.
        x_sq_norms / x_inv_norms: optional precomputed (N,) fp32 ||x||^2 (l2) or 1/||x|| (cos).

    Returns:
        ids (N,) int64 and dists (N,) fp32: squared L2, -<x, c>, or 1 - cos(x, c).

    Raises:
        ValueError / TypeError for shape, dtype, device or metric problems.
    """
    # x: (N, d), codebook: (K, d)
    if x.dim() != 2 or codebook.dim() != 2:
        raise ValueError(f"x and codebook must be 2-D, got shapes {tuple(x.shape)} and {tuple(codebook.shape)}")
    check_operands(x, codebook, metric)
    if cstat is None:
        cstat = codebook_stat(codebook, metric)
    ids, best_val = launch(x.unsqueeze(0), codebook.unsqueeze(0), cstat.unsqueeze(0), metric)
    norms = x_sq_norms if metric == "l2" else x_inv_norms
    dists = finish_distances(best_val[0], x, metric, norms)
    return ids[0], dists


def check_operands(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    """The checks every launch of the kernel needs: metric, last dimensions, dtypes, devices, K > 0.

    ``x``: (..., d) and ``codebook``: (..., K, d).
    """
    if metric not in METRIC_CODES:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRIC_CODES)}")
    if x.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"dimension mismatch: x has dim {x.shape[-1]}, codebook has dim {codebook.shape[-1]}")
    if x.dtype != codebook.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"triton backend needs x and codebook of one dtype among float32/float16/bfloat16, got {x.dtype} and {codebook.dtype}"
        )
    if x.device != codebook.device:
        raise ValueError(f"x is on {x.device} but the codebook is on {codebook.device}")
    if codebook.shape[-2] == 0:
        raise ValueError("empty codebook (K = 0)")


def launch(x: torch.Tensor, codebooks: torch.Tensor, cstat: torch.Tensor, metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """One launch of the kernel over (query tile, K-split, group): group g of ``x`` searches
    codebook g. Inputs are checked by the caller (``check_operands``); any strides.

    Args:
        x: (G, N, d), codebooks: (G, K, d), cstat: (G, K) fp32 (see ``codebook_stat``).

    Returns:
        ids (G, N) int64 and the kernel's (G, N) fp32 minima: ||c||^2 - 2<x, c> (l2), -<x, c>
        (ip) or -<x, c>/||c|| (cos); ``finish_distances`` turns them into distances.
    """
    g, n, d = x.shape
    k = codebooks.shape[1]
    ids = torch.empty((g, n), dtype=torch.int64, device=x.device)
    if n == 0 or g == 0:
        return ids, torch.empty((g, n), dtype=torch.float32, device=x.device)
    metric_code = METRIC_CODES[metric]
    ieee = x.dtype == torch.float32
    autotune = os.environ.get(AUTOTUNE_ENV, "0") == "1" and x.device.type == "cuda"
    cfg = DEFAULT_CONFIGS["fp32" if ieee else "tensor_core"]
    sms = num_sms(x.device)
    strides = (x.stride(0), x.stride(1), x.stride(2), codebooks.stride(0), codebooks.stride(1), codebooks.stride(2),
               cstat.stride(0))
    if autotune:
        # each config gets the split count its own tile sizes want (grid_splits); the kernel
        # derives its slice from the grid (k_per_split = 0). The partial minima are sized for the
        # config with the most splits and start at +inf: a config with fewer leaves the rest
        # unwritten, and the reduction (value, then lowest index) never takes those
        most = max(grid_splits(g * n, k, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], sms) for c in _autotune_configs())
        part_val = torch.full((most, g, n), float("inf"), dtype=torch.float32, device=x.device)
        part_idx = torch.zeros((most, g, n), dtype=torch.int64, device=x.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                             grid_splits(g * n, k, meta["BLOCK_N"], meta["BLOCK_K"], sms), g)
        _get_autotuned_kernel()[grid](x, codebooks, cstat, part_val, part_idx, n, k, d, g, *strides, 0,
                                      METRIC=metric_code, IEEE=ieee)
    else:
        # every group's query tiles fill the device together: the split count sees G x N queries
        n_splits = grid_splits(g * n, k, cfg["BLOCK_N"], cfg["BLOCK_K"], sms)
        k_per_split = triton.cdiv(triton.cdiv(k, n_splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        part_val = torch.empty((n_splits, g, n), dtype=torch.float32, device=x.device)
        part_idx = torch.empty((n_splits, g, n), dtype=torch.int64, device=x.device)
        args = (x, codebooks, cstat, part_val, part_idx, n, k, d, g, *strides, k_per_split)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), n_splits, g)
        _nearest_kernel[grid](
            *args, METRIC=metric_code, IEEE=ieee,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    best_val, ids = reduce_splits(part_val, part_idx)
    return ids, best_val


def finish_distances(best_val: torch.Tensor, x: torch.Tensor, metric: str,
                     norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Distances from the kernel's minima ``best_val`` (...,) of the queries ``x`` (..., d).

    ``norms``: optional precomputed fp32 ||x||^2 (l2) or 1/||x|| (cos), shape (...,).
    """
    if metric == "l2":
        if norms is None:
            norms = x.float().pow(2).sum(dim=-1)
        return (best_val + norms).clamp_min_(0.0)
    if metric == "ip":
        return best_val
    if norms is None:
        norms = x.float().norm(dim=-1).reciprocal()
    return 1.0 + best_val * norms


def codebook_stat(codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(..., K) fp32 per-codeword statistic the kernel needs for ``metric`` (computed in fp64)."""
    # codebook: (..., K, d)
    if metric == "l2":
        return codebook.double().pow(2).sum(dim=-1).float()
    if metric == "cos":
        return codebook.double().norm(dim=-1).reciprocal().float()
    return torch.zeros(codebook.shape[:-1], dtype=torch.float32, device=codebook.device)


def aot_spec(name: str, dtype: str, runtime_values: Dict[str, int]) -> dict:
    """The ahead-of-time compile spec of the kernel for one dtype ("bf16" / "fp16" / "fp32") and
    the integer arguments of a representative launch (see ``compile.py``)."""
    cfg = DEFAULT_CONFIGS["fp32" if dtype == "fp32" else "tensor_core"]
    return dict(
        name=name,
        dtype=dtype,
        fn=_nearest_kernel,
        signature={
            "x_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "cstat_ptr": "*fp32",
            "part_val_ptr": "*fp32", "part_idx_ptr": "*i64",
            "N": "i32", "K": "i32", "D": "i32", "G": "i32",
            "stride_xg": "i64", "stride_xn": "i64", "stride_xd": "i64",
            "stride_cg": "i64", "stride_ck": "i64", "stride_cd": "i64", "stride_sg": "i64",
            "k_per_split": "i32",
            "METRIC": "constexpr", "IEEE": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr",
        },
        constexprs=dict(
            METRIC=METRIC_L2, IEEE=dtype == "fp32",
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
        ),
        runtime_values=runtime_values,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        expect_wgmma=dtype != "fp32",
    )


def aot_specs() -> List[dict]:
    """Signatures the ahead-of-time compile report builds this kernel with, one per dtype: what
    the JIT specialises on for contiguous (N = 2916, K = 500K, d = 1152) inputs, where unit strides
    become constants and multiples of 16 get divisibility hints (vectorised loads)."""
    n, k, d = 2916, 500_000, 1152
    values = dict(N=n, K=k, D=d, G=1, stride_xg=n * d, stride_xn=d, stride_xd=1, stride_cg=k * d,
                  stride_ck=d, stride_cd=1, stride_sg=k, k_per_split=41728)
    return [aot_spec("nearest", dtype, values) for dtype in ("bf16", "fp16", "fp32")]
