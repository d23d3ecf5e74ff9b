"""``u2.HierarchicalIndex``: coarse-to-fine nearest-codeword search over a two-level codebook.

The codebook is partitioned into ``n_coarse`` cells, one per coarse centroid (the two-stage
k-means structure of the paper's codebook, or a k-means run here). The index stores the codewords
sorted by cell -- one contiguous block per cell, an int64 cell-offset table and the permutation back
to the original ids -- so the fine scan of a cell is one GEMM over a contiguous block.

Approximate search (``search(x, nprobe)``): each query ranks the cells by the distance to their
centroid and scans the ``nprobe`` nearest. The scan is grouped by cell: all queries that probe a
cell are gathered and multiplied with that cell's block at once, so a codeword is read once per
cell visit, not once per query. CPU: one torch GEMM per cell (BLAS). GPU: one Triton launch over
(cell, query tile) work items (``kernels/hierarchical.py``).

Metrics: "l2", "ip" (cells bounded by Cauchy-Schwarz: -<x, c> >= -<x, m> - ||x|| r) and "cos" (l2 on
the unit sphere: the cells hold the normalised codewords); ids and distances as u2.nearest's.

Exact search (``search(x, exact=True)``): the same grouped scan, run in rounds. For l2 every
codeword c of a cell with centroid m and radius r = max ||c - m|| satisfies, by the triangle
inequality, ``||x - c||^2 >= (||x - m|| - r)^2`` (when ||x - m|| > r), so a cell whose bound exceeds
the best distance found so far cannot hold the nearest codeword. Round by round each query scans its
next-nearest unpruned cells (1, 1, 2, 4, ... per round), its upper bound tightens and more cells
prune; a query whose unpruned cells still hold over FALLBACK_FRACTION of the codebook (loose bounds:
unclustered data, queries far from every cell) is finished by ``u2.nearest`` over the whole
codebook, so exact mode is never much slower than the flat scan. As in ``_nearest_cpu``, the fp32
GEMM distances are only a filter: every bound carries a rigorous margin for fp32 rounding, every
codeword that could be the nearest given those margins is kept as a candidate, and the candidates
are re-ranked with float64 distances from the original vectors, ties to the lowest original id --
the result equals ``u2.nearest(x, codebook)`` on the CPU. The engine is ``_cells``, which
u2.nearest's CPU path also runs, over a partition of its own, for tightly clustered codebooks.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Dict, Optional, Tuple, Union

import safetensors
import safetensors.torch
import torch

from . import _cells, _dispatch, _lloyd, _native
from ._certified import ieee_fp32_matmul, pair_objective
from ._checks import (array_kind, check_finite, check_float, check_matrix, check_no_zero_rows, flatten_queries,
                      from_tensor, to_tensor)
from ._io import atomic_write
from .codebook import Codebook, codebook_matrix
from .profiling import stage
from .nearest import nearest

FORMAT = "unicode2_fast.hierarchical_index"
VERSION = "1"
METRICS = ("l2", "ip", "cos")
BACKENDS = _dispatch.backends("hierarchical")

#: cells probed when ``search`` is called without ``nprobe`` (fewer if the index has fewer cells)
DEFAULT_NPROBE = 8
#: k-means trains on at most this many codewords per coarse centroid (a seeded subsample, as FAISS)
MAX_POINTS_PER_CENTROID = 256
#: queries per chunk: bounds the (chunk, n_coarse) coarse tables and the per-cell gathers
QUERY_CHUNK = 4096
#: exact mode (``_cells``): a query whose unpruned cells hold more than FALLBACK_FRACTION of the
#: codewords after a few rounds is finished by ``u2.nearest`` instead of fp32 cell scans
FALLBACK_FRACTION = 0.25
#: exact mode runs ``u2.nearest`` for the whole chunk, not the cell scans, once EXACT_MISSES chunks
#: in a row had their cell scans read more than EXACT_MAX_SCAN_SHARE of the codebook per query (a
#: query the cells hand to u2.nearest counting as the whole codebook)
#: (unclustered codebooks: the bounds prune late, and the fp32 scans of a third of the codewords
#: cost twice the flat search; SigLIP-like K = 50,000, 100 cells: 0.77 s against 0.36 s), trying the
#: cells again on every EXACT_RETRY_EVERY-th chunk
EXACT_MAX_SCAN_SHARE = 0.1
EXACT_MISSES = 1
EXACT_RETRY_EVERY = 8
#: chunks of fewer queries (than this, or than QUERY_CHUNK) leave the record as it is
EXACT_RECORD_ROWS = 256


PathLike = Union[str, "os.PathLike[str]"]


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; HierarchicalIndex supports {METRICS}")


def _check_int(value: Any, name: str, low: int, high: Optional[int] = None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        upper = f", {high}" if high is not None else ", inf"
        raise ValueError(f"{name} must be in [{low}{upper}], got {value}{hint}")
    return value


class HierarchicalIndex:
    """Coarse cells over a (K, d) codebook for approximate (nprobe) and certified-exact search.

    Build one with :meth:`build` (k-means over the codewords) or :meth:`from_codebook` (a
    :class:`Codebook` that carries its two-stage structure in ``meta``), or directly from a
    partition.

    Args:
        codebook: (K, d) codewords (tensor, NumPy / CuPy array, any float dtype) or a Codebook.
        coarse_centroids: (n_coarse, d) centroid of each cell.
        coarse_ids: (K,) integer cell of each codeword, in [0, n_coarse). Any assignment gives
            exact results in exact mode; the nearest-centroid one gives the best recall and pruning.
        metric: "l2" (squared Euclidean distance), "ip" (maximum inner product) or "cos" (cosine:
            the cells hold the unit codewords, searched as l2 on the sphere), as in u2.nearest.

    Raises:
        TypeError / ValueError: wrong dtypes, shapes, devices, non-finite values, cell ids out of range.
    """

    def __init__(self, codebook: Any, coarse_centroids: Any, coarse_ids: Any, *, metric: str = "l2") -> None:
        _check_metric(metric)
        vectors = codebook_matrix(codebook)
        if metric == "cos":
            check_no_zero_rows(vectors, "codebook")
        k, d = vectors.shape
        centroids = to_tensor(coarse_centroids, "coarse_centroids")
        check_matrix(centroids, "coarse_centroids")
        check_float(centroids, "coarse_centroids")
        if centroids.shape[0] == 0 or centroids.shape[1] != d:
            raise ValueError(f"coarse_centroids must be (n_coarse >= 1, d={d}), got shape {tuple(centroids.shape)}")
        check_finite(centroids, "coarse_centroids")
        cells = to_tensor(coarse_ids, "coarse_ids")
        if cells.dim() != 1 or cells.shape[0] != k:
            raise ValueError(f"coarse_ids must have shape ({k},) (one cell per codeword), got {tuple(cells.shape)}")
        if cells.dtype.is_floating_point or cells.dtype.is_complex or cells.dtype == torch.bool:
            raise TypeError(f"coarse_ids must be an integer tensor, got dtype {cells.dtype}")
        n_coarse = centroids.shape[0]
        cells = cells.long()
        lo, hi = int(cells.min()), int(cells.max())
        if lo < 0 or hi >= n_coarse:
            raise ValueError(f"coarse_ids must lie in [0, n_coarse={n_coarse}), found values in [{lo}, {hi}]")
        if centroids.device != vectors.device or cells.device != vectors.device:
            raise ValueError(
                f"codebook, coarse_centroids and coarse_ids must be on one device, got {vectors.device}, "
                f"{centroids.device} and {cells.device}"
            )
        perm = torch.sort(cells, stable=True).indices  # stable: a cell keeps its codewords' original order
        identity = bool(torch.equal(perm, torch.arange(k, device=perm.device)))
        codes = vectors if identity else vectors.index_select(0, perm)
        sizes = torch.bincount(cells, minlength=n_coarse)
        self._setup(codes, perm, _cells.offsets(sizes), centroids.float(), metric, vectors)

    # ------------------------------------------------------------------------------------------
    # construction

    def _setup(self, codes: torch.Tensor, perm: torch.Tensor, cell_offsets: torch.Tensor, centroids: torch.Tensor,
               metric: str, codebook: Optional[torch.Tensor]) -> None:
        """Store the sorted layout and derive the per-codeword and per-cell statistics in float64.

        codes: (K, d) sorted by cell; perm: (K,) sorted position -> original id; cell_offsets:
        (n_coarse + 1,); centroids: (n_coarse, d) fp32; codebook: the original-order tensor or None.
        """
        self._metric = metric
        self._codes = codes.contiguous()
        # the statistics below describe these values: a later in-place change is refused at search
        self._versions = [(t, t._version) for t in (self._codes, codebook) if t is not None]
        self._perm = perm
        self._cell_offsets = cell_offsets
        self._codebook = codebook
        stored = self._codes
        # cos: the cells hold the unit codewords (the re-rank reads the original ones)
        rows = ((lambda start, stop: _unit64(stored[start:stop])) if metric == "cos"
                else (lambda start, stop: stored[start:stop]))
        self._cells = _cells.Cells(rows, perm, cell_offsets, centroids.float())
        self._offsets_list = self._cells.offsets_list
        self._coarse_centroids = self._cells.centroids
        self._cell_size = self._cells.cell_size
        self._cell_of_pos = self._cells.cell_of_pos
        self._centroid_sq = self._cells.centroid_sq
        self._radius = self._cells.radius  # (n_coarse,) rounded up: a certified cell radius
        self._codes32: Optional[torch.Tensor] = None
        self._kernel_codes: Dict[torch.dtype, torch.Tensor] = {}
        self._exact_misses = 0  # exact-mode chunks in a row whose cell scans did not pay
        self._exact_skipped = 0  # chunks sent to u2.nearest since the cells were last tried

    @classmethod
    def build(
        cls,
        codebook: Any,
        n_coarse: int = 1000,
        *,
        niter: int = 20,
        seed: int = 0,
        metric: str = "l2",
        max_points_per_centroid: int = MAX_POINTS_PER_CENTROID,
    ) -> "HierarchicalIndex":
        """Partition a codebook with k-means and index it.

        Lloyd's algorithm over a seeded subsample of at most ``max_points_per_centroid * n_coarse``
        codewords (as faiss.Kmeans), initialised with ``n_coarse`` distinct sampled codewords;
        sums are float64 and an empty cluster takes half of the largest one (split along a fixed
        +-pattern). Assignments -- in the iterations and of every codeword to its cell at the end
        -- are the codebook build's (FAISS's fp32 flat search on the CPU below
        ``_lloyd.FAISS_ASSIGN_MAX_K`` centroids, as faiss.Kmeans + IndexIVFFlat.add; else
        ``u2.nearest``): the same inputs and seed give the same index on one machine and thread
        count, and a codeword near a cell boundary may land in either cell on another BLAS.
        Exact search is exact for any cells; approximate search's recall is FAISS IVF's.
        Lloyd stops at a fixed point (an assignment equal to the last one), as faiss.Kmeans does,
        with the centroids all ``niter`` iterations would give. Measured (this 2-core machine,
        d = 1152, 2 threads, against faiss.Kmeans(niter=20, max_points_per_centroid=256) +
        IndexIVFFlat.add): K = 100,000, 320 cells, SigLIP-like: 9.05 s vs 8.46 s (1.07x FAISS's
        time); K = 50,000, 100 cells: 1.18x (SigLIP-like), 1.00x (clustered), measured before
        u2.nearest stopped reading its queries twice. Before the fixed-point
        stop: 1.19x / 1.88x at K = 100,000; 0.55x / 0.74x with ``max_points_per_centroid=64``. The smaller sample costs recall@1 at nprobe = 1
        on the SigLIP-like codebook (0.964 vs 0.973; FAISS 0.990; 1.0 for all at nprobe = 8) and,
        with its less even cells, exact search speed: 0.89 s instead of 0.45 s for 729 queries at
        K = 50,000, 100 cells. The default keeps the better cells.

        Args:
            codebook: (K, d) codewords or a :class:`Codebook`.
            n_coarse: number of cells, 1 <= n_coarse <= K.
            niter: Lloyd iterations (0: the sampled codewords are the centroids).
            seed: seed of the subsample and the initialisation.
            metric: "l2", "ip" or "cos" (k-means on the unit codewords).
            max_points_per_centroid: training-subsample size per centroid.

        Raises:
            ValueError: n_coarse outside [1, K], negative niter, bad codebook.
        """
        _check_metric(metric)
        vectors = codebook_matrix(codebook)
        k = vectors.shape[0]
        n_coarse = _check_int(n_coarse, "n_coarse", 1, k, f" (it cannot exceed the number of codewords K={k})")
        niter = _check_int(niter, "niter", 0)
        max_points_per_centroid = _check_int(max_points_per_centroid, "max_points_per_centroid", 1)
        if metric == "cos":
            check_no_zero_rows(vectors, "codebook")
        # cos: cells of the unit codewords (k-means on the sphere's points); ip: of the codewords
        # (cos: any partition keeps exact mode exact, so k-means may read fp32 unit rows: float64
        # norms in one compiled pass, one fp32 division; the cells' own statistics stay float64)
        space = _unit32(vectors) if metric == "cos" else vectors
        with stage("hierarchical/kmeans"):
            centroids = _kmeans(space, n_coarse, niter, seed, max_points_per_centroid)
        with stage("hierarchical/assign"):
            coarse_ids, _ = _lloyd.fast_assign(space.float(), centroids)
        return cls(vectors, centroids, coarse_ids, metric=metric)

    @classmethod
    def from_codebook(cls, codebook: Codebook, *, metric: str = "l2") -> "HierarchicalIndex":
        """Index a codebook with the two-stage structure it carries.

        Uses ``codebook.meta["coarse_ids"]`` ((K,) int) and ``codebook.meta["coarse_centroids"]``
        ((n_coarse, d)), as recorded by ``u2.build_codebook``.

        Raises:
            TypeError: ``codebook`` is not a :class:`Codebook`.
            ValueError: the meta entries are missing or inconsistent with the codebook.
        """
        if not isinstance(codebook, Codebook):
            raise TypeError(
                f"from_codebook needs a u2.Codebook, got {type(codebook).__name__}; "
                "for a plain tensor use HierarchicalIndex.build(codebook, n_coarse=...)"
            )
        missing = [key for key in ("coarse_ids", "coarse_centroids") if key not in codebook.meta]
        if missing:
            raise ValueError(
                f"the codebook carries no two-stage structure: meta lacks {missing} "
                f"(present: {sorted(codebook.meta)}); "
                "build the cells with HierarchicalIndex.build(codebook, n_coarse=...) instead"
            )
        meta = codebook.meta
        centroids, cells = meta["coarse_centroids"], meta["coarse_ids"]
        if not isinstance(centroids, torch.Tensor) or not isinstance(cells, torch.Tensor):
            raise ValueError("codebook.meta['coarse_ids'] and meta['coarse_centroids'] must be tensors / arrays")
        device = codebook.device
        try:
            return cls(codebook, centroids.to(device), cells.to(device), metric=metric)
        except (TypeError, ValueError) as error:
            raise ValueError(f"codebook.meta holds an invalid two-stage structure: {error}") from error

    # ------------------------------------------------------------------------------------------
    # properties

    @property
    def coarse_centroids(self) -> torch.Tensor:
        """(n_coarse, d) float32 centroid of each cell."""
        return self._coarse_centroids

    @property
    def coarse_ids(self) -> torch.Tensor:
        """(K,) int64 cell of each codeword, in the original codeword order."""
        ids = torch.empty_like(self._cell_of_pos)
        ids[self._perm] = self._cell_of_pos
        return ids

    @property
    def cell_sizes(self) -> torch.Tensor:
        """(n_coarse,) int64 number of codewords in each cell."""
        return self._cell_size

    @property
    def ntotal(self) -> int:
        """Number of codewords K."""
        return self._codes.shape[0]

    @property
    def dim(self) -> int:
        return self._codes.shape[1]

    @property
    def n_coarse(self) -> int:
        return self._coarse_centroids.shape[0]

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def device(self) -> torch.device:
        return self._codes.device

    @property
    def dtype(self) -> torch.dtype:
        return self._codes.dtype

    def __repr__(self) -> str:
        return (f"HierarchicalIndex(ntotal={self.ntotal}, dim={self.dim}, n_coarse={self.n_coarse}, "
                f"metric={self._metric!r}, dtype={self.dtype}, device={self.device})")

    def to(self, device: Union[str, torch.device]) -> "HierarchicalIndex":
        """A copy of the index on ``device`` (e.g. "cuda" for the Triton kernel)."""
        index = HierarchicalIndex.__new__(HierarchicalIndex)
        codebook = self._codebook.to(device) if self._codebook is not None else None
        index._setup(self._codes.to(device), self._perm.to(device), self._cell_offsets.to(device),
                     self._coarse_centroids.to(device), self._metric, codebook)
        return index

    # ------------------------------------------------------------------------------------------
    # search

    def search(
        self, x: Any, nprobe: Optional[int] = None, *, exact: bool = False, backend: str = "auto"
    ) -> Tuple[Any, Any]:
        """Nearest codeword of every query, scanning only some cells.

        Args:
            x: (..., d) queries: torch tensor, NumPy or CuPy array, any float dtype, on the index's device.
            nprobe: cells scanned per query in approximate mode, 1 <= nprobe <= n_coarse
                (default: DEFAULT_NPROBE = 8, or n_coarse if fewer). Ignored with ``exact=True``.
            exact: certified exact search: the same ids and distances as ``u2.nearest(x, codebook)``.
            backend: "auto" | "triton" | "torch" for the approximate scan ("triton": the grouped
                kernel, on CUDA or under TRITON_INTERPRET=1; "auto": Triton on CUDA). Exact mode
                runs the torch path on either device.

        Returns:
            ``(ids, dists)``: int64 original codeword ids and float32 distances in u2.nearest's
            meaning for the index's metric (squared L2, ``-<x, c>`` or ``1 - cos``; computed in
            float64 from the original vectors), shape x.shape[:-1], as the array kind of ``x``.
            Approximate mode returns the nearest codeword among the probed cells (lowest original
            id on equal fp32 distance).

        Raises:
            TypeError: non-float x, a non-int nprobe.
            ValueError: dimension or device mismatch, NaN / Inf, nprobe out of range, unknown or
                unavailable backend.
        """
        with stage("hierarchical"):
            kind = array_kind(x)
            xt = to_tensor(x, "x")
            check_float(xt, "x")
            if xt.device != self.device:
                raise ValueError(f"x is on {xt.device} but the index is on {self.device}; use index.to(device)")
            x2d, lead = flatten_queries(xt, self.dim)
            check_finite(x2d, "x")
            if any(t._version != version for t, version in self._versions):
                raise ValueError("the codebook was modified in place after the index was built; build the index again")
            if nprobe is not None:
                hint = f" (the index has n_coarse={self.n_coarse} cells)"
                nprobe = _check_int(nprobe, "nprobe", 1, self.n_coarse, hint)
            if self._metric == "cos":
                check_no_zero_rows(x2d, "x")
            if self._metric != "l2" and backend == "triton":
                raise ValueError(f"the grouped Triton kernel scans l2 cells; metric {self._metric!r} runs "
                                 "backend='torch' (or 'auto')")
            resolved = ("torch" if self._metric != "l2" else
                        _dispatch.resolve("hierarchical", backend, self.device, (x2d.dtype, self.dtype)))
            if exact:
                if backend == "triton":
                    raise ValueError("exact=True runs the grouped torch scan; use backend='auto' or 'torch'")
                with stage("hierarchical/exact"), ieee_fp32_matmul():  # the bounds assume fp32 rounding
                    ids, dists = self._search_exact(x2d)
            else:
                nprobe = min(DEFAULT_NPROBE, self.n_coarse) if nprobe is None else nprobe
                with stage(f"hierarchical/{resolved}"):
                    ids, dists = self._search_approx(x2d, nprobe, resolved)
            return from_tensor(ids.reshape(lead), kind), from_tensor(dists.reshape(lead), kind)

    def probe_cells(self, x: torch.Tensor, nprobe: int, cell_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, nprobe) int64 cells an approximate search of the (N, d) queries ``x`` scans: the
        nprobe best by the coarse ranking (equal scores: the lower cell first). ``cell_sizes``
        (n_coarse,): which cells count as empty (default this index's own) -- the whole codebook's
        when this index holds one shard of it (``u2.distributed.ShardedHierarchicalIndex``)."""
        x32 = _unit64(x).float() if self._metric == "cos" else x.float()
        if cell_sizes is None:
            return self._probe(x32, nprobe)
        if self._metric != "ip":
            scores = torch.addmm(self._centroid_sq, x32, self._coarse_centroids.t(), alpha=-2.0)
        else:
            scores = torch.mm(x32, self._coarse_centroids.t()).neg_()
        scores = scores.masked_fill_((cell_sizes.to(scores.device) == 0).unsqueeze(0), math.inf)
        return torch.sort(scores, dim=1, stable=True).indices[:, :nprobe].contiguous()

    def scan_cells(self, x: torch.Tensor, probes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The approximate search's pick among the given cells: for the (N, d) queries ``x`` and
        (N, nprobe) cells, the original id of the best codeword (lowest id on equal fp32 score; -1
        where the probed cells hold none here), its fp32 score (comparable across cells, and
        across indexes that share these centroids; +inf where none) and its float64 objective
        (u2.nearest's: squared L2, -<x, c>, -cos)."""
        x32 = _unit64(x).float() if self._metric == "cos" else x.float()
        part_val, part_pos = self._scan_torch(x32, probes)
        pos = self._reduce_probes(part_val, part_pos)
        score = part_val.min(dim=1).values
        found = torch.isfinite(score)
        rows = torch.arange(pos.shape[0], device=x.device)
        objective = pair_objective(x, self._codes, rows, pos, self._metric, torch.float64)[0]
        ids = torch.where(found, self._perm[pos], torch.full_like(pos, -1))
        return ids, score, objective.masked_fill_(~found, math.inf)

    def _search_approx(self, x: torch.Tensor, nprobe: int, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
        # x: (N, d) -> ids (N,) int64, dists (N,) fp32
        n = x.shape[0]
        ids = torch.empty(n, dtype=torch.int64, device=x.device)
        dists = torch.empty(n, dtype=torch.float32, device=x.device)
        for start in range(0, n, QUERY_CHUNK):
            chunk = x[start:start + QUERY_CHUNK]
            x32 = _unit64(chunk).float() if self._metric == "cos" else chunk.float()
            with stage("hierarchical/probe"):
                probes = self._probe(x32, nprobe)
            with stage("hierarchical/scan"):
                if backend == "triton":
                    part_val, part_pos = self._scan_triton(chunk, probes)
                else:
                    part_val, part_pos = self._scan_torch(x32, probes)
            pos = self._reduce_probes(part_val, part_pos)
            ids[start:start + QUERY_CHUNK] = self._perm[pos]
            rows = torch.arange(pos.shape[0], device=x.device)
            obj = pair_objective(chunk, self._codes, rows, pos, self._metric, torch.float64)[0]
            dists[start:start + QUERY_CHUNK] = _dists(obj, self._metric)
        return ids, dists

    def _probe(self, x32: torch.Tensor, nprobe: int) -> torch.Tensor:
        """(N, nprobe) int64 nearest cells of each query; equal scores rank the lower cell first."""
        scores = self._coarse_scores(x32)
        return torch.sort(scores, dim=1, stable=True).indices[:, :nprobe].contiguous()

    def _coarse_scores(self, x32: torch.Tensor) -> torch.Tensor:
        """(N, n_coarse) fp32 cell ranking (smaller first): ``||m||^2 - 2 <x, m>`` for l2 and cos (x
        unit for cos), ``-<x, m>`` for ip; +inf for empty cells."""
        if self._metric != "ip":  # cos: l2 on the unit sphere
            return self._cells.coarse_scores(x32)
        scores = torch.mm(x32, self._coarse_centroids.t()).neg_()
        return scores.masked_fill_((self._cell_size == 0).unsqueeze(0), math.inf)

    def _codes_fp32(self) -> torch.Tensor:
        if self._codes32 is None:
            self._codes32 = self._codes if self._codes.dtype == torch.float32 else self._codes.float()
        return self._codes32

    def _scan_torch(self, x32: torch.Tensor, probes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Grouped scan with one GEMM per cell; same outputs as ``kernels.hierarchical.probe_scan_triton``."""
        # x32: (N, d), probes: (N, nprobe)
        # In residual form, relative to the cell's centroid m: ||x - m||^2 + ||c - m||^2 - 2 <x - m, c - m>.
        # The plain expansion ||c||^2 - 2 <x, c> cancels catastrophically for tight clusters far
        # from the origin (its fp32 rounding scales with ||x|| ||c||, not with the cell's radius):
        # on a clustered codebook it returned a farther codeword of the right cell for 21-40% of
        # the queries; FAISS's IVF computes direct differences and had none.
        n, nprobe = probes.shape
        residuals, res_sq = self._cells.residuals()
        centroids64 = self._coarse_centroids.double()
        part_val = torch.full((n * nprobe,), math.inf, dtype=torch.float32, device=x32.device)
        part_pos = torch.zeros(n * nprobe, dtype=torch.int64, device=x32.device)
        slot_order, groups = self._cells.groups(probes.reshape(-1))
        query_order = torch.div(slot_order, nprobe, rounding_mode="floor")
        for cell, lo, hi in groups:
            start, stop = self._offsets_list[cell], self._offsets_list[cell + 1]
            if start == stop:
                continue
            slots, queries = slot_order[lo:hi], query_order[lo:hi]
            if self._metric != "ip":  # l2, and cos as l2 on the unit sphere
                xr64 = x32.index_select(0, queries).double() - centroids64[cell]
                scores = torch.addmm(res_sq[start:stop], xr64.float(), residuals[start:stop].t(), alpha=-2.0)
                offset = xr64.pow(2).sum(dim=1)
            else:  # -<x, c> = -<x, m> - <x, c - m>
                xq = x32.index_select(0, queries)
                scores = torch.mm(xq, residuals[start:stop].t()).neg_()
                offset = -(xq.double() @ centroids64[cell])
            val, arg = scores.min(dim=1)  # first minimum: the lowest position, i.e. lowest id in the cell
            val = val + offset.float()  # comparable across the probed cells
            part_val[slots] = val
            part_pos[slots] = arg + start
        return part_val.view(n, nprobe), part_pos.view(n, nprobe)

    def _scan_triton(self, x: torch.Tensor, probes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        from .kernels import hierarchical as kernel  # imported on first use: importing the package compiles nothing

        if x.dtype == torch.float64 or self.dtype == torch.float64:
            raise TypeError(
                "backend='triton' computes in float32/float16/bfloat16; float64 input needs backend='torch'")
        common = x.dtype
        if x.dtype != self.dtype:
            common = torch.promote_types(x.dtype, self.dtype)
            if common in (torch.float16, torch.bfloat16):
                common = torch.float32
        codes = self._kernel_codes.get(common)
        residuals, res_sq = self._cells.residuals()
        if codes is None:
            codes = self._kernel_codes[common] = _dispatch.kernel_layout(residuals, common)
        part_val, part_pos = kernel.probe_scan_triton(
            _dispatch.kernel_layout(x, common), codes, res_sq, self._cell_offsets, probes,
            _dispatch.kernel_layout(self._coarse_centroids, torch.float32))  # padded columns as the rows
        # + ||x - m||^2 of each (query, probed cell), so the probes compare; float64 (its expansion
        # rounds far below the fp32 scores)
        x64, m64 = x.double(), self._coarse_centroids.double()
        to_cell = (x64.pow(2).sum(dim=1, keepdim=True) + m64.pow(2).sum(dim=1).unsqueeze(0)
                   - 2.0 * (x64 @ m64.t())).clamp_min_(0.0)
        return part_val + to_cell.gather(1, probes).float(), part_pos

    def _reduce_probes(self, part_val: torch.Tensor, part_pos: torch.Tensor) -> torch.Tensor:
        """(N,) sorted position of the best probe's codeword; equal values go to the lowest original id."""
        # part_val, part_pos: (N, nprobe)
        best = part_val.min(dim=1, keepdim=True).values
        original = self._perm[part_pos]
        sentinel = torch.iinfo(torch.int64).max
        choice = torch.where(part_val == best, original, torch.full_like(original, sentinel)).argmin(dim=1)
        return part_pos.gather(1, choice.unsqueeze(1)).squeeze(1)

    # ------------------------------------------------------------------------------------------
    # exact search

    def _search_exact(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # x: (N, d) -> ids (N,) int64, dists (N,) fp32
        n = x.shape[0]
        ids = torch.empty(n, dtype=torch.int64, device=x.device)
        dists = torch.empty(n, dtype=torch.float32, device=x.device)
        for start in range(0, n, QUERY_CHUNK):
            stop = start + QUERY_CHUNK
            ids[start:stop], dists[start:stop] = self._exact_chunk(x[start:stop])
        return ids, dists

    def _exact_chunk(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # x: (n, d) queries of one chunk; the queries the cells do not settle go to u2.nearest
        metric = self._metric
        if self._exact_misses >= EXACT_MISSES:
            self._exact_skipped += 1
            if self._exact_skipped % EXACT_RETRY_EVERY:  # the cells did not pay on this index lately
                return nearest(x, self._original_codebook(), metric=metric)
        work: list = []  # (query, codeword) pairs scanned; a query sent to u2.nearest counts as all K

        def fallback(rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            work.append(rows.shape[0] * self.ntotal)
            return nearest(rows, self._original_codebook(), metric=metric)

        ids, best = _cells.exact_search(self._cells, x, self._codes, True, fallback, FALLBACK_FRACTION, metric, work)
        if x.shape[0] >= min(QUERY_CHUNK, EXACT_RECORD_ROWS):  # (a short tail chunk says little)
            paid = sum(work) <= EXACT_MAX_SCAN_SHARE * x.shape[0] * self.ntotal
            self._exact_misses = 0 if paid else self._exact_misses + 1
            self._exact_skipped = 0 if paid else self._exact_skipped
        return ids, _dists(best, metric)

    def _original_codebook(self) -> torch.Tensor:
        """The codewords in original order (kept from the build, or un-permuted once after a load)."""
        if self._codebook is None:
            inverse = torch.empty_like(self._perm)
            inverse[self._perm] = torch.arange(self.ntotal, device=self._perm.device)
            self._codebook = self._codes.index_select(0, inverse)
        return self._codebook

    # ------------------------------------------------------------------------------------------
    # persistence

    def save(self, path: PathLike) -> None:
        """Write the index to ``path`` as safetensors, atomically.

        Stored: the codewords sorted by cell (their dtype), the permutation back to original ids,
        the cell offsets and the coarse centroids; derived statistics (norms, radii) are recomputed
        on load rather than trusted from disk. The file is written to a temporary file in the same
        directory, flushed, then renamed over ``path``; on error an existing file is left untouched.

        Raises:
            OSError: the directory is missing or not writable.
        """
        path = os.fspath(path)
        tensors = {
            "codes": self._codes.detach().cpu().contiguous(),
            "perm": self._perm.cpu().contiguous(),
            "cell_offsets": self._cell_offsets.cpu().contiguous(),
            "coarse_centroids": self._coarse_centroids.cpu().contiguous(),
        }
        header = {"format": FORMAT, "version": VERSION, "metric": self._metric}
        atomic_write(path, lambda tmp_path: safetensors.torch.save_file(tensors, tmp_path, metadata=header))

    @classmethod
    def load(cls, path: PathLike, device: Optional[Union[str, torch.device]] = None) -> "HierarchicalIndex":
        """Read an index written by :meth:`save`.

        Args:
            path: the safetensors file.
            device: where to put the index (default: CPU).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            IsADirectoryError: ``path`` is a directory.
            ValueError: not valid safetensors (empty, truncated, corrupt), a safetensors file that is
                not a hierarchical index (e.g. a codebook file), an unsupported version, or stored
                tensors with wrong shapes, dtypes or values. The message names the file.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"hierarchical index file not found: {path}")
        if os.path.isdir(path):
            raise IsADirectoryError(f"hierarchical index path is a directory, expected a .safetensors file: {path}")
        names = ("codes", "perm", "cell_offsets", "coarse_centroids")
        try:
            with safetensors.safe_open(path, framework="pt", device="cpu") as file:
                header = file.metadata() or {}
                if header.get("format") != FORMAT:
                    raise ValueError(
                        f"{path} is not a unicode2_fast hierarchical index: a safetensors file without "
                        f"format={FORMAT!r} metadata (format={header.get('format')!r})"
                    )
                if header.get("version") != VERSION:
                    raise ValueError(f"{path}: unsupported hierarchical index version {header.get('version')!r}; "
                                     f"this library reads version {VERSION}")
                missing = [name for name in names if name not in file.keys()]
                if missing:
                    raise ValueError(f"{path}: corrupt hierarchical index, tensors {missing} are missing")
                tensors = {name: file.get_tensor(name) for name in names}
        except safetensors.SafetensorError as error:
            raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupt?): {error}") from error
        metric = header.get("metric")
        if metric not in METRICS:
            raise ValueError(f"{path}: unsupported metric {metric!r} in the index header")
        codes, perm, offsets, centroids = (tensors[name] for name in names)
        try:
            _validate_stored(codes, perm, offsets, centroids)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: invalid stored hierarchical index: {error}") from error
        index = cls.__new__(cls)
        device = torch.device(device) if device is not None else torch.device("cpu")
        index._setup(codes.to(device), perm.to(device), offsets.to(device), centroids.to(device), metric, None)
        return index


def _dists(objective: torch.Tensor, metric: str) -> torch.Tensor:
    """u2.nearest's float32 distances from float64 objectives (-cos for cos: 1 - cos)."""
    return (1.0 + objective if metric == "cos" else objective).float()


def _unit32(rows: torch.Tensor) -> torch.Tensor:
    """(R, d) fp32 rows scaled to (about) unit norm for the k-means of a cos index (zero rows refused)."""
    r32 = rows.float().contiguous()
    return r32 / _native.norms64(r32).float().unsqueeze(1)


def _unit64(rows: torch.Tensor) -> torch.Tensor:
    """(R, d) float64 rows scaled to unit norm (the caller has refused zero rows)."""
    r64 = rows.double()
    return r64 / r64.norm(dim=1, keepdim=True)


def _kmeans(vectors: torch.Tensor, n_coarse: int, niter: int, seed: int, max_points_per_centroid: int) -> torch.Tensor:
    """(n_coarse, d) float32 centroids by the shared Lloyd loop over a seeded subsample of ``vectors: (K, d)``."""
    generator = torch.Generator().manual_seed(seed)
    k = vectors.shape[0]
    device = vectors.device
    n_train = min(k, n_coarse * max_points_per_centroid)
    if n_train < k:
        sample = torch.randperm(k, generator=generator)[:n_train].sort().values.to(device)
        train = vectors.index_select(0, sample)
    else:
        train = vectors
    init = torch.randperm(n_train, generator=generator)[:n_coarse].to(device)
    # split_halves, not the default refill: a codebook may hold fewer distinct codewords than cells
    return _lloyd.lloyd(train, train.index_select(0, init).float(), niter,
                        assign=_lloyd.training_assign(train, n_coarse), repair=_lloyd.split_halves).centroids


def _validate_stored(codes: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, centroids: torch.Tensor) -> None:
    """Check the tensors of an index file against each other (raises TypeError / ValueError)."""
    check_matrix(codes, "codes")
    check_float(codes, "codes")
    k, d = codes.shape
    if k == 0 or d == 0:
        raise ValueError(f"codes has shape {tuple(codes.shape)}, need K >= 1 and d >= 1")
    check_finite(codes, "codes")
    check_matrix(centroids, "coarse_centroids")
    check_float(centroids, "coarse_centroids")
    n_coarse = centroids.shape[0]
    if n_coarse == 0 or centroids.shape[1] != d:
        raise ValueError(f"coarse_centroids has shape {tuple(centroids.shape)}, expected (n_coarse >= 1, {d})")
    check_finite(centroids, "coarse_centroids")
    if perm.dtype != torch.int64 or perm.shape != (k,):
        raise ValueError(f"perm must be ({k},) int64, got {tuple(perm.shape)} {perm.dtype}")
    if not torch.equal(torch.sort(perm).values, torch.arange(k)):
        raise ValueError("perm is not a permutation of the codeword ids")
    if offsets.dtype != torch.int64 or offsets.shape != (n_coarse + 1,):
        raise ValueError(f"cell_offsets must be ({n_coarse + 1},) int64, got {tuple(offsets.shape)} {offsets.dtype}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != k or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"cell_offsets must rise from 0 to K={k}")
