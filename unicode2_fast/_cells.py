"""Certified-exact l2 nearest-codeword search over a codebook partitioned into cells.

The engine of ``HierarchicalIndex.search(exact=True)`` and, on the CPU, of ``u2.nearest`` for
codebooks whose flat scan does not certify (tight clusters: see ``_nearest_cpu._flat_search``).
It imports neither of them; the caller passes the search that finishes the queries it cannot prune.

For every codeword c of a cell with centroid m and radius r = max ||c - m||, by the triangle
inequality ``||x - c||^2 >= (||x - m|| - r)^2`` (when ||x - m|| > r), so a cell whose bound exceeds
the best distance found so far cannot hold the nearest codeword. Round by round each query scans
its next-nearest unpruned cells (1, 1, 2, 4, ... per round), its upper bound tightens and more
cells prune; a query whose unpruned cells still hold over ``fallback_fraction`` of the codebook
(loose bounds: unclustered data, queries far from every cell) goes to the caller's fallback.
Within a cell the fp32 GEMM runs in residual form (x - m against c - m), so its rounding scales
with the cell's radius, not with the codewords' distance from the origin; every bound carries a
rigorous margin for that rounding, every codeword that could be the nearest given those margins
is kept, and the candidates are re-ranked in float64 from the original vectors, ties to the
lowest original id.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from . import _native
from ._certified import GROW64, U32, U64, CandidateStore, lowest_of_min, pair_objective, sum_rounding
from .profiling import stage

#: rows converted to float64 at a time for codeword statistics
STAT_CHUNK = 16384
#: cells each unfinished query scans in round r (the last entry doubles afterwards)
ROUND_CELLS = (1, 1, 2)
#: from this round on, a query whose unpruned cells hold more than the fallback fraction of the
#: codewords goes to the fallback search
FALLBACK_AFTER_ROUNDS = 2

#: ``fallback(x_rows) -> (ids, dists)`` finishes the queries the cells do not settle
Fallback = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


#: rows converted to float64 at a time by cluster_means (bounds its fp64 buffer)
MEANS_CHUNK_ROWS = 2048


def cluster_means(x: torch.Tensor, ids: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Means of the clusters, summed in float64: centroids (k, d) fp64 (0 for an empty cluster)
    and member counts (k,) int64 (Lloyd's update, of the codebook build and of the cells)."""
    # x: (n, d) float, ids: (n,) int64
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float64, device=x.device)
    counts = torch.bincount(ids, minlength=k)
    # fp32 CPU rows: one compiled pass, the same sums as the index_add_ below (it was half of the
    # hierarchical index build's Lloyd loop, 0.21 of 0.45 s at K = 50,000: a float64 copy of every
    # chunk, then the add)
    if _native.cluster_sums_f64(x, ids, sums):
        return sums / counts.clamp_min(1).unsqueeze(1), counts
    # one fp64 staging buffer, refilled per chunk: a fresh fp64 copy per chunk cost 2.5x the time
    # (page faults of the new allocation) at n = 25,600, d = 1152
    staging = torch.empty((min(MEANS_CHUNK_ROWS, x.shape[0]), x.shape[1]), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], MEANS_CHUNK_ROWS):
        part = staging[:min(MEANS_CHUNK_ROWS, x.shape[0] - start)]
        part.copy_(x[start:start + part.shape[0]])
        sums.index_add_(0, ids[start:start + part.shape[0]], part)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def offsets(sizes: torch.Tensor) -> torch.Tensor:
    """(n + 1,) int64 exclusive prefix sum of (n,) sizes."""
    out = torch.zeros(sizes.shape[0] + 1, dtype=torch.int64, device=sizes.device)
    torch.cumsum(sizes, 0, out=out[1:])
    return out


class Cells:
    """A (K, d) codebook partitioned into cells, as the exact scan reads it.

    Args:
        rows: ``rows(start, stop)`` gives the codewords at sorted positions [start, stop) (cell by
            cell, in original order within a cell).
        eager: build the fp32 residuals now, in the statistics pass, and keep no reference to ``rows``
            (otherwise they are built on first use).
        perm: (K,) int64 sorted position -> original id.
        cell_offsets: (n_cells + 1,) int64 start of each cell's positions.
        centroids: (n_cells, d) float32 centre of each cell (any point gives exact results; the
            cell's mean prunes best).
    """

    def __init__(self, rows: Callable[[int, int], torch.Tensor], perm: torch.Tensor, cell_offsets: torch.Tensor,
                 centroids: torch.Tensor, eager: bool = False):
        self._rows: Optional[Callable[[int, int], torch.Tensor]] = rows
        self.perm = perm
        self.cell_offsets = cell_offsets
        self.offsets_list: List[int] = cell_offsets.tolist()
        self.centroids = centroids.contiguous()
        self.cell_size = cell_offsets[1:] - cell_offsets[:-1]
        self.n_cells = centroids.shape[0]
        device = centroids.device
        self.cell_of_pos = torch.repeat_interleave(torch.arange(self.n_cells, device=device), self.cell_size)
        centroid_sq64 = centroids.double().pow(2).sum(dim=1)
        self.centroid_sq = centroid_sq64.float()
        self.centroid_norm = centroid_sq64.sqrt() * (1 + GROW64)
        self.centroid_sq_bound = centroid_sq64 * (1 + GROW64)
        k, d = perm.shape[0], centroids.shape[1]
        self.codes_sq64 = torch.empty(k, dtype=torch.float64, device=device)
        to_centroid = torch.empty(k, dtype=torch.float64, device=device)
        self._residuals: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if eager:  # the residuals in the same pass, and ``rows`` dropped (a cache entry must not hold its codebook)
            self._residuals = (torch.empty((k, d), dtype=torch.float32, device=device),
                               torch.empty(k, dtype=torch.float32, device=device))
        for start, stop, c64, r64 in self.chunks():
            self.codes_sq64[start:stop] = torch.linalg.vector_norm(c64, dim=1).pow_(2)
            to_centroid[start:stop] = torch.linalg.vector_norm(r64, dim=1)
            if self._residuals is not None:
                self._residuals[0][start:stop] = r64
                self._residuals[1][start:stop] = to_centroid[start:stop].pow(2)
        self.radius = self.cell_max(to_centroid)  # (n_cells,) rounded up: a certified cell radius
        self.code_norm_max = self.cell_max(self.codes_sq64.sqrt())  # (n_cells,) largest ||c|| per cell
        if eager:
            self._rows = None

    def cell_max(self, values: torch.Tensor) -> torch.Tensor:
        """(n_cells,) largest of per-position ``values`` in each cell, rounded up (0 for empty cells)."""
        out = torch.zeros(self.n_cells, dtype=torch.float64, device=values.device)
        return out.scatter_reduce(0, self.cell_of_pos, values, reduce="amax") * (1 + GROW64)

    def chunks(self):
        """(start, stop, c64, r64) over the sorted codewords, at most STAT_CHUNK rows of one cell at a
        time: the rows in float64 and minus their cell's centroid (no (rows, d) gather of centroids)."""
        centroids64 = self.centroids.double()
        for cell in range(self.n_cells):
            for start in range(self.offsets_list[cell], self.offsets_list[cell + 1], STAT_CHUNK):
                stop = min(self.offsets_list[cell + 1], start + STAT_CHUNK)
                c64 = self._rows(start, stop).double()
                yield start, stop, c64, c64 - centroids64[cell]

    def residuals(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K, d) fp32 codewords minus their cell's centroid (from float64) and (K,) fp32 squared
        norms of those: the scans' operands, built on first use."""
        if self._residuals is None:
            k, d = self.perm.shape[0], self.centroids.shape[1]
            res = torch.empty((k, d), dtype=torch.float32, device=self.centroids.device)
            res_sq = torch.empty(k, dtype=torch.float32, device=self.centroids.device)
            for start, stop, _, r64 in self.chunks():
                res[start:stop] = r64
                res_sq[start:stop] = torch.linalg.vector_norm(r64, dim=1).pow_(2)
            self._residuals = (res, res_sq)
        return self._residuals

    def coarse_scores(self, x32: torch.Tensor) -> torch.Tensor:
        """(N, n_cells) fp32 ``||m||^2 - 2 <x, m>``; +inf for empty cells, so they rank last."""
        scores = torch.addmm(self.centroid_sq, x32, self.centroids.t(), alpha=-2.0)
        return scores.masked_fill_((self.cell_size == 0).unsqueeze(0), math.inf)

    def groups(self, cells: torch.Tensor) -> Tuple[torch.Tensor, List[Tuple[int, int, int]]]:
        """Group pairs by cell: ``order`` (P,) sorts the pairs by cell (stable: pair order kept within a
        cell), and each (cell, lo, hi) says that ``order[lo:hi]`` are that cell's pairs."""
        order = torch.sort(cells, stable=True).indices
        counts = torch.bincount(cells, minlength=self.n_cells)
        present = counts.nonzero().squeeze(1)
        bounds = offsets(counts[present]).tolist()
        return order, [(cell, bounds[i], bounds[i + 1]) for i, cell in enumerate(present.tolist())]


def exact_search(cells: Cells, x: torch.Tensor, codes: torch.Tensor, codes_sorted: bool, fallback: Fallback,
                 fallback_fraction: float, metric: str = "l2",
                 work: Optional[List[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest codeword of the queries ``x: (n, d)`` (one chunk: the caller bounds n).

    ``codes``: the codewords the float64 re-rank reads: in sorted order (``codes_sorted``) or the
    original codebook. ``metric``: "l2"; "ip" (the cells hold the codewords themselves) or "cos"
    (the cells hold the unit-normalised codewords: ``rows`` of :class:`Cells` normalises them).
    Returns ids (n,) int64 (original ids) and the objective (n,) float64: the squared distance,
    ``-<x, c>`` or ``-cos(x, c)``; ``fallback`` returns u2.nearest's (ids, dists) for its metric.
    ``work``: when given, the (query, codeword) pairs the cell scans read are appended to it.
    """
    n = x.shape[0]
    with stage("cells/bounds"):
        if metric == "l2":
            lower, order, scan = _plan_l2(cells, x)
        elif metric == "ip":
            lower, order, scan = _plan_ip(cells, x)
        else:
            # cos is l2 on the unit sphere: -cos(x, c) = ||x^ - c^||^2 / 2 - 1 (the triangle bound is
            # quadratic in the distances; Cauchy-Schwarz on -<x^, c^> would be linear and prune
            # nothing in tight cells). The extra slack covers the float64 normalisation and the
            # re-rank's own evaluation of -cos, which may order codewords within it differently.
            x64 = x.double()
            lower, order, scan = _plan_l2(cells, x64 / x64.norm(dim=1, keepdim=True),
                                          16.0 * sum_rounding(2 * x.shape[1] + 10, U64))
    unsettled, store, upper = _rounds(cells, lower, order, scan, n, x.device, fallback_fraction, work)
    with stage("cells/rerank"):
        cand_rows, cand_pos, _ = store.surviving(upper)
        cand_ids = cells.perm[cand_pos]
        obj64, _ = pair_objective(x, codes, cand_rows, cand_pos if codes_sorted else cand_ids, metric, torch.float64)
        ids, best = lowest_of_min(n, cand_rows, cand_ids, obj64)
    if bool(unsettled.any()):
        with stage("cells/fallback"):
            rows = unsettled.nonzero().squeeze(1)
            fb_ids, fb_dists = fallback(x[rows])
            ids[rows] = fb_ids
            best[rows] = fb_dists.double() - 1.0 if metric == "cos" else fb_dists.double()  # 1 - cos -> -cos
    return ids, best


def _rounds(cells: Cells, lower: torch.Tensor, order: torch.Tensor, scan: Callable, n: int, device,
            fallback_fraction: float, work: Optional[List[int]] = None) -> Tuple[torch.Tensor, CandidateStore, torch.Tensor]:
    """The round loop of every metric: each unfinished query scans its next unpruned cells.

    lower: (n, n_cells) lower bound of each query's objective in each cell, in the scan order
    ``order`` (n, n_cells). Returns the queries left to the fallback, the candidates and the
    upper bounds."""
    size = cells.cell_size[order]
    done = size == 0
    upper = torch.full((n,), math.inf, dtype=torch.float64, device=device)  # >= the true minimum
    store = CandidateStore(n, device)
    # queries finished by the fallback: too many near-equal codewords (the store's cap) or too
    # much of the codebook left unpruned
    unsettled = store.overflow
    k = cells.perm.shape[0]
    for round_index in range(cells.n_cells + len(ROUND_CELLS)):
        alive = ~done & (lower <= upper.unsqueeze(1)) & ~unsettled.unsqueeze(1)
        done |= ~alive  # upper only decreases: a pruned cell stays pruned
        if round_index >= FALLBACK_AFTER_ROUNDS:
            remaining = torch.where(alive, size, 0).sum(dim=1)
            unsettled |= remaining > fallback_fraction * k
            alive &= ~unsettled.unsqueeze(1)
        per_query = (ROUND_CELLS[round_index] if round_index < len(ROUND_CELLS)
                     else min(cells.n_cells, ROUND_CELLS[-1] << (round_index - len(ROUND_CELLS) + 1)))
        pick = alive & (alive.cumsum(dim=1) <= per_query)
        rows, ranks = pick.nonzero(as_tuple=True)
        if rows.numel() == 0:
            break
        done |= pick
        if work is not None:
            work.append(int(size[rows, ranks].sum()))
        with stage("cells/scan"):
            scan(rows, order[rows, ranks], upper, store)
    return unsettled, store, upper


def _plan_l2(cells: Cells, x: torch.Tensor, abs_slack: float = 0.0):
    """(lower, order, scan) for l2: cells by increasing coarse distance, bound (||x - m|| - r)^2,
    every bound widened by ``abs_slack`` more."""
    d = x.shape[1]
    x32 = x.float()
    x_sq = x.double().pow(2).sum(dim=1)  # ||x||^2: the fp32 filter leaves it out, bounds add it back
    x_norm = x_sq.sqrt() * (1 + GROW64)
    # |fl(<x32, c32>) - <x, c>| <= gamma ||x|| ||c||: d-term fp32 sum plus rounding x or c to fp32
    gamma = sum_rounding(d, U32)
    scores = cells.coarse_scores(x32)  # (n, n_cells)
    # ||x - m||^2 in float64 (an fp32 expansion cancels on tight cells far from the
    # origin, and its loose bound would prune nothing there)
    coarse = torch.addmm(cells.centroid_sq_bound / (1 + GROW64) + x_sq.unsqueeze(1), x.double(),
                         cells.centroids.double().t(), alpha=-2.0)
    cross = x_norm.unsqueeze(1) * cells.centroid_norm.unsqueeze(0)
    coarse_err = sum_rounding(d + 4, U64) * (x_sq.unsqueeze(1) + cells.centroid_sq_bound + 2.0 * cross)
    centroid_dist = (coarse - coarse_err).clamp_min_(0.0).sqrt_().mul_(1 - GROW64)
    lower = (centroid_dist - cells.radius.unsqueeze(0)).clamp_min_(0.0).pow_(2).mul_(1 - GROW64) - abs_slack
    # cells in increasing coarse distance (lower cell first on ties); empty cells are never scanned
    order = torch.sort(scores, dim=1, stable=True).indices
    return lower.gather(1, order), order, lambda rows, pair_cells, upper, store: _scan_l2(
        cells, x, gamma, rows, pair_cells, upper, store, abs_slack)


def _plan_ip(cells: Cells, x: torch.Tensor):
    """(lower, order, scan) for ip.

    Objective -<x, c>; for c in a cell with centre m and radius r, by Cauchy-Schwarz
    -<x, c> = -<x, m> - <x, c - m> >= -<x, m> - ||x|| r. Cells are scanned by increasing bound.
    """
    d = x.shape[1]
    x64 = x.double()
    x_norm = x64.norm(dim=1) * (1 + GROW64)
    base = -(x64 @ cells.centroids.double().t())  # (n, n_cells) -<x, m>
    # float64 effects, per unit of ||x|| (||c|| + ||m||): -<x, m> itself, the rounding of c - m
    # (relative to ||c|| + ||m||, not to the radius) and the re-rank's own evaluation of -<x, c>,
    # which may order two codewords within it differently from the exact values
    slack64 = 4.0 * sum_rounding(2 * d + 10, U64) * (cells.code_norm_max + cells.centroid_norm)
    base_err = x_norm.unsqueeze(1) * slack64.unsqueeze(0)
    lower = base - base_err - x_norm.unsqueeze(1) * cells.radius.unsqueeze(0)
    lower = lower - lower.abs() * GROW64
    lower = lower.masked_fill_((cells.cell_size == 0).unsqueeze(0), math.inf)
    order = torch.sort(lower, dim=1, stable=True).indices
    gamma = sum_rounding(d, U32)
    return lower.gather(1, order), order, lambda rows, pair_cells, upper, store: _scan_ip(
        cells, x64, x_norm, base, base_err, gamma, rows, pair_cells, upper, store)


def _scan_ip(cells: Cells, x64, x_norm, base, base_err, gamma, rows, pair_cells, upper: torch.Tensor,
             store: CandidateStore) -> None:
    """Scan (query, cell) pairs for ip: f = fl(-<x, c - m>) over the fp32 residuals lies
    within ``width`` of the true value (the GEMM of rounded operands, with a 2x margin; the
    float64 -<x, m> and the float64 effects of _plan_ip within ``base_err``), so ``base + f +- width``
    bound -<x, c>."""
    residuals, _ = cells.residuals()
    order, groups = cells.groups(pair_cells)
    rows = rows[order]
    for cell, lo, hi in groups:
        start, stop = cells.offsets_list[cell], cells.offsets_list[cell + 1]
        queries = rows[lo:hi]  # distinct: a (query, cell) pair is scanned once
        radius = float(cells.radius[cell])
        pair_base = base[queries, cell]
        width = 2.0 * gamma * x_norm[queries] * radius + base_err[queries, cell] + 2.0 ** -40 * pair_base.abs()
        scores = torch.mm(x64.index_select(0, queries).float(), residuals[start:stop].t()).neg_()
        _keep(queries, scores, pair_base, width, start, upper, store)


def _scan_l2(cells: Cells, x, gamma, rows, pair_cells, upper: torch.Tensor, store: CandidateStore,
             abs_slack: float = 0.0) -> None:
    """Scan the (query, cell) pairs grouped by cell; tighten upper bounds, record candidates.

    In residual form, relative to the cell's centroid m: x' = x - m in float64 (then fp32),
    c' = c - m (the fp32 residuals of ``Cells.residuals``). The filter value
    f = fl(||c'||^2 - 2 <x', c'>) lies within ``width`` of the true ``||c - m||^2 - 2 <x - m, c - m>``
    (the fp32 GEMM of rounded residuals, the rounded ||c'||^2 and the final additions, with a
    2x margin), so ``f + width + ||x - m||^2`` bounds ||x - c||^2 from above and
    ``f - width + ||x - m||^2`` from below. The width scales with the residual norms -- the
    cell's radius, not the codewords' distance from the origin -- so tight cells far from the
    origin keep few candidates.
    """
    residuals, res_sq = cells.residuals()
    centroids64 = cells.centroids.double()
    order, groups = cells.groups(pair_cells)
    rows = rows[order]
    for cell, lo, hi in groups:
        start, stop = cells.offsets_list[cell], cells.offsets_list[cell + 1]
        queries = rows[lo:hi]  # distinct: a (query, cell) pair is scanned once
        xr64 = x.index_select(0, queries).double() - centroids64[cell]
        pair_x_sq = xr64.pow(2).sum(dim=1)  # ||x - m||^2
        radius = float(cells.radius[cell])
        cross = pair_x_sq.sqrt() * (1 + GROW64) * radius
        width = 2.0 * gamma * cross + 2.0 ** -21 * (radius * radius + 2.0 * cross + pair_x_sq) + abs_slack
        scores = torch.addmm(res_sq[start:stop], xr64.float(), residuals[start:stop].t(), alpha=-2.0)
        # (width's 2^-21 ||x - m||^2 term also covers the fp64 rounding of moving between filter
        # and pair space, unlike the flat path's, which needs _certified.fp64_slack)
        _keep(queries, scores, pair_x_sq, width, start, upper, store)


def _keep(queries: torch.Tensor, scores: torch.Tensor, offset: torch.Tensor, width: torch.Tensor, start: int,
          upper: torch.Tensor, store: CandidateStore) -> None:
    """One cell's scan of ``queries``: the objective of each (query, codeword) lies within ``width``
    of ``scores + offset`` (fp32 filter values, float64 per-query shift). Tighten the queries'
    upper bounds and record every codeword whose lower bound reaches them (sorted position:
    ``start`` + column)."""
    row_min = scores.min(dim=1).values.double()
    cell_upper = torch.minimum(upper[queries], row_min + width + offset)
    upper[queries] = cell_upper
    threshold = cell_upper - offset + width  # a score above this: the objective above upper
    threshold_f32 = (threshold + threshold.abs() * 2.0 ** -20).float()
    hit_row, hit_col = (scores <= threshold_f32.unsqueeze(1)).nonzero(as_tuple=True)
    lower = scores[hit_row, hit_col].double() - width[hit_row] + offset[hit_row]
    keep = store.admit(queries[hit_row])
    store.add(queries[hit_row][keep], (hit_col + start)[keep], lower[keep])
