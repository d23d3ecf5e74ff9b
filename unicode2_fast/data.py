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


# ----------------------------------------------------------------------------------------------
# data nobody tuned for: real photographs and adversarial codebooks (benchmarks and tests)

#: colour photographs that ship inside scikit-image's wheel (no download)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "cat",
          "colorwheel")
#: greyscale photographs that ship inside scikit-image's wheel
GRAY_PHOTOS = ("camera", "coins", "moon", "page", "text", "clock", "brick", "grass", "gravel")


def photo_patches(count: int, patch: int = 8, gray: bool = False, seed: int = 0) -> torch.Tensor:
    """(count, patch * patch * channels) fp32 patches in [0, 1] of real photographs.

    Patches are cut at seeded random positions of the photographs scikit-image ships (no
    download: ``pip install "unicode2_fast[bench]"``), so they overlap, and flat regions (sky,
    background) give masses of near-identical patches -- what real patch features look like.

    Raises:
        ImportError: scikit-image is not installed.
    """
    try:
        import skimage.data
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('real-photograph data needs scikit-image: pip install "unicode2_fast[bench]"') from error
    names = GRAY_PHOTOS if gray else PHOTOS
    images = []
    for name in names:
        image = torch.from_numpy(getattr(skimage.data, name)().copy())
        image = image.float() / 255.0
        if gray and image.dim() == 3:
            image = image[..., :3].mean(dim=2)
        if not gray and image.dim() == 2:
            image = image.unsqueeze(2).expand(-1, -1, 3)
        images.append(image[..., :3] if not gray else image)
    generator = torch.Generator().manual_seed(seed)
    which = torch.randint(len(images), (count,), generator=generator)
    out = torch.empty((count, patch * patch * (1 if gray else 3)), dtype=torch.float32)
    for i, image in enumerate(images):
        rows = (which == i).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        h, w = image.shape[0] - patch + 1, image.shape[1] - patch + 1
        top = torch.randint(h, (rows.numel(),), generator=generator)
        left = torch.randint(w, (rows.numel(),), generator=generator)
        offsets = torch.arange(patch)
        r = (top.unsqueeze(1) + offsets).unsqueeze(2)   # (m, patch, 1)
        c = (left.unsqueeze(1) + offsets).unsqueeze(1)  # (m, 1, patch)
        out[rows] = image[r, c].reshape(rows.numel(), -1)
    return out


def clustered_codebook(k: int, n: int, d: int, n_families: int = 40, n_cells: int = 450,
                       seed: int = 0) -> SyntheticCodebookData:
    """A tightly clustered two-level codebook: ``n_cells`` cells in ``n_families`` close families,
    a decaying spectrum, and queries drawn inside the cells.

    Many codewords lie close to each query relative to their distance from the origin: the
    adversarial case for low-precision filters (their error bounds scale with the norms).
    """
    generator = torch.Generator().manual_seed(seed)
    spectrum = (1.0 + torch.arange(d, dtype=torch.float32)).rsqrt()  # decaying per-dimension scale
    mean = 4.0 * torch.randn(d, generator=generator) * spectrum
    families = mean + 0.3 * torch.randn(n_families, d, generator=generator) * spectrum
    cell_family = torch.randint(n_families, (n_cells,), generator=generator)
    cells = families[cell_family] + 0.05 * torch.randn(n_cells, d, generator=generator) * spectrum
    coarse_ids = torch.randint(n_cells, (k,), generator=generator)
    codebook = cells[coarse_ids] + 0.01 * torch.randn(k, d, generator=generator) * spectrum
    query_cells = torch.randint(n_cells, (n,), generator=generator)
    queries = cells[query_cells] + 0.01 * torch.randn(n, d, generator=generator) * spectrum
    return SyntheticCodebookData(codebook.contiguous(), queries.contiguous(), coarse_ids, cells)


def near_duplicates(k: int, n: int, d: int, seed: int = 0) -> SyntheticCodebookData:
    """Exact ties and near-duplicates: half the codewords are exact copies of others, a quarter
    differ from another by one fp32 ulp-scale nudge, and half the queries equal a codeword."""
    generator = torch.Generator().manual_seed(seed)
    distinct = torch.randn(max(1, k // 4), d, generator=generator)
    source = torch.randint(distinct.shape[0], (k,), generator=generator)
    codebook = distinct[source].clone()
    nudged = torch.rand(k, generator=generator) < 0.25
    codebook[nudged] += 1e-6 * torch.randn(int(nudged.sum()), d, generator=generator)
    pick = torch.randint(k, (n,), generator=generator)
    queries = codebook[pick].clone()
    noisy = torch.rand(n, generator=generator) < 0.5
    queries[noisy] += 1e-3 * torch.randn(int(noisy.sum()), d, generator=generator)
    return SyntheticCodebookData(codebook, queries, source, distinct)
