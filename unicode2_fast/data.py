"""Built-in synthetic data shaped like SigLIP patch features (no download needed).

SigLIP so400m patch features are d = 1152 vectors with a large shared mean component, grouped in a
two-level structure that the paper's two-stage k-means recovers: ~1K coarse clusters, each holding
many finer clusters. The generator reproduces that structure (seeded, deterministic):

    feature = mean + coarse_center[a] + fine_offset[a, b] + noise

and the matching codebook places one codeword at each fine cluster centre, so a query's nearest
codeword is close but competes with its siblings in the same coarse cell -- the hard case for
both exact and hierarchical search.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SyntheticCodebookData:
    """A codebook and queries drawn from the same two-level cluster structure.

    Attributes:
        codebook: (K, d) fp32 fine cluster centres.
        queries: (N, d) fp32 features drawn around random codewords.
        coarse_ids: (K,) int64 coarse cluster of each codeword.
        coarse_centroids: (n_coarse, d) fp32 coarse cluster centres (mean included).
    """

    codebook: torch.Tensor
    queries: torch.Tensor
    coarse_ids: torch.Tensor
    coarse_centroids: torch.Tensor


def siglip_like(
    k: int,
    n_queries: int,
    d: int = 1152,
    n_coarse: Optional[int] = None,
    *,
    coarse_spread: float = 1.0,
    fine_spread: float = 0.35,
    noise: float = 0.25,
    seed: int = 0,
) -> SyntheticCodebookData:
    """Generate a (K, d) codebook and (N, d) queries with a two-level cluster structure.

    Args:
        k: number of codewords (fine clusters), K >= 1.
        n_queries: number of query features N >= 0.
        d: feature dimension (SigLIP so400m: 1152).
        n_coarse: number of coarse clusters (default ~sqrt(K), capped at K).
        coarse_spread / fine_spread / noise: per-coordinate standard deviations of the coarse
            centres, of the fine centres around their coarse centre, and of a query around its
            fine centre.
        seed: generator seed; the same arguments always give the same tensors.

    Returns:
        SyntheticCodebookData.
    """
    if k < 1 or n_queries < 0 or d < 1:
        raise ValueError(f"need k >= 1, n_queries >= 0 and d >= 1, got k={k}, n_queries={n_queries}, d={d}")
    n_coarse = n_coarse or max(1, min(k, int(round(k ** 0.5))))
    if not 1 <= n_coarse <= k:
        raise ValueError(f"n_coarse must be in [1, k={k}], got {n_coarse}")
    g = torch.Generator().manual_seed(seed)
    mean = 0.5 * torch.randn(d, generator=g)
    coarse_centroids = mean + coarse_spread * torch.randn(n_coarse, d, generator=g)
    # unequal cluster sizes, like real data: sizes follow a skewed distribution
    weights = torch.rand(n_coarse, generator=g).pow(2) + 0.05
    coarse_ids = torch.multinomial(weights, k, replacement=True, generator=g)
    coarse_ids, _ = coarse_ids.sort()
    codebook = torch.empty(k, d)
    step = 65536  # fill in blocks so no (K, d) temporary beyond the output is alive
    for start in range(0, k, step):
        ids = coarse_ids[start:start + step]
        codebook[start:start + step] = coarse_centroids[ids] + fine_spread * torch.randn(ids.shape[0], d, generator=g)
    picks = torch.randint(0, k, (n_queries,), generator=g)
    queries = codebook[picks] + noise * torch.randn(n_queries, d, generator=g)
    return SyntheticCodebookData(codebook, queries, coarse_ids, coarse_centroids)
