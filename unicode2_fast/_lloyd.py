"""The one Lloyd (k-means) loop of the package (private core): ``u2.build_codebook``'s coarse
stage and fine cells, ``HierarchicalIndex.build``'s cells and ``VectorQuantizer``'s k-means init
all run :func:`lloyd`.

Each iteration assigns every row with a pluggable ``assign(x, centroids) -> (ids, dists)``
(default: the exact ``u2.nearest``), takes the means of the clusters summed in float64
(``index_add_`` over row chunks) and hands them to a pluggable empty-cluster policy, which returns
the next fp32 centroids:

- :func:`refill` (the default; the codebook build's): a centroid that ends an update empty, NaN /
  Inf after the fp32 cast (or, after the last update, duplicated) is dropped and refilled by
  splitting the currently largest cluster at its member farthest from the centroid and from the
  points already split off it (deterministic). Needs k distinct rows.
- :func:`split_halves` (the hierarchical index's): an empty cluster takes half of the currently
  largest one, the two moved apart along a fixed +-pattern. Never fails, so a codebook with fewer
  distinct codewords than cells still builds (some cells stay empty).
- :func:`keep_previous` (the quantizer's): an empty cluster keeps its previous centroid, so a
  batch with fewer vectors than codes still initialises a codebook; no host synchronisation.

``spherical=True`` projects the means back onto the unit sphere (k-means for the cosine metric);
a zero mean then counts as empty.

Built on the loop, for the codebook build: :func:`kmeans` (seeded initialisation with k distinct
rows, :func:`fast_assign`, :func:`refill`, a clear ValueError when the rows hold fewer than k
distinct points) and :func:`faiss_kmeans` (``faiss.Kmeans``, then the same compaction).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import torch

from . import _cells, _native, _scan_bf16
from ._faiss import faiss_threads
from .nearest import nearest

#: On the CPU, Lloyd assignments against fewer centroids than this use u2.nearest's FAISS backend.
#: Measured on this project's 2-core AVX-512 VNNI CI machine, d = 1152, SigLIP-like data, one
#: assignment against a new centroid tensor (k-means never reuses one): FAISS IndexFlatL2 took
#: 0.62 s vs 9.7 s for backend "auto" at K = 224, N = 57,344; 0.83 s vs 3.2 s at K = 2,000; 1.0 s vs
#: 2.6 s at K = 5,000; but 2.0 s vs 1.5 s at K = 20,000. At small K the certified int8 filter keeps
#: many candidates among near-equal clustered centroids and pays its per-codebook set-up every
#: iteration; a k-means assignment does not need certified exactness (a near-tie either way moves
#: the objective by nothing), only determinism, which FAISS has for a fixed thread count. The
#: fine cells of the paper's build (~500 centroids each) and its 1,000 coarse centroids are all
#: far below the crossover. On CUDA, "auto" (the fused Triton kernel) is used at every K.
FAISS_ASSIGN_MAX_K = 16384
#: Below this many multiply-adds (N K d) a CPU assignment runs FAISS on one thread. FAISS and torch
#: each bring their own OpenMP runtime whose idle threads spin after a parallel region; alternating
#: the two every Lloyd iteration made a k = 200, M = 4,000, d = 32 build take 0.5-2.7 s on the
#: 2-core CI machine instead of 0.1 s with one FAISS thread, while the threads save < 1 ms here.
SMALL_ASSIGN_MACS = 1 << 26
#: rows whose mean centers ScanAssign's packed rows (a strided sample: any center is exact)
CENTER_SAMPLE = 4096
#: rows of x read at a time by the chunked passes over the training rows
_UPDATE_CHUNK_ROWS = 2048

#: ``assign(x: (n, d), centroids: (k, d)) -> (ids (n,) int64, dists (n,) float32)``: the nearest
#: centroid of every row and its distance (squared l2 for k-means)
AssignFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare
class Update:
    """One centroid update of :func:`lloyd`, as an empty-cluster policy sees it."""

    x: torch.Tensor  # (n, d) training rows
    ids: torch.Tensor  # (n,) int64: the assignment this update follows
    previous: torch.Tensor  # (k, d) fp32: the centroids of that assignment
    means: torch.Tensor  # (k, d) fp64 cluster means, 0 for an empty cluster (unit rows when spherical)
    counts: torch.Tensor  # (k,) int64 members per cluster
    empty: torch.Tensor  # (k,) bool: no members (or, when spherical, a zero mean)
    assign: AssignFn  # the loop's assignment step
    final: bool  # the last update of the run: its centroids are the result


#: ``repair(update) -> (k, d) fp32 centroids`` for the next assignment (the result after the last)
RepairPolicy = Callable[[Update], torch.Tensor]


class LloydResult(NamedTuple):
    """What :func:`lloyd` returns."""

    centroids: torch.Tensor  # (k, d) fp32
    objective: float  # mean ``dists`` of the last assignment (the MSE for l2); NaN when niter = 0
    counts: torch.Tensor  # (k,) int64 members per cluster in the last assignment; zeros when niter = 0


# ----------------------------------------------------------------------------------------------
# assignment and update


def fast_assign(x: torch.Tensor, centroids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The codebook build's assignment: ``u2.nearest``, with its FAISS backend on the CPU below
    FAISS_ASSIGN_MAX_K centroids (one FAISS thread below SMALL_ASSIGN_MACS multiply-adds), except
    where u2.nearest's bf16 scan runs (fp32 rows on a CPU with AVX-512 BF16, at least
    SMALL_ASSIGN_MACS): exact, and 1.6-3x FAISS's flat scan.

    Returns:
        ids (n,) int64 and squared distances (n,) float32 of the nearest centroid of every row.
    """
    # x: (n, d) fp32, centroids: (k, d) fp32 on the same device
    if x.device.type != "cpu" or centroids.shape[0] >= FAISS_ASSIGN_MAX_K:
        return nearest(x, centroids)
    if x.shape[0] * centroids.shape[0] * x.shape[1] >= SMALL_ASSIGN_MACS:
        if x.dtype == torch.float32 and centroids.dtype == torch.float32 and _scan_bf16.available():
            return nearest(x, centroids)
        return nearest(x, centroids, backend="faiss")
    with faiss_threads(1):
        return nearest(x, centroids, backend="faiss")


#: bf16 GEMM at least this much faster than fp32 (measured once) for the bf16 assignment
MIN_BF16_SPEEDUP = 2.0
#: a bf16 assignment whose share of uncertified rows passed this goes back to FAISS for the run
BF16_MAX_AMBIGUOUS = 0.4
BF16_RETRY_EVERY = 4
#: rows per bf16 distance block ((rows, k) fp32 values at a time)
BF16_ROWS = 8192
#: |<x^, c^> - <x, c>| <= BF16_DOT_ERROR ||x|| ||c|| for bf16-rounded rows, an fp32-accumulated
#: GEMM of d <= BF16_MAX_DIM terms and a bf16-rounded result: bf16's unit roundoff 2^-8 for each
#: input and for the output, 2^-12 for the sums: (1 + 2^-8)^3 (1 + 2^-12) - 1 = 0.01201 <= 0.01314
BF16_DOT_ERROR = 2.0 ** -6.25
BF16_MAX_DIM = 4096
_bf16_speedup: Optional[float] = None


def bf16_speedup() -> float:
    """How much faster torch's bf16 matmul runs than its fp32 one here (measured once, a
    (2048 x 1152) x (1152 x 256) product; AVX-512 BF16 / AMX CPUs: 3-5x, others < 1)."""
    global _bf16_speedup
    if _bf16_speedup is None:
        import time

        a, b = torch.randn(2048, 1152), torch.randn(1152, 256)
        times = []
        for x, y in ((a, b), (a.bfloat16(), b.bfloat16())):
            torch.mm(x, y)
            start = time.perf_counter()
            for _ in range(3):
                torch.mm(x, y)
            times.append(time.perf_counter() - start)
        _bf16_speedup = times[0] / max(times[1], 1e-9)
    return _bf16_speedup


class Bf16Assign:
    """A certified assignment for Lloyd's loop over one training set on the CPU: bf16 GEMM
    distances, exact where they decide, FAISS's fp32 scan for the rest.

    The rows are centred on their mean (distances do not change) and rounded to bf16 once. Per
    call, every row's distance to each centroid is known within e = 2 BF16_DOT_ERROR ||x|| max||c||
    (+ the fp32 rounding of ||c||^2 - 2<x, c>); a row whose second-nearest centroid is more than
    2e farther than its nearest has that nearest as its exact one. The others (near ties, tight
    clusters) go to :func:`fast_assign`. After two calls in a row in which more than
    BF16_MAX_AMBIGUOUS of the rows needed that (the first iterations, whose centroids are sampled
    rows; tight clusters), only every BF16_RETRY_EVERY-th call tries the bf16 scan again. Returned
    distances of the certified rows are the bf16 ones (within e; Lloyd's loop reads only the ids
    and their mean).
    """

    def __init__(self, x: torch.Tensor):
        if x.dim() != 2 or x.shape[1] > BF16_MAX_DIM or x.dtype != torch.float32:
            raise ValueError(f"Bf16Assign takes fp32 rows of d <= {BF16_MAX_DIM}, got {x.dtype} {tuple(x.shape)}")
        self.x = x
        # any shift leaves the distances as they are; the fp32 mean makes the rows small
        self.center = x.mean(dim=0)
        n, d = x.shape
        self.rows = torch.empty((n, d), dtype=torch.bfloat16)
        self.row_norm = torch.empty(n, dtype=torch.float64)
        block = torch.empty((min(n, BF16_ROWS), d), dtype=torch.float32)  # one fp32 block, reused
        for start in range(0, n, BF16_ROWS):
            stop = min(n, start + BF16_ROWS)
            shifted = torch.sub(x[start:stop], self.center, out=block[:stop - start])
            self.rows[start:stop] = shifted
            self.row_norm[start:stop] = _native.norms64(shifted)
        self.sq = self.row_norm.pow(2).float()
        self.misses = 0  # calls in a row that sent more than BF16_MAX_AMBIGUOUS of the rows on
        self.calls = 0
        self.ambiguous = 0  # rows sent to fast_assign by the last call

    def __call__(self, x: torch.Tensor, centroids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if x is not self.x or (self.misses >= 2 and self.calls % BF16_RETRY_EVERY):
            return fast_assign(x, centroids)
        shifted = centroids.float() - self.center
        c_bf16 = shifted.bfloat16()
        # fp64 squares rounded once to fp32 (k x d: free): their error is one fp32 rounding
        c_sq = torch.linalg.vecdot(shifted.double(), shifted.double()).float()
        c_max = float(torch.linalg.vector_norm(shifted, dim=1, dtype=torch.float64).max())
        n = x.shape[0]
        ids = torch.empty(n, dtype=torch.int64)
        dists = torch.empty(n, dtype=torch.float32)
        uncertain = []
        for start in range(0, n, BF16_ROWS):
            stop = min(n, start + BF16_ROWS)
            values = torch.mm(self.rows[start:stop], c_bf16.t()).float().mul_(-2.0).add_(c_sq)  # (rows, k)
            best, arg = values.min(dim=1)
            values.scatter_(1, arg.unsqueeze(1), float("inf"))
            second = values.amin(dim=1)
            norm = self.row_norm[start:stop]
            # each value within err of ||x - c||^2 - ||x||^2 (fp64 bound, fp32 rounding folded in)
            # (+ an absolute term: bf16 GEMMs may flush subnormal inputs and products to zero, each
            # flushed element below 2^-126 dropping at most 2^-126 times the other side's largest)
            flush = 4.0 * self.x.shape[1] * 2.0 ** -126 * (norm + c_max + 1.0)
            err = (2.0 * BF16_DOT_ERROR * norm * c_max + 2.0 ** -20 * (c_max ** 2 + 2.0 * norm * c_max)
                   + flush) * 1.01
            ok = (second.double() - best.double()) > 2.0 * err
            ids[start:stop] = arg
            dists[start:stop] = best + self.sq[start:stop]
            uncertain.append((~ok).nonzero().squeeze(1) + start)
        redo = torch.cat(uncertain)
        self.redo = redo  # the rows of the last call that went to fast_assign (tests read them)
        self.ambiguous = redo.numel()
        if redo.numel():
            ids[redo], dists[redo] = fast_assign(x.index_select(0, redo), centroids)
        self.misses = self.misses + 1 if redo.numel() > BF16_MAX_AMBIGUOUS * n else 0
        return ids, dists.clamp_min_(0.0)


class ScanAssign:
    """The exact assignment for Lloyd's loop over one training set on a CPU with AVX-512 BF16:
    u2.nearest's bf16 scan (``_scan_bf16``) with the rows packed once, against the centroids of
    each call (packed against the same center, the rows' fp32 mean). The exact nearest centroid
    of every row, its float64 squared distance; rows with too many candidates (near-equal
    centroids) by :func:`fast_assign`."""

    def __init__(self, x: torch.Tensor):
        if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"ScanAssign takes fp32 CPU rows, got {x.dtype} {tuple(x.shape)} on {x.device}")
        self.source = x
        self.version = x._version  # the packed rows describe these values: repacked if x changes in place
        self.x = x.contiguous()
        # any center is exact; one near the rows' mean keeps the bound small (a strided sample's mean)
        sample = self.x[::max(1, self.x.shape[0] // CENTER_SAMPLE)]
        self.rows = _scan_bf16.PackedRows(self.x, sample.mean(dim=0, dtype=torch.float64).float().contiguous())
        self.rest = 0  # rows the last call sent to fast_assign (tests read it)

    def __call__(self, x: torch.Tensor, centroids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x is not self.source or centroids.dtype != torch.float32:
            return fast_assign(x, centroids)
        if x._version != self.version:  # changed in place since it was packed
            self.__init__(x)
        c = centroids.contiguous()
        book = _scan_bf16.ScanCodebook(c, None, center=self.rows.center)
        if not (book.usable and self.rows.usable):
            return fast_assign(x, centroids)
        ids, dists, rest = _scan_bf16.search_packed(self.rows, c, book)
        self.rest = rest.numel()
        if rest.numel():
            ids[rest], rest_dists = fast_assign(self.x.index_select(0, rest), c)
            dists[rest] = rest_dists.double()
        return ids, dists.float()


def training_assign(x: torch.Tensor, k: int) -> Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """The assignment for Lloyd's loop over ``x: (n, d)`` with ``k`` centroids, for fp32 CPU rows
    and k below FAISS_ASSIGN_MAX_K with at least SMALL_ASSIGN_MACS multiply-adds: :class:`ScanAssign`
    (exact) on a CPU with AVX-512 BF16, else :class:`Bf16Assign` where bf16 GEMM is at least
    MIN_BF16_SPEEDUP x fp32 (d <= 4096), else :func:`fast_assign`."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and k < FAISS_ASSIGN_MAX_K
            and x.shape[0] * k * x.shape[1] >= SMALL_ASSIGN_MACS):
        if _scan_bf16.available():
            return ScanAssign(x)
        if x.shape[1] <= BF16_MAX_DIM and bf16_speedup() >= MIN_BF16_SPEEDUP:
            return Bf16Assign(x)
    return fast_assign


#: the means of the clusters (float64 sums; tests patch this name)
_update_centroids = _cells.cluster_means


# ----------------------------------------------------------------------------------------------
# distinct rows and the refill of dropped centroids


def _distinct_rows(rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Groups of equal rows of ``rows: (n, d)``: the group of each row (n,) and the position of
    each group's first row (G,), both int64."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    positions = torch.arange(rows.shape[0], device=rows.device)
    first = torch.full((int(inverse.max()) + 1,), rows.shape[0], device=rows.device)
    return inverse, first.scatter_reduce_(0, inverse, positions, reduce="amin")


def _distinct_row_count(x: torch.Tensor, enough: int) -> int:
    """The number of distinct rows of ``x: (n, d)`` fp32, or any count >= ``enough`` once that
    many are certain.

    Fast path: an exact integer hash of each row's bits (wrapping int64 arithmetic, so equal rows
    always hash equal); distinct hashes prove distinct rows. Only when fewer than ``enough``
    hashes differ (few distinct rows, or a collision) are the rows compared exactly.
    """
    weights = torch.randint(-(2 ** 62), 2 ** 62, (x.shape[1],), generator=torch.Generator().manual_seed(0))
    weights = weights.to(x.device)
    hashes = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], _UPDATE_CHUNK_ROWS):
        rows = x[start:start + _UPDATE_CHUNK_ROWS] + 0.0  # -0.0 -> +0.0: the same point
        hashes[start:start + rows.shape[0]] = (rows.view(torch.int32).long() * weights).sum(dim=1)
    count = torch.unique(hashes).numel()
    return count if count >= enough else _distinct_rows(x)[1].numel()


def _duplicate_rows(rows: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the rows of ``rows: (n, d)`` equal to an earlier row."""
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=rows.device)
    inverse, first = _distinct_rows(rows)
    return first[inverse] != torch.arange(rows.shape[0], device=rows.device)


class _TooFewDistinct(ValueError):
    """Fewer distinct training points than centroids (``n_distinct`` when it is known)."""

    def __init__(self, n_distinct: Optional[int] = None):
        super().__init__(n_distinct)
        self.n_distinct = n_distinct


@contextlib.contextmanager
def _too_few_distinct_is_value_error(label: str, n_rows: int, k: int) -> Iterator[None]:
    try:
        yield
    except _TooFewDistinct as exc:
        found = "fewer" if exc.n_distinct is None else f"only {exc.n_distinct}"
        raise ValueError(
            f"{label}: {found} distinct points among its {n_rows} training rows for {k} centroids; "
            "the features hold too few distinct points (deduplicate them or lower k)"
        ) from None


def _refill(centroids: torch.Tensor, bad: torch.Tensor, counts: torch.Tensor, x: torch.Tensor,
            ids: torch.Tensor, used: torch.Tensor, assign: AssignFn) -> torch.Tensor:
    """Replace the ``bad`` rows of ``centroids`` by splitting the largest clusters.

    Each bad centroid, in index order, becomes a member of the currently largest good cluster
    (ties to the lowest index): the member farthest from that cluster's centroid and from the
    members already taken from it in this call (farthest-first, ties to the lowest row), so
    repeated splits of one cluster spread over it instead of piling into its far end. A split
    halves the cluster's size for the choice of the next donor, so splits also spread over the
    large clusters. A cluster whose unused members all sit on its centroid cannot donate. When no
    cluster can, the unused members of the dropped clusters are the candidates instead, farthest
    from the good centroids first.

    centroids: (k, d) fp32; bad: (k,) bool; counts: (k,) int64 members of the last assignment
    ``ids: (n,)`` of ``x: (n, d)``; used: (n,) bool rows already taken (updated in place);
    assign: measures the distances to the good centroids in that last case.

    Raises:
        _TooFewDistinct: nothing left to split (fewer distinct points than centroids).
    """
    centroids = centroids.clone()
    weight = counts.clone()
    good = ~bad
    exhausted = bad | (counts == 0)
    # donor -> (its unused members, squared distance of each to the nearest of the donor's
    # centroid and the points taken from it so far)
    reach: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    for cluster in bad.nonzero().squeeze(1).tolist():
        point = None
        while not bool(exhausted.all()):
            donor = int(torch.where(exhausted, -1, weight).argmax())
            if donor not in reach:
                members = ((ids == donor) & ~used).nonzero().squeeze(1)
                reach[donor] = (members, (x[members].double() - centroids[donor].double()).pow(2).sum(dim=1))
            members, gap = reach[donor]
            if gap.numel() and float(gap.max()) > 0:
                point = int(members[int(gap.argmax())])
                to_point = (x[members].double() - x[point].double()).pow(2).sum(dim=1)
                reach[donor] = (members, torch.minimum(gap, to_point))
                weight[donor] -= weight[donor] // 2
                break
            exhausted[donor] = True
        if point is None:
            point = _farthest_orphan(centroids, good, bad, x, ids, used, assign)
        centroids[cluster] = x[point]
        used[point] = True
        good[cluster] = True
    return centroids


def _farthest_orphan(centroids: torch.Tensor, good: torch.Tensor, bad: torch.Tensor, x: torch.Tensor,
                     ids: torch.Tensor, used: torch.Tensor, assign: AssignFn) -> int:
    """The unused member of a dropped cluster farthest from every good centroid (must be > 0);
    the first one when no centroid is good."""
    orphans = (bad[ids] & ~used).nonzero().squeeze(1)
    if orphans.numel() and not bool(good.any()):
        return int(orphans[0])
    if orphans.numel():
        _, dists = assign(x[orphans], centroids[good].contiguous())
        best = int(dists.argmax())
        if float(dists[best]) > 0:
            return int(orphans[best])
    raise _TooFewDistinct()


def _repair(centroids: torch.Tensor, bad: torch.Tensor, counts: torch.Tensor, x: torch.Tensor,
            ids: torch.Tensor, final: bool, assign: AssignFn) -> torch.Tensor:
    """Refill the ``bad`` centroids (:func:`_refill`); when ``final``, duplicated centroids too,
    until all k are distinct. Arguments as for :func:`_refill`."""
    bad = bad.clone()
    used = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if final:
        good = (~bad).nonzero().squeeze(1)
        bad[good[_duplicate_rows(centroids[good])]] = True
    while bool(bad.any()):
        centroids = _refill(centroids, bad, counts, x, ids, used, assign)
        # a refilled centroid is a data point that could equal another centroid
        bad = _duplicate_rows(centroids) if final else torch.zeros_like(bad)
    return centroids


# ----------------------------------------------------------------------------------------------
# empty-cluster policies


def refill(update: Update) -> torch.Tensor:
    """The default policy (the codebook build's): drop every centroid that is empty or not finite
    in fp32 (after the final update, every duplicate too) and refill it by splitting the largest
    clusters at their farthest members (:func:`_refill`).

    Raises:
        _TooFewDistinct (a ValueError): nothing left to split, fewer distinct rows than centroids.
    """
    centroids = update.means.float()  # the fp32 cast can overflow: check finiteness after it
    bad = update.empty | ~torch.isfinite(centroids).all(dim=1)
    return _repair(centroids, bad, update.counts, update.x, update.ids, update.final, update.assign)


def split_halves(update: Update) -> torch.Tensor:
    """The hierarchical index's policy: each empty cluster takes half of the currently largest one.

    The two halves are the old mean moved by +delta and -delta along an alternating +-pattern
    (computed in float64), so the next assignment splits that cluster between them. Deterministic
    and never fails: with fewer distinct rows than centroids, clusters stay empty.
    """
    centroids = update.means.clone()
    counts = update.counts.clone()
    pattern = torch.ones(centroids.shape[1], dtype=torch.float64, device=centroids.device)
    pattern[1::2] = -1.0
    for j in update.empty.nonzero().squeeze(1).tolist():
        big = int(counts.argmax())
        delta = 2.0 ** -10 * pattern * (centroids[big].abs() + 2.0 ** -10)
        centroids[j] = centroids[big] + delta
        centroids[big] -= delta
        counts[j] = counts[big] // 2
        counts[big] -= counts[j]
    return centroids.float()


def keep_previous(update: Update) -> torch.Tensor:
    """The quantizer's policy: an empty cluster keeps its previous centroid (no host sync)."""
    return torch.where(update.empty.unsqueeze(1), update.previous, update.means.float())


# ----------------------------------------------------------------------------------------------
# the loop


def lloyd(x: torch.Tensor, centroids: torch.Tensor, niter: int, *, assign: AssignFn = nearest,
          repair: RepairPolicy = refill, spherical: bool = False,
          report: Optional[Callable[[int, float], None]] = None) -> LloydResult:
    """``niter`` Lloyd iterations over ``x`` from ``centroids``.

    Each iteration: ``assign``, the float64 means of the clusters (unit-normalised when
    ``spherical``), then ``repair`` turns them into the next fp32 centroids.

    Args:
        x: (n, d) float training rows, n >= 1.
        centroids: (k, d) fp32 initial centroids on x's device.
        niter: iterations (0: the initial centroids are the result).
        assign: the assignment step (default: the exact ``u2.nearest``, squared l2).
        repair: the empty-cluster policy (default :func:`refill`).
        spherical: project the means onto the unit sphere (cosine k-means); a zero mean is empty.
        report: called as ``report(iteration, objective)`` after every assignment.

    Returns:
        :class:`LloydResult`: the centroids, the mean distance of the last assignment and its
        member counts.

    Raises:
        whatever ``repair`` raises (:func:`refill`: a ValueError when x has fewer than k distinct rows).
    """
    # x: (n, d) float, centroids: (k, d) fp32
    k = centroids.shape[0]
    counts = torch.zeros(k, dtype=torch.int64, device=x.device)
    objective = torch.tensor(float("nan"), dtype=torch.float64)
    previous: Optional[torch.Tensor] = None  # the last assignment, where its repair changed nothing
    for iteration in range(niter):
        ids, dists = assign(x, centroids)
        # kept as a tensor: converting it every iteration would wait for the GPU
        objective = dists.double().mean()
        if report is not None:
            report(iteration, float(objective))
        # converged (a fixed point): the same assignment as the last one, whose means were taken
        # unchanged as the centroids, gives the same means again, so every remaining iteration
        # would repeat it; only the final repair is left (FAISS stops there too)
        converged = previous is not None and torch.equal(ids, previous)
        means, counts = _update_centroids(x, ids, k)
        empty = counts == 0
        if spherical:
            norms = torch.linalg.vector_norm(means, dim=1, keepdim=True)
            empty |= norms.squeeze(1) == 0
            means = means / norms.clamp_min(torch.finfo(means.dtype).tiny)
        final = converged or iteration == niter - 1
        centroids = repair(Update(x, ids, centroids, means, counts, empty, assign, final=final))
        if final:
            break
        previous = ids if torch.equal(centroids, means.to(centroids.dtype)) else None
    return LloydResult(centroids, float(objective), counts)


# ----------------------------------------------------------------------------------------------
# the codebook build's k-means


def _init_centroids(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(k, d): the first k distinct rows of a seeded random permutation of ``x: (n, d)``.

    Raises:
        ValueError: ``x`` holds fewer than k distinct rows (message completed by the caller).
    """
    n = x.shape[0]
    order = torch.randperm(n, generator=generator)
    take = min(n, k)
    while True:
        candidates = x[order[:take].to(x.device)]
        _, first = _distinct_rows(candidates)
        if first.numel() >= k or take == n:
            break
        take = min(n, 2 * take)
    if first.numel() < k:
        raise _TooFewDistinct(first.numel())
    return candidates[first.sort().values[:k]].contiguous()


def kmeans(x: torch.Tensor, k: int, niter: int, seed: int, label: str,
           report: Optional[Callable[[int, float], None]] = None) -> Tuple[torch.Tensor, float]:
    """Seeded k-means of ``x`` with k centroids: the first k distinct rows of a seeded permutation,
    then :func:`lloyd` with :func:`fast_assign` and the :func:`refill` policy.

    Args:
        x: (n, d) fp32 training rows.
        k: number of centroids.
        niter: Lloyd iterations, >= 1.
        seed: seed of the initialisation.
        label: which stage / cell this is, for the error message.
        report: called as ``report(iteration, mse)`` after every assignment.

    Returns:
        (k, d) fp32 distinct, finite centroids and the mean squared error of the last assignment.

    Raises:
        ValueError: fewer than k distinct rows in ``x`` (``label`` says which stage / cell).
    """
    # x: (n, d) fp32
    with _too_few_distinct_is_value_error(label, x.shape[0], k):
        centroids = _init_centroids(x, k, torch.Generator().manual_seed(seed))
        result = lloyd(x, centroids, niter, assign=fast_assign, report=report)
    return result.centroids, result.objective


def faiss_kmeans(x: torch.Tensor, k: int, niter: int, seed: int, label: str,
                 report: Optional[Callable[[int, float], None]] = None) -> Tuple[torch.Tensor, float]:
    """``faiss.Kmeans`` on ``x: (n, d)`` fp32 CPU rows, then compacted like :func:`kmeans`'s result.

    FAISS initialises from k random rows, splits empty clusters itself and makes no NaN from
    finite data, but can return equal centroids when rows repeat: those are refilled
    (:func:`_repair`). Arguments, result and errors as for :func:`kmeans`, except that ``report``
    gets the objective of every iteration once training is done.
    """
    import faiss

    n, d = x.shape
    # FAISS would split clusters of repeated rows into perturbed copies instead of failing
    n_distinct = _distinct_row_count(x, k)
    if n_distinct < k:
        with _too_few_distinct_is_value_error(label, n, k):
            raise _TooFewDistinct(n_distinct)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed % (2 ** 31 - 1), max_points_per_centroid=n,
                      min_points_per_centroid=1, verbose=False)
    with faiss_threads(1) if n * k * d < SMALL_ASSIGN_MACS else contextlib.nullcontext():
        km.train(x.contiguous().numpy())
    centroids = torch.from_numpy(km.centroids).clone()
    for iteration, objective in enumerate(km.obj):
        if report is not None:
            report(iteration, float(objective) / n)
    bad = ~torch.isfinite(centroids).all(dim=1)
    if bool(bad.any()) or bool(_duplicate_rows(centroids).any()):
        with _too_few_distinct_is_value_error(label, n, k):
            ids, _ = fast_assign(x, torch.where(bad.unsqueeze(1), 0.0, centroids))
            centroids = _repair(centroids, bad, torch.bincount(ids, minlength=k), x, ids, True, fast_assign)
    return centroids, float(km.obj[-1]) / n
