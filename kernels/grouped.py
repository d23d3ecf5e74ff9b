"""Grouped nearest-codeword search (multi-codebook / product quantization) in one Triton launch.

Query group g (the g-th chunk of every vector, UniTok's sub-codebook split) searches codebook g.
It is the fused GEMM + running argmin of ``nearest.py`` with a third grid axis over the groups:
one launch covers (query tile, K-split, group) instead of G launches, so G = 8 sub-codebooks of
4096 codewords fill the device together (8 launches of 4096 codewords would each leave most SMs
idle at a few hundred queries) and the (N, G, d/G) queries are read in place through their
strides, never split into G contiguous copies.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton

from .nearest import aot_spec, check_operands, choose_splits, codebook_stat, finish_distances, launch


def nearest_grouped_triton(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    metric: str,
    cstat: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of every query chunk in its own codebook.

    Args:
        x: (N, G, d) query chunks, fp32 / fp16 / bf16, any strides.
        codebooks: (G, K, d) codewords, same dtype and device.
        metric: "l2", "ip" or "cos".
        cstat: optional (G, K) fp32 statistic of ``codebook_stat`` (callers cache it).

    Returns:
        ids (N, G) int64 and dists (N, G) fp32 (squared L2, -<x, c> or 1 - cos).

    Raises:
        ValueError / TypeError: shapes, group counts, dtypes, devices or metric that do not fit.
    """
    # x: (N, G, d), codebooks: (G, K, d)
    if x.dim() != 3 or codebooks.dim() != 3:
        raise ValueError(f"x must be (N, G, d) and codebooks (G, K, d), got shapes {tuple(x.shape)} and {tuple(codebooks.shape)}")
    if x.shape[1] != codebooks.shape[0]:
        raise ValueError(f"x has {x.shape[1]} groups but there are {codebooks.shape[0]} codebooks")
    check_operands(x, codebooks, metric)
    if cstat is None:
        cstat = codebook_stat(codebooks, metric)
    by_group = x.transpose(0, 1)  # (G, N, d) view
    ids, best_val = launch(by_group, codebooks, cstat, metric)
    dists = finish_distances(best_val, by_group, metric)
    return ids.t().contiguous(), dists.t().contiguous()  # (N, G), row-major like every other backend


def aot_specs() -> List[dict]:
    """The grouped launch at UniTok's shape (G = 8 sub-codebooks of K = 4096, d = 1152 split
    into chunks of 144) for 4 images of 729 patches: contiguous (N, G, 144) queries read through
    their strides, contiguous (G, K, 144) codebooks."""
    n, g, k, d = 2916, 8, 4096, 144
    block_k = 128
    splits = choose_splits(g * n, k, 128, block_k, 132)  # an H100's 132 SMs
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    values = dict(N=n, K=k, D=d, G=g, stride_xg=d, stride_xn=g * d, stride_xd=1, stride_cg=k * d,
                  stride_ck=d, stride_cd=1, stride_sg=k, k_per_split=k_per_split)
    return [aot_spec("nearest_grouped", dtype, values) for dtype in ("bf16", "fp16", "fp32")]
