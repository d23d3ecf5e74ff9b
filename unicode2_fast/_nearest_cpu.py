"""Exact nearest-codeword search on the CPU: a certified low-precision filter + float64 re-ranking.

Why not a plain fp32 GEMM + argmin: on CPUs with AVX-512 VNNI, int8 GEMM runs ~3.5x the fp32 FLOP
rate. We quantise queries and codewords to int8 (one scale per row), compute exact int32 dot
products of the quantised vectors block by block, and bound the error of every approximate
distance rigorously. With the residuals ``r = v - s*q`` and Cauchy-Schwarz,

    |<x, c> - s_x s_c <q_x, q_c>| <= ||s_x q_x|| ||r_c|| + ||r_x|| ||c||

so the approximate distance of each codeword lies within ``W`` of the true one. Any codeword whose
approximate distance is more than ``2W`` above the best approximate distance cannot be the nearest
one; the few that survive (the candidates) are re-ranked with float64 distances computed directly
from the original vectors. The result is the exact nearest codeword -- not an approximation --
with ties to the lowest index, and distances accurate to float64 before the final fp32 cast.

Where the int8 bound (~2^-6 of ||x|| ||c||) keeps too many codewords (photographs: flat image
regions), the two-level filter "int8x2" writes each row as s (q1 + q2 / 128), q1 in [-127, 127]
and q2 in [-64, 64], and computes 128 <q1x, q1c> + <q1x, q2c> + <q2x, q1c> exactly in int32
(two int8 GEMMs, three GEMMs' work; d <= MAX_INT8X2_DIM) with a ~2^-13 bound, the left-out
<q2x, q2c> term included in it. Exact duplicate codewords are scanned once, and each block's
candidates are read back only from the groups of GROUP_WIDTH codewords whose minimum passes.

Small codebooks (up to 4,096 fp32 / fp16 / bf16 rows) go first to the direct scan of ``_direct`` (l2:
fp32 differences, an error bound relative to the distance itself; ip / cos: fp32 dot products with
a norm bound), l2 codebooks of up to SCAN_MAX_K
fp32 rows on AVX-512 BF16 CPUs to the bf16 scan of ``_scan_bf16``; the rest comes here.
The same engine runs with an fp32 or fp64 filter (no quantisation, a GEMM rounding bound instead):
fp32 for tiny codebooks the scans do not take (their rows that overflow the candidate store
go to ``_flat_search`` like the int8 filter's), fp64 on request. It is worth running only where it
prunes and int8 is fast, so ``choose_filter`` measures the int8 GEMM rate once per process
(AVX2-only CPUs run it at ~0.05x fp32) and a chunk whose filter keeps too many candidates (flat image regions,
near-duplicates, tight clusters: codewords within the filter's error bound) stops scanning. Both
go to ``_flat_search``: FAISS's algorithm (fp32 GEMM blocks in torch's BLAS, a running minimum per
query: ``_native.gemm_keep``) whose winner is certified with rigorous fp32 bounds (exact duplicates
scanned once) before the near ties are re-ranked in float64 -- FAISS's speed plus the cost of those
ties. Where most queries of a chunk do not certify (tight clusters: whole cells within the fp32
bound), an l2 or cos codebook (cos: its unit rows) is partitioned once into about sqrt(K) cells
and searched by the exact cell scan of ``_cells`` (residual form, triangle-inequality pruning;
6.2-7.4x FAISS flat on the clustered benchmark case, l2 and cos, a 2-core AVX2 EPYC); a codebook
whose cells scan most of it or hand the queries back (CELLS_MAX_WORK: flat image regions under
cos) stops taking them.
ip / cos codebooks past the direct scan's 4,096 rows whose queries the filter does not prune take
the flat path, whose uncertified queries (flat regions, whose unit rows are all alike, and tight
clusters) then go to the direct scan over codebook blocks (``_direct.search_dot_blocked``:
FAISS's work at the fp32 dot-product rate, a bound that does not widen, float64 re-ranks of the
near ties only), or that scan alone, whichever settled the codebook's chunks faster (_DotPaths).
Never holds N x K: queries are processed in chunks and codewords in blocks, and per-query candidate
lists are capped; a query that exceeds the cap goes to the flat search, and one with masses of
distinct, equidistant codewords to a streaming float64 scan.
"""
from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from . import _cells, _direct, _native, _scan_bf16
from ._cache import cached, per_tensor
from ._certified import GROW64, U32, U64, CandidateStore, fp64_slack, lowest_of_min, pair_objective, sum_rounding
from ._faiss import faiss_threads
from .profiling import stage

#: codewords per block: the int32 + fp32 block matrices of a query chunk stay in L2/L3 cache
CODE_BLOCK = 2048
#: queries per chunk: bounds the block matrices to QUERY_CHUNK x CODE_BLOCK x 12 bytes (96 MB: two int32, one fp32)
QUERY_CHUNK = 4096
#: rows quantised / normed at a time when building codebook statistics (bounds temporaries)
STAT_CHUNK = 16384
#: candidates extracted per (query, block) at once; the rest are re-checked at the end
BLOCK_CANDIDATES = 32
#: codebooks below this many elements (K x d) use the fp32 filter where the bf16 scan does not run
#: (ip, cos, float64 rows, CPUs without AVX-512 BF16): a plain copy, a short GEMM; above, the int8
#: filter or FAISS's fp32 flat scan do less per-query work
SMALL_CODEBOOK_ELEMENTS = 1 << 16
#: codewords in the strided sample that gives each query an initial upper bound
PILOT_SIZE = 2048
#: the int8 filter is used only where int8 GEMM measures at least this many times the fp32 rate
MIN_INT8_SPEEDUP = 2.0
#: a filter scan that keeps more than this many candidates per query and scanned block (flat image
#: regions, near-duplicates, tight clusters) is not pruning: the chunk is finished by the flat path
#: (16: Gaussian d = 1152 queries keep 8-16 in the first block against a small codebook's pilot
#: bound, and run at ~3x FAISS's flat scan when the filter carries on; at 8 they went to it)
PRUNE_LIMIT = 16
#: blocks a chunk scans before it may give up on the filter
PRUNE_CHECK_BLOCKS = 1
#: a codebook whose filter stopped pruning on this many chunks in a row sends its chunks straight
#: to the flat path, trying the filter again on every FILTER_RETRY_EVERY-th one
FILTER_MISSES = 2
FILTER_RETRY_EVERY = 8
#: the flat scan's candidates per query (codewords within twice the widest error bound of its
#: least fp32 objective): past them the query goes to the threshold scan (see _flat_search)
FLAT_CAP = 32
#: the flat scan's fp32 GEMM blocks: queries x codewords (16 MiB, reused)
FLAT_GEMM_ROWS = 4096
FLAT_GEMM_COLS = 1024
#: the threshold scan of the flat path: queries and codewords per fp32 block (32 MB), and the
#: candidates per query past which it hands the query to the streaming float64 scan
THRESHOLD_ROWS = 1024
THRESHOLD_BLOCK = 8192
THRESHOLD_CAP = 2048
#: the band search of the flat path (l2, d <= BAND_MAX_DIM, K >= BAND_MIN_K; see _BandIndex):
#: queries per band, groups of similar radius, codebook rows sampled for its principal direction,
#: and the share of the full scan's work up to which a chunk takes it (measured: bands of 37% of
#: the work ran in 0.74-0.85x the top-k path's time, of 47% in 0.96x)
BAND_ROWS = 256
BAND_RADIUS_GROUPS = 4
BAND_PCA_ROWS = 8192
BAND_MAX_WORK = 0.45
BAND_MAX_DIM = 512
BAND_MIN_K = 8192
#: chunks in a row whose bands were too wide before they are planned only now and then (_Attempts)
BAND_MISSES = 2
#: queries per call of the flat path (the GEMM's speed needs thousands per call)
FLAT_QUERY_CHUNK = 16384
#: share of a chunk's queries that must fail the flat scan for its failures to go to the cell scan
FLAT_FAIL_SHARE = 0.25
#: l2 / cos codebooks of at least this many codewords whose flat scan fails (tight clusters)
#: are searched by the exact cell scan of ``_cells`` over a partition built once per codebook
CELLS_MIN_K = 8192
#: the metrics of the cell scan (cos: l2 on the unit sphere; ip's norm bounds prune little in cells)
CELLS_METRICS = ("l2", "cos")
#: a codebook whose cell scan read more than this share of its (query, codeword) pairs on a
#: chunk stops taking it (its cells do not prune those queries)
CELLS_MAX_WORK = 0.3
#: ... judged on chunks of at least this many queries (a few queries say little); the partition
#: stays cached once it did not pay (not retried)
CELLS_RECORD_ROWS = 256
#: ... when the chunk has at least this many queries per cell, or the partition is already built
CELLS_MIN_QUERIES_PER_CELL = 2
#: the partition: about sqrt(K) cells from a strided sample, CELLS_NITER Lloyd steps over at most
#: CELLS_TRAIN_PER_CELL codewords per cell, then every codeword assigned (FAISS's fp32 flat search;
#: any partition keeps the search exact, a good one prunes more)
CELLS_NITER = 4
CELLS_TRAIN_PER_CELL = 64
#: a query whose unpruned cells still hold more than this share of the codebook goes to the threshold scan
CELLS_FALLBACK_FRACTION = 0.25
#: queries per call of the cell scan (its (queries, cells) float64 tables)
CELLS_QUERY_CHUNK = 4096
#: a cached fp32 copy of at least this many bytes is announced once (a warning names its size)
COPY_WARN_BYTES = 256 << 20
#: near pairs per query above which they are first measured directly in fp32 (see _near_pairs)
DIRECT_REFINE_PAIRS = 4
#: a deferred (query, block) with more candidates than this against the final bound goes to the flat search
DEFERRED_CAP = 128
#: queries whose (kk, d) candidate rows are gathered at a time there
DIRECT_REFINE_ROWS = 32
#: torch's CPU int8 GEMM returns wrong results for d = 1 (seen in torch 2.13); int8 only from here
MIN_INT8_DIM = 16
#: int32 accumulation of 127 * 127 * d products stays exact below this dimension
MAX_INT8_DIM = (2**31 - 1) // (127 * 127)
#: the two-level int8 filter ("int8x2"): each row is s * (q1 + q2 / X2_BASE) with q1 in [-127, 127]
#: and the residual digit q2 in [-X2_DIGIT, X2_DIGIT]; its combined dot product
#: X2_BASE * <q1x, q1c> + <q1x, q2c> + <q2x, q1c> is exact in int32 up to this dimension
X2_BASE = 128
X2_DIGIT = 64
MAX_INT8X2_DIM = (2**31 - 1) // (127 * 127 * X2_BASE + 2 * 127 * X2_DIGIT)
#: the bf16 scan (_scan_bf16, l2): codebooks of at most this many rows take it first (beyond, the
#: int8 filter prunes and the cell scan partitions: less work than scanning every codeword)
SCAN_MAX_K = 16384
#: a chunk whose scan leaves more than this share of its queries (too many candidates) counts as
#: a miss; after SCAN_MISSES in a row the scan is tried again only now and then (_Attempts)
SCAN_MAX_REST = 0.5
SCAN_MISSES = 2
#: candidates are extracted from each block through the minima of groups of this many codewords:
#: one pass over the block, then only the groups below a query's threshold are read again
GROUP_WIDTH = 64



def _int8_gemm_available() -> bool:
    """Whether ``torch._int_mm`` runs here and its int32 dot products are exact, extreme values
    included: the filters' bounds assume exact integer sums. (Without VNNI, oneDNN may build the
    products with ``vpmaddubsw``, whose int16 pair sums saturate: seen with ONEDNN_MAX_CPU_ISA=AVX2,
    where the two-level filter then pruned the true nearest codeword.)"""
    try:
        g = torch.Generator().manual_seed(0)
        for n, b, d in ((17, 48, 64), (5, 40, 1040)):
            qx = torch.randint(-127, 128, (n, d), generator=g, dtype=torch.int8)
            qc = torch.randint(-127, 128, (b, d), generator=g, dtype=torch.int8)
            qx[0], qx[1], qc[0], qc[1] = 127, -127, 127, -127  # the largest sums of either sign
            qx[2, ::2], qx[2, 1::2], qc[2, ::2], qc[2, 1::2] = 127, -127, 127, 127  # pairs that cancel
            if not torch.equal(torch._int_mm(qx, qc.t()).double(), qx.double() @ qc.double().t()):
                return False
        return True
    except (RuntimeError, AttributeError):
        return False


_INT8_OK: Optional[bool] = None


def int8_gemm_available() -> bool:
    """Whether this torch build has a working, exact CPU int8 GEMM (``torch._int_mm``)."""
    global _INT8_OK
    if _INT8_OK is None:
        _INT8_OK = _int8_gemm_available()
    return _INT8_OK


#: the spacing of fp32 values below the normal range (2^-149): their rounding is absolute
FP32_SUBNORMAL_STEP = 2.0 ** -149
#: quantisation levels of each integer filter kind: int8 rows in [-127, 127]; "int7" (the queries
#: of the fbgemm filter) in [-63, 63], so that q + 64 is a 7-bit activation (see _FbgemmBlocks)
_LEVELS = {"int8": 127.0, "int7": 63.0}
#: the fbgemm filter is used from this dimension up (below, its rate barely beats FAISS's fp32 scan)
FBGEMM_MIN_DIM = 512
#: ... where its measured rate is at least this many times torch's fp32 GEMM
MIN_FBGEMM_SPEEDUP = 1.4


class _FbgemmBlocks:
    """The int8 codebook as fbgemm's packed weights, one per CODE_BLOCK, for the AVX2 int8 GEMM.

    torch's ``_int_mm`` runs at ~2 GFLOP/s on AVX2-only CPUs, but fbgemm's dynamic quantized linear
    (the op behind ``torch.ao.nn.quantized.dynamic.Linear``) runs at 160-200 here, 1.5x FAISS's fp32
    scan. It takes fp32 activations and quantizes them itself to 7 bits (``reduce_range``: AVX2's
    u8 x s8 pair sums saturate int16 beyond that). Fed integer values u = q + 64 in [1, 127] with
    one extra row holding 0 and 127, its per-tensor range is exactly [0, 127]: scale 1, zero point
    0, so it quantizes nothing away; the weights are the int8 codewords with scale 1. Its output
    is then the exact int32 sum <u, q_c> converted to fp32, and <q, q_c> = <u, q_c> - 64 sum(q_c).
    The conversion rounds only where |<u, q_c>| >= 2^24; ``dot_error`` bounds that per block.
    ``_fbgemm_exact`` checks the whole identity once per process against exact integer products.
    """

    def __init__(self, filt: torch.Tensor):
        # filt: (K, d) int8 codewords
        self.packed = []
        self.row_sum = torch.empty(filt.shape[0], dtype=torch.float32)
        self.dot_error = []
        for start in range(0, filt.shape[0], CODE_BLOCK):
            block = filt[start:start + CODE_BLOCK]
            self.packed.append(_prepack(block))
            self.row_sum[start:start + CODE_BLOCK] = block.sum(dim=1, dtype=torch.int64).float()  # exact: < 2^24
            largest = 127.0 * float(block.abs().sum(dim=1, dtype=torch.int64).max())  # bound on |<u, q_c>|
            # fp32 conversion (half an ulp) and the subtraction of 64 sum(q_c), in integer units
            self.dot_error.append(0.0 if largest < 2.0 ** 24 else 2.0 ** -23 * largest)

    @staticmethod
    def activations(qx: torch.Tensor) -> torch.Tensor:
        """(n + 1, d) fp32 u = q + 64 of the (n, d) "int7" queries, and the range-fixing row."""
        u = torch.empty((qx.shape[0] + 1, qx.shape[1]), dtype=torch.float32)
        u[:-1] = qx
        u[:-1] += 64.0
        u[-1] = 0.0
        u[-1, 0] = 127.0
        return u

    def dots(self, u: torch.Tensor, block: int, start: int, stop: int) -> torch.Tensor:
        """(n, b) fp32 <q, q_c> of the queries against block ``block`` (rows start:stop)."""
        out = torch.ops.quantized.linear_dynamic(u, self.packed[block], True)[:-1]
        return out.sub_(64.0 * self.row_sum[start:stop])


def _prepack(block: torch.Tensor):
    import warnings as _w
    with _w.catch_warnings():  # quantized tensor creation is deprecated in torch 2.13 (still works)
        _w.simplefilter("ignore")
        weight = torch._make_per_tensor_quantized_tensor(block.contiguous(), 1.0, 0)
        return torch.ops.quantized.linear_prepack(weight, None)


_FBGEMM_RATE: Optional[float] = None


def fbgemm_speedup() -> float:
    """fbgemm's int8 GEMM rate over torch's fp32 GEMM on this machine, measured once per process
    (0 where the op is missing or fails the exactness check of ``_fbgemm_exact``)."""
    global _FBGEMM_RATE
    if _FBGEMM_RATE is None:
        _FBGEMM_RATE = 0.0
        try:
            if _fbgemm_exact():
                g = torch.Generator().manual_seed(1)
                qc = torch.randint(-127, 128, (2048, 512), generator=g, dtype=torch.int8)
                blocks = _FbgemmBlocks(qc)
                u = _FbgemmBlocks.activations(torch.randint(-63, 64, (256, 512), generator=g, dtype=torch.int8))
                a32, b32 = torch.randn(256, 512, generator=g), torch.randn(2048, 512, generator=g)
                _FBGEMM_RATE = _best_time(lambda: a32 @ b32.t()) / _best_time(lambda: blocks.dots(u, 0, 0, 2048))
        except (RuntimeError, AttributeError, NotImplementedError):
            _FBGEMM_RATE = 0.0
    return _FBGEMM_RATE


def _fbgemm_exact() -> bool:
    """Whether _FbgemmBlocks gives exact integer dot products here (extreme values included)."""
    g = torch.Generator().manual_seed(0)
    for n, b, d in ((37, 300, 64), (5, 40, 1040)):
        qx = torch.randint(-63, 64, (n, d), generator=g, dtype=torch.int8)
        qc = torch.randint(-127, 128, (b, d), generator=g, dtype=torch.int8)
        qx[0], qc[0], qc[1] = 63, 127, -127  # the largest sums
        qx[1] = -63
        blocks = _FbgemmBlocks(qc)
        got = blocks.dots(_FbgemmBlocks.activations(qx), 0, 0, b)
        if not torch.equal(got.double(), qx.double() @ qc.double().t()):
            return False
    return True


@dataclass
class _RowStats:
    """Filter representation of a set of rows (queries or codewords), all (R,) unless noted.

    ``filt`` is what the filter GEMM consumes: int8 (R, d) for "int8", the fp32 / fp64 rows
    otherwise. ``scale`` maps filter dot products back to real ones. ``res_norm`` bounds
    ``||v - scale * filt||`` (the quantisation residual), ``filt_norm`` is ``||scale * filt||``
    and ``norm`` is ``||v||`` (all fp64, rounded up by a relative 2^-20 so they stay bounds).
    ``sq`` is ``||v||^2`` in fp32 (l2 only), within a relative ``sq_rel_err`` of the exact value.
    """

    filt: torch.Tensor
    scale: torch.Tensor
    res_norm: torch.Tensor
    filt_norm: torch.Tensor
    norm: torch.Tensor
    sq: Optional[torch.Tensor]
    sq_rel_err: float
    #: "int8x2" only: the second GEMM's operand, [q1 | q2] for queries and [q2 | q1] for codewords
    #: (R, 2d) int8, and lo_norm = ||s * q2 / X2_BASE|| (fp64 bound), whose product over a pair is
    #: the one term of <x^, c^> the filter leaves out
    filt2: Optional[torch.Tensor] = None
    lo_norm: Optional[torch.Tensor] = None


def _row_stats(v: torch.Tensor, kind: str, normalize: bool, center: Optional[torch.Tensor] = None,
               rows: Optional[torch.Tensor] = None, squares: bool = True) -> _RowStats:
    """Quantise / convert rows ``v: (R, d)`` (those of the ids ``rows`` only, when given) for the
    filter and bound the residuals.

    ``normalize`` (cos) scales rows to unit norm; ``center`` (l2) is subtracted first: squared L2
    distances do not change under a shift, and the filter's error bound scales with the row
    norms, so removing the features' shared mean (large for SigLIP) tightens it a lot.
    The statistics describe the exact transformed rows: the rounding of the transform itself is
    folded into the residual bounds. ``squares``: compute the fp32 squared norms ``sq`` (the
    codebook's enter the filter objective; the queries' are not used).
    """
    parts = []
    count = v.shape[0] if rows is None else rows.numel()
    for start in range(0, count, STAT_CHUNK):
        chunk = v[start:start + STAT_CHUNK] if rows is None else v.index_select(0, rows[start:start + STAT_CHUNK])
        parts.append(_row_stats_chunk(chunk, kind, normalize, center, squares))
    if not parts:
        parts.append(_row_stats_chunk(v, kind, normalize, center, squares))
    def joined(f: str) -> Optional[torch.Tensor]:
        return torch.cat([getattr(p, f) for p in parts]) if getattr(parts[0], f) is not None else None

    return _RowStats(*(joined(f) for f in ("filt", "scale", "res_norm", "filt_norm", "norm", "sq")),
                     parts[0].sq_rel_err, filt2=joined("filt2"), lo_norm=joined("lo_norm"))


def _row_stats_chunk(v: torch.Tensor, kind: str, normalize: bool, center: Optional[torch.Tensor],
                     squares: bool = True) -> _RowStats:
    # v: (R, d) any float dtype; center: (d,) or None
    if kind == "fp64" or v.dtype == torch.float64:
        return _row_stats_chunk_fp64(v, kind, normalize, center)
    # fp32 arithmetic (fp16/bf16/fp32 inputs are exact in fp32); every quantity that feeds the
    # error bound is inflated by the rounding of its own fp32 computation so it stays a bound.
    d = v.shape[1]
    gamma = sum_rounding(d, U32)  # relative rounding of a d-term fp32 sum
    grow = 1.0 + 2.0 * gamma
    v32 = v.float()
    if center is not None:
        v32 = v32 - center.float()  # each element within one rounding of the exact difference
    # norms accumulate in float64: fp32 squares of rows below ~1e-19 underflow, and a bound that
    # underflows lets the filter discard the nearest codeword
    norm = _native.norms64(v32)
    # distance of the rows below from the exact transformed rows
    off_unit = 1.01 * U32 * norm if center is not None else torch.zeros_like(norm)
    if normalize:
        v32 = v32 / norm.float().unsqueeze(1)
        norm = _native.norms64(v32)
        off_unit = torch.full_like(norm, 2.0 * gamma)
    # fp32 results below the normal range round by up to half its smallest step, not relatively
    tiny = 2.0 * math.sqrt(d) * FP32_SUBNORMAL_STEP
    def scale_of(levels: float) -> torch.Tensor:
        scale = torch.maximum(v32.amax(dim=1), v32.amin(dim=1).neg_()) / levels
        return torch.where(scale > 0, scale, torch.ones_like(scale))  # (absmax / levels can underflow to 0)

    def residual_bound(residual: torch.Tensor) -> torch.Tensor:
        # each residual element within 2 fp32 roundings of exact (the product with the scale and
        # the difference from v), measured from the digits actually chosen
        return (_native.norms64(residual) * grow
                + 2.0 * U32 * norm * grow + off_unit + tiny)

    filt2 = lo_norm = None
    if kind == "fp32":
        filt = v32
        scale = torch.ones_like(norm)
        res_norm = off_unit + tiny
        digits = filt
    elif kind in ("int8x2", "int8x2c"):
        # v^ = s * (q1 + q2 / X2_BASE): q1 + q2 / X2_BASE is exact in fp32 (14 significant bits);
        # any digits are valid, and in-place passes, since at a few us per query these statistics
        # are a visible share
        scale = scale_of(127.0)
        t = v32 / scale.unsqueeze(1)  # (not a product with 1 / scale: that overflows for subnormal scales)
        q1 = torch.round(t).clamp_(-127.0, 127.0)
        q2 = t.sub_(q1).mul_(X2_BASE).round_().clamp_(-X2_DIGIT, X2_DIGIT)
        digits = torch.add(q1, q2, alpha=1.0 / X2_BASE)
        res_norm = residual_bound(torch.addcmul(v32, digits, scale.unsqueeze(1), value=-1.0))
        filt = q1.to(torch.int8)
        filt2 = torch.empty((v32.shape[0], 2 * d), dtype=torch.int8)
        first, second = (q2, q1) if kind == "int8x2c" else (q1, q2)  # codewords: [q2 | q1], queries: [q1 | q2]
        filt2[:, :d].copy_(first)
        filt2[:, d:].copy_(second)
        lo_norm = torch.linalg.vector_norm(q2, dim=1).double() * (scale.double() / X2_BASE) * grow
    else:
        levels = _LEVELS[kind]
        scale = scale_of(levels)
        digits = torch.round(v32 / scale.unsqueeze(1)).clamp_(-levels, levels)
        res_norm = residual_bound(v32 - digits * scale.unsqueeze(1))
        filt = digits.to(torch.int8)
    filt_norm = torch.linalg.vector_norm(digits, dim=1).double() * scale.double() * grow
    sq = torch.linalg.vecdot(v32, v32) if squares and not normalize else None
    return _RowStats(filt, scale, res_norm, filt_norm, norm * grow + off_unit + tiny, sq, gamma + 3.0 * U32,
                     filt2=filt2, lo_norm=lo_norm)


def _row_stats_chunk_fp64(v: torch.Tensor, kind: str, normalize: bool, center: Optional[torch.Tensor]) -> _RowStats:
    if kind.startswith("int8x2"):
        raise ValueError("the two-level int8 filter takes fp32 / fp16 / bf16 rows, not float64")
    v64 = v.double()
    if center is not None:
        v64 = v64 - center.double()  # fp64 rounding here is far below the 2^-20 growth margin
    norm = v64.norm(dim=1)
    if normalize:
        v64 = v64 / norm.unsqueeze(1)
        norm = v64.norm(dim=1)
    grow = 1.0 + 2.0 ** -20  # keep every fp64 norm an upper bound despite its own rounding
    if kind == "fp64":
        filt = v64
        scale = torch.ones_like(norm)
        res_norm = torch.zeros_like(norm)
    elif kind == "fp32":
        filt = v64.float()
        scale = torch.ones_like(norm)
        res_norm = (v64 - filt.double()).norm(dim=1)
    else:
        levels = _LEVELS[kind]
        absmax = v64.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))
        q = torch.round(v64 / scale.unsqueeze(1)).clamp_(-levels, levels)
        res_norm = (v64 - q * scale.unsqueeze(1)).norm(dim=1)
        filt = q.to(torch.int8)
        scale = scale.float()
        # the filter rescales with the fp32 scale: fold its rounding into the residual
        res_norm = res_norm + (filt.double().norm(dim=1) * (scale.double() - absmax / levels).abs())
    filt_norm = filt.double().norm(dim=1) * scale.double()
    sq = (v64 * v64).sum(dim=1).float() if not normalize else None
    return _RowStats(filt, scale, res_norm * grow, filt_norm * grow, norm * grow, sq, 2.0 * U32)


class _Attempts:
    """The record of whether a per-codebook method pays on this codebook's queries.

    False from ``worth_trying`` after ``limit`` chunks in a row on which it did not pay (Gaussian-like
    data: each attempt costs its pilot and first block), except every FILTER_RETRY_EVERY-th chunk,
    which tries again (the queries may have changed).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.misses = 0  # chunks in a row on which the method did not pay
        self.skipped = 0  # chunks that did not try it since the last try

    def worth_trying(self) -> bool:
        if self.misses < self.limit:
            return True
        self.skipped += 1
        return self.skipped % FILTER_RETRY_EVERY == 0

    def record(self, paid: bool) -> None:
        self.misses = 0 if paid else self.misses + 1
        if paid:
            self.skipped = 0


#: the clock _DotPaths times its chunks with (a function, so a test can drive it)
_clock = time.perf_counter


class _DotPaths:
    """Which path settles an ip / cos codebook's unpruned chunks faster, per query: the certified
    flat scan (its uncertified queries then take the blocked scan) or the blocked direct scan alone.

    Neither wins everywhere (a 2-core AVX2 EPYC: 8x8x3 photograph patches against 16,384 sampled
    patches, ip, flat 0.63 s against blocked 0.45 s, FAISS 0.46 s; Gaussian 729 x 50,000 x 1152,
    cos, flat 0.74 s against 0.85 s), and it depends on the data and on the CPU's BLAS, so each is
    timed on a chunk (its per-codebook tables built before the clock starts), the faster is kept,
    and the other timed again every FILTER_RETRY_EVERY-th chunk (the queries may have changed)."""

    PATHS = ("flat", "blocked")

    def __init__(self):
        self.cost = {}  # path -> seconds per query on its latest chunk
        self.chunks = 0

    def pick(self) -> str:
        self.chunks += 1
        for path in self.PATHS:
            if path not in self.cost:
                return path
        best = min(self.PATHS, key=lambda p: self.cost[p])
        if self.chunks % FILTER_RETRY_EVERY == 0:
            return self.PATHS[1 - self.PATHS.index(best)]
        return best

    def record(self, path: str, seconds: float, rows: int) -> None:
        self.cost[path] = seconds / max(1, rows)


class _CodebookStats(_Attempts):
    """Per-codebook filter statistics, cached across calls (built once, then reused), and the
    record of whether the filter prunes on this codebook's queries."""

    def __init__(self, codebook: torch.Tensor, kind: str, metric: str):
        super().__init__(FILTER_MISSES)
        # l2: shift everything by the codebook mean (see _row_stats); fp32 so the shift itself is
        # a fixed, exactly known vector
        self.center = _column_mean(codebook).float() if metric == "l2" else None
        stat_kind = {"fbgemm": "int8", "int8x2": "int8x2c"}.get(kind, kind)
        # later exact copies of a codeword can only tie with the first, which wins: scan it alone
        # (photographs: saturated and flat patches repeat; their ties all reached the re-rank)
        self.ids = distinct_codewords(codebook)  # (K',) original id of each scanned row, or None
        self.stats = _row_stats(codebook, stat_kind, metric == "cos", self.center, self.ids)
        # the scanned rows' norms at their original ids (the re-rank's error bound indexes them so)
        self.norm_by_id = (self.stats.norm if self.ids is None else
                           torch.zeros(codebook.shape[0], dtype=torch.float64).index_copy_(0, self.ids, self.stats.norm))
        self.pilot = _pilot_sample(codebook, metric)
        # per-block maxima used in the error bound W
        n_blocks = math.ceil(self.stats.norm.shape[0] / CODE_BLOCK)
        self.fbgemm = _FbgemmBlocks(self.stats.filt) if kind == "fbgemm" else None
        if self.fbgemm is not None:
            self.stats.filt = None  # packed: fbgemm holds its own copy
            self.block_scale_max = [self.stats.scale[b * CODE_BLOCK:(b + 1) * CODE_BLOCK].max().item()
                                    for b in range(n_blocks)]
        self.block_res_max = [self.stats.res_norm[b * CODE_BLOCK:(b + 1) * CODE_BLOCK].max().item() for b in range(n_blocks)]
        self.block_filt_max = [self.stats.filt_norm[b * CODE_BLOCK:(b + 1) * CODE_BLOCK].max().item() for b in range(n_blocks)]
        self.block_norm_max = [self.stats.norm[b * CODE_BLOCK:(b + 1) * CODE_BLOCK].max().item() for b in range(n_blocks)]
        lo = self.stats.lo_norm
        self.block_lo_max = ([lo[b * CODE_BLOCK:(b + 1) * CODE_BLOCK].max().item() for b in range(n_blocks)]
                             if lo is not None else [0.0] * n_blocks)
        self.block_sq_max = (
            [self.stats.sq[b * CODE_BLOCK:(b + 1) * CODE_BLOCK].max().item() for b in range(n_blocks)]
            if self.stats.sq is not None else [0.0] * n_blocks
        )



def _column_mean(v: torch.Tensor) -> torch.Tensor:
    """(d,) float64 mean of the rows of ``v``, accumulated in chunks (no fp64 copy of ``v``)."""
    total = torch.zeros(v.shape[1], dtype=torch.float64)
    for start in range(0, v.shape[0], STAT_CHUNK):
        total += v[start:start + STAT_CHUNK].double().sum(dim=0)
    return total / max(1, v.shape[0])


def codebook_stats(codebook: torch.Tensor, kind: str, metric: str) -> _CodebookStats:
    """Cached filter statistics of ``codebook``; rebuilt if the tensor was modified in place."""
    return per_tensor(codebook, ("cpu_filter", kind, metric), lambda c: _CodebookStats(c, kind, metric))


_INT8_SPEEDUP: Optional[float] = None


def int8_speedup() -> float:
    """How many times faster this machine's int8 GEMM (``torch._int_mm``) runs than its fp32 GEMM,
    measured once per process on a small problem (a few ms where int8 is fast).

    AVX-512 VNNI CPUs run int8 at ~3.5x the fp32 rate; an AVX2-only CPU measured ~0.02x (torch
    falls back to a reference loop), where the int8 filter would be 30x slower than FAISS.
    """
    global _INT8_SPEEDUP
    if _INT8_SPEEDUP is None:
        if not int8_gemm_available():
            _INT8_SPEEDUP = 0.0
        else:
            a8, b8 = torch.ones((128, 512), dtype=torch.int8), torch.ones((1024, 512), dtype=torch.int8)
            a32, b32 = a8.float(), b8.float()
            _INT8_SPEEDUP = _best_time(lambda: a32 @ b32.t()) / _best_time(lambda: torch._int_mm(a8, b8.t()))
    return _INT8_SPEEDUP


def _best_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up: first-call dispatch and allocation
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def choose_filter(n: int, k: int, d: int) -> str:
    """How to search an (N, K, d) problem on this machine.

    "fp32": small codebooks (K x d < SMALL_CODEBOOK_ELEMENTS: the filter's statistics are a plain
    fp32 copy, its GEMM is short; 2-4x the fp64 filter's speed on them, measured, and ahead of the
    flat path's certification, whose per-query work dominates at so few codewords);
    "int8": the certified int8 filter, where int8 GEMM is fast enough to pay for its
    approximation; "flat": the certified fp32 flat scan (see _flat_search) -- FAISS's speed.
    """
    if k * d < SMALL_CODEBOOK_ELEMENTS:
        return "fp32"
    if MIN_INT8_DIM <= d <= MAX_INT8_DIM and int8_speedup() >= MIN_INT8_SPEEDUP:
        return "int8"
    if FBGEMM_MIN_DIM <= d <= MAX_INT8_DIM and fbgemm_speedup() >= MIN_FBGEMM_SPEEDUP:
        return "fbgemm"
    return "flat"


def _int8x2_ok(x: torch.Tensor, codebook: torch.Tensor) -> bool:
    """Whether the two-level int8 filter can search x against codebook: its combined dot products
    are exact in int32 up to MAX_INT8X2_DIM, and its statistics are fp32 (no float64 rows)."""
    return (MIN_INT8_DIM <= x.shape[1] <= MAX_INT8X2_DIM
            and torch.float64 not in (x.dtype, codebook.dtype))


def _filter_gemm(qx: torch.Tensor, qc: torch.Tensor, kind: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    # qx: (n, d), qc: (b, d) -> (n, b) filter dot products (exact int32 for int8 / int8x2, into
    # ``out`` when given; the fbgemm filter calls _FbgemmBlocks.dots instead)
    if kind in ("int8", "int8x2"):
        return torch._int_mm(qx, qc.t(), out=out)
    return qx @ qc.t()


def _gemm_rounding(kind: str, d: int) -> float:
    """Relative bound on the filter GEMM's own rounding, times ||x|| ||c||."""
    if kind in ("int8", "int8x2", "fbgemm"):
        return 0.0  # integer products and sums are exact (127^2 * d < 2^31 up to MAX_INT8_DIM;
        # fbgemm's fp32 output rounding is bounded per block by _FbgemmBlocks.dot_error)
    unit = U32 if kind == "fp32" else U64
    return 1.01 * (d + 2) * unit


def exact_scan(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Streaming float64 scan with direct distances: the fallback for degenerate queries.

    x: (n, d) any float dtype, codebook: (K, d). Returns ids (n,) int64, objective (n,) fp64.
    """
    x64 = x.double()
    if metric == "cos":
        x64 = x64 / x64.norm(dim=1, keepdim=True)
    best = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    best_idx = torch.zeros(x.shape[0], dtype=torch.int64)
    step = max(1, (1 << 22) // max(1, x.shape[0] * x.shape[1]))
    for start in range(0, codebook.shape[0], step):
        c64 = codebook[start:start + step].double()
        if metric == "cos":
            c64 = c64 / c64.norm(dim=1, keepdim=True)
        if metric == "l2":
            obj = (x64.unsqueeze(1) - c64.unsqueeze(0)).pow(2).sum(dim=2)
        else:
            obj = -(x64.unsqueeze(1) * c64.unsqueeze(0)).sum(dim=2)
        val, idx = obj.min(dim=1)  # first minimum within the block: lowest index
        better = val < best
        best = torch.where(better, val, best)
        best_idx = torch.where(better, idx + start, best_idx)
    return best_idx, best


def _pilot_sample(codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(S, d) float32 strided sample of the codebook (unit rows for cos) for the pilot bound.

    S is at most PILOT_SIZE and about 1/32 of K, so the pilot stays a few % of the scan.
    """
    k = codebook.shape[0]
    size = min(k, PILOT_SIZE, max(64, k // 32))
    sample = torch.unique(torch.linspace(0, k - 1, size).long())
    c32 = codebook.index_select(0, sample).float()
    if metric == "cos":
        c32 = c32 / c32.norm(dim=1, keepdim=True)
    return c32


def _pilot_upper_bound(x: torch.Tensor, pilot: torch.Tensor, metric: str) -> torch.Tensor:
    """(n,) float64 upper bound on each query's true minimum from a strided codeword sample.

    Without it the first blocks are filtered against a loose bound and hand many candidates to
    the re-ranking; a sample that spans the codebook (k-means codebooks are stored cluster by
    cluster) usually holds a codeword from the query's own cluster. Costs one small fp32 GEMM;
    its rounding (and that of the fp32 inputs) is added so the result stays an upper bound.
    """
    x32 = x.float()
    if metric == "cos":
        x32 = x32 / x32.norm(dim=1, keepdim=True)
    # the objective in fp32 (less ||x||^2 for l2), its minimum and where: any one sampled codeword
    # plus its own rounding slack bounds the true minimum from above
    if metric == "l2":
        c_sq = torch.linalg.vecdot(pilot, pilot)
        val, arg = torch.addmm(c_sq, x32, pilot.t(), alpha=-2.0).min(dim=1)
    else:
        val, arg = torch.mm(x32, pilot.t()).neg_().min(dim=1)
    x_norm = _native.norms64(x32)
    c_norm = _native.norms64(pilot)[arg]
    # fp32 rounding of d-term sums and of the few additions, of the inputs (fp64 queries) and of
    # the unit rows (cos)
    gamma = 2.0 * (x.shape[1] + 8) * U32
    if metric == "l2":
        return val.double() + x_norm.pow(2) + gamma * (x_norm + c_norm).pow(2)
    return val.double() + gamma * x_norm * c_norm + (4.0 * gamma if metric == "cos" else 0.0)


def nearest_cpu(
    x: torch.Tensor, codebook: torch.Tensor, metric: str, filter_kind: Optional[str] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest codeword on the CPU.

    Args:
        x: (N, d) float queries (finite). codebook: (K, d) float codewords (finite, K >= 1).
        metric: "l2", "ip" or "cos". filter_kind: "direct" | "bf16" | "int8" | "int8x2" | "fbgemm" | "fp32" |
            "fp64" | "flat"; None picks by shape and measured GEMM rates (choose_filter). "direct" is
            the fp32 direct scan of ``_direct`` (fp32 / fp16 / bf16 rows, small codebooks); "bf16" the
            fused scan of ``_scan_bf16`` (l2, fp32 rows, a CPU with AVX-512 BF16); the queries it
            leaves (too many candidates) take the automatic choice.

    Returns:
        ids (N,) int64 and dists (N,) float32: squared L2, -<x, c>, or 1 - cos(x, c).
    """
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float32)
    # (a codebook already known to be tightly clustered keeps its cell scan)
    if filter_kind == "direct" or (filter_kind is None and not _cells_built(codebook, metric)
                                   and _direct.fits(x, codebook, metric, lambda: _scan_fits(x, codebook, metric))):
        blocked = filter_kind == "direct" and _direct.takes_blocked(x, codebook, metric) and codebook.shape[0] > _direct.MAX_K
        if filter_kind == "direct" and not (blocked or _direct.takes(x, codebook, metric)):
            raise ValueError(f"the direct scan takes fp32 / fp16 / bf16 rows, 1 .. {_direct.MAX_K} codewords (ip / cos: "
                             f"any number) and d <= {_direct.MAX_DIM} (got metric {metric!r}, {x.dtype} queries, "
                             f"{codebook.dtype} codebook of shape {tuple(codebook.shape)}, native loops: "
                             f"{_native.available()})")
        with stage("nearest/direct"):
            if metric == "l2":
                ids, obj = _direct.search(x, codebook, distinct_codewords)
            elif blocked:
                ids, obj = _direct.search_dot_blocked(x, codebook, metric, distinct_codewords)
            else:
                ids, obj = _direct.search_dot(x, codebook, metric, distinct_codewords)
        return ids, (1.0 + obj if metric == "cos" else obj).float()
    if filter_kind == "bf16" or (filter_kind is None and _scan_fits(x, codebook, metric)):
        with stage("nearest/bf16_scan"):
            scanned = _bf16_scan(x, codebook, metric, forced=filter_kind == "bf16")
        if scanned is not None:
            return scanned
    if filter_kind == "bf16":
        filter_kind = None
    return _nearest_filtered(x, codebook, metric, filter_kind)


def _scan_fits(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> bool:
    """Whether the automatic choice takes the bf16 scan: l2, fp32 rows, a codebook of at most
    SCAN_MAX_K rows (beyond, the int8 filter's pruning and the cell scan do less work; tiny ones
    included: 3-16x the fp64 filter's speed there), not known to be tightly clustered, on a CPU whose
    compiled loops have it, and a scan that kept most queries on the last chunks it ran."""
    k, d = codebook.shape
    if (metric != "l2" or x.dtype != torch.float32 or codebook.dtype != torch.float32 or k > SCAN_MAX_K
            or _cells_built(codebook, metric) or not _scan_bf16.available()):
        return False
    return _scan_record(codebook).worth_trying()


def _scan_record(codebook: torch.Tensor) -> "_Attempts":
    """Whether the bf16 scan kept most queries of this codebook's recent chunks."""
    return per_tensor(codebook, ("bf16_scan_record",), lambda c: _Attempts(SCAN_MISSES))


def _bf16_scan(x: torch.Tensor, codebook: torch.Tensor, metric: str, forced: bool) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The bf16 scan of ``x`` (see _scan_bf16), its leftover queries by the other paths; None where
    it cannot run (another metric or dtype, no AVX-512 BF16, magnitudes out of its range)."""
    if metric != "l2" or not _scan_bf16.available() or torch.float64 in (x.dtype, codebook.dtype):
        if forced:
            raise ValueError(f"the bf16 scan takes l2 and fp32 / bf16 / fp16 rows on a CPU with AVX-512 BF16 "
                             f"(got metric {metric!r}, {x.dtype} queries, {codebook.dtype} codebook, "
                             f"available: {_scan_bf16.available()})")
        return None
    x32 = x.float().contiguous()
    c32 = codebook.float().contiguous() if codebook.dtype != torch.float32 else codebook.contiguous()
    book = per_tensor(codebook, ("bf16_scan",), lambda c: _scan_bf16.ScanCodebook(c32, distinct_codewords(c32)))
    if not book.usable:
        return None
    result = _scan_bf16.search(x32, c32, book, owner=codebook)
    record = _scan_record(codebook)
    if result is None:  # queries beyond the bound's range: a miss (the other paths rescale them)
        record.record(False)
        return None
    ids, obj, rest = result
    record.record(rest.numel() <= SCAN_MAX_REST * x.shape[0])
    if rest.numel():  # too many candidates (masses of near-equidistant codewords): the other exact paths
        with stage("nearest/bf16_scan_rest"):
            rest_ids, rest_dists = _nearest_filtered(x.index_select(0, rest), codebook, metric, None)
        ids[rest], obj[rest] = rest_ids, rest_dists.double()
    return ids, obj.float()


def _nearest_filtered(x: torch.Tensor, codebook: torch.Tensor, metric: str,
                      filter_kind: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """nearest_cpu past the bf16 scan: the filter engine, the flat path and the cell scan."""
    n, d = x.shape
    k = codebook.shape[0]
    kind = filter_kind or choose_filter(n, k, d)
    if filter_kind in ("int8", "int8x2") and not int8_gemm_available():
        raise ValueError(f"the {filter_kind} filter needs an exact int8 GEMM, and this machine's torch._int_mm is "
                         f"missing or not exact (a CPU without VNNI: int16 pair sums that saturate)")
    if filter_kind == "int8x2" and not _int8x2_ok(x, codebook):
        raise ValueError(f"the int8x2 filter takes {MIN_INT8_DIM} <= d <= {MAX_INT8X2_DIM} and no float64 inputs "
                         f"(got d = {d}, {x.dtype} queries, {codebook.dtype} codebook)")
    if filter_kind is None and kind in ("int8", "fbgemm") and _cells_built(codebook, metric):
        kind = "flat"  # an earlier search found this codebook tightly clustered: its cells settle the queries
    # where the int8 filter keeps too much (photographs: flat regions put many codewords within its
    # ~2^-6 error bound), the two-level filter (~2^-13, three int8 GEMMs' work) usually prunes
    # before the chunk goes to the flat scan
    two_level = filter_kind is None and kind == "int8" and _int8x2_ok(x, codebook)
    # ip / cos where the filter does not prune (or none runs): the direct scan's dot products over
    # blocks of the codebook beside the flat scan, whose norm-relative certificate keeps masses
    # of candidates on flat image regions and tight clusters (cos: 0.08-0.13x FAISS there on a
    # 2-core AVX2 EPYC) -- FAISS's own work at the fp32 rate, with a bound that does not widen
    blocked = filter_kind is None and metric != "l2" and _direct.takes_blocked(x, codebook, metric)
    cstats = None
    if kind != "flat":
        with stage("nearest/codebook_stats"):
            cstats = codebook_stats(codebook, kind, metric)
    ids = torch.empty(n, dtype=torch.int64)
    obj = torch.empty(n, dtype=torch.float64)
    # the flat path takes larger chunks: FAISS blocks its own work and runs below its speed on
    # calls of a few hundred queries
    chunk_rows = FLAT_QUERY_CHUNK if kind == "flat" else QUERY_CHUNK
    for start in range(0, n, chunk_rows):
        chunk = x[start:start + chunk_rows]
        # (a forced filter_kind is always tried; the automatic choice remembers what the filter did)
        skip = kind == "flat" or (filter_kind is None and not cstats.worth_trying())
        result = None if skip else _search_chunk(chunk, codebook, cstats, metric, kind)
        if kind != "flat" and filter_kind is None:
            cstats.record(result is not None)
        if result is None and two_level:
            with stage("nearest/codebook_stats"):
                finer = codebook_stats(codebook, "int8x2", metric)
            if finer.worth_trying():
                result = _search_chunk(chunk, codebook, finer, metric, "int8x2")
            finer.record(result is not None)
        if result is None and blocked and not _cells_built(codebook, metric):
            # ip / cos (cos codebooks known to be tightly clustered: their cell scan, below): the
            # certified flat scan (its uncertified queries to the blocked scan) or the blocked
            # direct scan, whichever settled this codebook's chunks faster (_DotPaths)
            paths = per_tensor(codebook, ("dot_paths", metric), lambda c: _DotPaths())
            part = chunk  # (bound now: the closure below runs inside this iteration only)

            def dense(rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
                with stage("nearest/direct_blocked"):
                    return _direct.search_dot_blocked(part.index_select(0, rows), codebook, metric, distinct_codewords)

            path = paths.pick()
            # (the path's per-codebook tables built first, so the clock times its search alone)
            if path == "flat":
                _flat_codebook(codebook, metric)
            else:
                _direct.blocked_book(codebook, metric, distinct_codewords)
            began = _clock()
            if path == "flat":
                with stage("nearest/flat"):
                    result = _flat_search(chunk, codebook, metric, dense=dense)
            else:
                result = dense(torch.arange(chunk.shape[0]))
            paths.record(path, _clock() - began, chunk.shape[0])
        if result is None:  # the flat path, or a filter scan that stopped pruning
            with stage("nearest/flat"):
                result = _flat_search(chunk, codebook, metric)
        ids[start:start + chunk_rows], obj[start:start + chunk_rows] = result
    if metric == "l2":
        dists = obj
    elif metric == "ip":
        dists = obj
    else:
        dists = 1.0 + obj
    return ids, dists.float()


class _FlatCodebook:
    """The codebook as the flat scan reads it: fp32 rows, shifted by their mean (l2: the
    rounding bound scales with the row norms, as in _row_stats) or unit (cos), and the largest row
    norm for the error bound. ``vectors`` is None when the codebook itself is that (ip, fp32):
    the cache must not hold its own key."""

    def __init__(self, codebook: torch.Tensor, metric: str):
        # fp64 holding an fp32 value: fp32 rows shift by it in one fp32 subtraction (see transform)
        self.center = _column_mean(codebook).float().double() if metric == "l2" else None
        # exact duplicate codewords (flat image regions sample the same patch many times) would
        # all tie and overflow any candidate list: the flat scan reads one copy, ids map back to the lowest index
        self.ids = distinct_codewords(codebook)  # (K',) original id of each scanned row, or None
        rows = codebook if self.ids is None else codebook.index_select(0, self.ids)
        if metric == "ip" and self.ids is None and codebook.dtype == torch.float32 and codebook.is_contiguous():
            self.vectors = None
        else:
            self.vectors = torch.cat([self.transform(rows[start:start + STAT_CHUNK], metric)
                                      for start in range(0, rows.shape[0], STAT_CHUNK)])
            _announce_copy(codebook, self.vectors, {"l2": "shifted by the row mean", "ip": "deduplicated",
                                                    "cos": "rows normalised"}[metric] + f", metric {metric!r}")
        rows = codebook if self.vectors is None else self.vectors
        # (K',) fp64 norms of the scanned rows, rounded up: they enter the error bounds
        self.norms = torch.cat([rows[start:start + STAT_CHUNK].double().norm(dim=1)
                                for start in range(0, rows.shape[0], STAT_CHUNK)]) * (1.0 + GROW64)
        self.norm_max = float(self.norms.max())
        self._sq: Optional[torch.Tensor] = None

    def scanned(self, codebook: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (K', d) fp32 rows FAISS scans and their (K',) fp32 squared norms (computed once)."""
        rows = codebook if self.vectors is None else self.vectors
        if self._sq is None:
            self._sq = torch.cat([torch.linalg.vecdot(block, block) for block in rows.split(STAT_CHUNK)])
        return rows, self._sq

    def transform(self, v: torch.Tensor, metric: str) -> torch.Tensor:
        """(R, d) rows as FAISS sees them: each element one fp32 rounding of the exact value."""
        if metric == "l2" and v.dtype != torch.float64:
            # fp32 / fp16 / bf16 rows less an fp32 center: IEEE fp32 subtraction is one rounding of
            # the exact difference, the value the fp64 route gives, without two fp64 copies
            return (v.float() - self.center.float()).contiguous()
        v64 = v.double()
        if metric == "l2":
            v64 = v64 - self.center
        elif metric == "cos":
            v64 = v64 / v64.norm(dim=1, keepdim=True)
        return v64.float().contiguous()


def _flat_codebook(codebook: torch.Tensor, metric: str) -> _FlatCodebook:
    """The codebook's _FlatCodebook for ``metric`` (built once, then cached)."""
    return per_tensor(codebook, ("flat", metric), lambda c: _FlatCodebook(c, metric))


def _announce_copy(codebook: torch.Tensor, copy: torch.Tensor, what: str) -> None:
    """Say once per cached copy of a codebook what the exact search keeps, when it is large."""
    size = copy.numel() * copy.element_size()
    if size < COPY_WARN_BYTES:
        return
    warnings.warn(
        f"u2.nearest keeps a float32 copy of this {tuple(codebook.shape)} {codebook.dtype} codebook ({what}; "
        f"{size / 2 ** 30:.2f} GiB beside the codebook's {codebook.numel() * codebook.element_size() / 2 ** 30:.2f} GiB) "
        f"for its exact CPU search, until the codebook is freed or changed in place",
        UserWarning, stacklevel=2)


def distinct_codewords(codebook: torch.Tensor) -> Optional[torch.Tensor]:
    """``first_of_duplicates(codebook)``, computed once per codebook tensor: the int8, int8x2 and
    flat paths all scan the distinct rows and would otherwise each hash the whole codebook."""
    return per_tensor(codebook, ("distinct_codewords",), first_of_duplicates)


def first_of_duplicates(codebook: torch.Tensor) -> Optional[torch.Tensor]:
    """Sorted original ids of the first occurrence of every distinct row of ``codebook: (K, d)``,
    or None when all rows are distinct. Rows are grouped by a 64-bit hash of their bits, and a
    group is merged only where the rows are bitwise equal to its first row (no hash is trusted)."""
    k, d = codebook.shape
    generator = torch.Generator().manual_seed(0x5EED)
    weights = torch.randint(-(2 ** 62), 2 ** 62, (d,), dtype=torch.int64, generator=generator)
    bits = torch.float32 if codebook.dtype != torch.float64 else torch.float64
    ints = torch.int32 if bits == torch.float32 else torch.int64
    keys = torch.empty(k, dtype=torch.int64)
    for start in range(0, k, STAT_CHUNK):
        block = codebook[start:start + STAT_CHUNK].to(bits).contiguous().view(ints).long()
        keys[start:start + STAT_CHUNK] = (block * weights).sum(dim=1)  # wraps: a hash, not a sum
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    first_in_group = torch.ones(k, dtype=torch.bool)
    first_in_group[1:] = sorted_keys[1:] != sorted_keys[:-1]
    if bool(first_in_group.all()):
        return None
    group_start = torch.cummax(torch.where(first_in_group, torch.arange(k), 0), dim=0).values
    representative = order[group_start]  # stable sort: the lowest original id of its hash group
    candidates = (~first_in_group).nonzero().squeeze(1)
    same = torch.zeros(k, dtype=torch.bool)
    for start in range(0, candidates.numel(), STAT_CHUNK):
        pos = candidates[start:start + STAT_CHUNK]
        same[pos] = (codebook.index_select(0, order[pos]) == codebook.index_select(0, representative[pos])).all(dim=1)
    keep = torch.ones(k, dtype=torch.bool)
    keep[order[same]] = False
    return keep.nonzero().squeeze(1)


def _near_pairs(x: torch.Tensor, codebook: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, near: torch.Tensor,
                metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (row, codeword) pairs of ``near: (R, kk)`` that the float64 re-rank must settle.

    Tight clusters leave hundreds of codewords within the GEMM's error bound of a query (its
    bound scales with the norms, not with the distances). For fp32 (and narrower) inputs, l2 and
    many such pairs, the distances are first computed directly in fp32, sum((x - c)^2), whose
    rounding is relative to the distance itself: only the pairs within that much smaller bound of
    the best go on to float64, instead of gathering every pair in float64.
    """
    # rows: (R,) query rows, cols: (R, kk) codeword ids, near: (R, kk) bool
    hit_row, hit_col = near.nonzero(as_tuple=True)
    direct = metric == "l2" and x.dtype != torch.float64 and codebook.dtype != torch.float64
    if not direct or hit_row.numel() <= DIRECT_REFINE_PAIRS * rows.numel():
        return rows[hit_row], cols[hit_row, hit_col]
    # relative rounding of a d-term fp32 sum of squared differences, plus cdist's square root and
    # our squaring of it
    g = sum_rounding(x.shape[1] + 4, U32)
    keep = torch.zeros_like(near)
    for start in range(0, rows.numel(), DIRECT_REFINE_ROWS):
        stop = start + DIRECT_REFINE_ROWS
        xr = x.index_select(0, rows[start:stop]).float().unsqueeze(1)  # (r, 1, d)
        cr = codebook.index_select(0, cols[start:stop].reshape(-1)).float().view(xr.shape[0], -1, x.shape[1])
        # direct differences (no norm expansion, so no cancellation), without temporaries
        dist = torch.cdist(xr, cr, compute_mode="donot_use_mm_for_euclid_dist").squeeze(1).double().pow_(2)
        dist = torch.where(near[start:stop], dist, torch.inf)
        best = dist.min(dim=1, keepdim=True).values
        keep[start:stop] = dist * (1.0 - g) <= best * (1.0 + g)
    hit_row, hit_col = keep.nonzero(as_tuple=True)
    return rows[hit_row], cols[hit_row, hit_col]


class _BandIndex(_Attempts):
    """The flat path's scanned rows sorted by their projection on the codebook's first principal
    direction u, for the band search of l2 queries, and the record of whether its bands pay.

    For any unit u, |<u, x> - <u, c>| <= ||x - c||: a codeword nearer to x than sqrt(B) (B an
    upper bound on the exact minimum) has its projection within sqrt(B) of x's, so the rows
    whose projections fall outside that band are never scanned. Real photographs put much of
    their energy on one direction (brightness): there a band holds 9-27% of a codebook per query
    (scikit-image photographs, 8x8 and 16x16 patches). Projections are those of the fp32 rows
    the scan reads; ``plan`` widens a band for their rounding.
    """

    def __init__(self, flat: "_FlatCodebook", codebook: torch.Tensor):
        super().__init__(BAND_MISSES)
        rows, sq = flat.scanned(codebook)
        sample = rows[::max(1, rows.shape[0] // BAND_PCA_ROWS)].double()
        sample = sample - sample.mean(dim=0)
        _, vecs = torch.linalg.eigh(sample.t() @ sample)
        self.u = vecs[:, -1] / vecs[:, -1].norm()  # (d,) fp64 unit
        proj = torch.cat([block.double() @ self.u for block in rows.split(STAT_CHUNK)])
        self.proj, self.perm = torch.sort(proj, stable=True)  # (K',) fp64, sorted position -> scanned row
        self._rows: Optional[torch.Tensor] = rows
        self.vectors: Optional[torch.Tensor] = None
        self.sq = sq[self.perm]  # (K',) fp32 squared norms, sorted
        self.norms = flat.norms[self.perm]

    def materialise(self) -> None:
        """The sorted fp32 rows (copied on the first band search)."""
        if self.vectors is None:
            self.vectors = self._rows.index_select(0, self.perm)
            _announce_copy(self._rows, self.vectors, "sorted by projection for the band search")
            self._rows = None

    def plan(self, queries: torch.Tensor, bound: torch.Tensor, x_norm: torch.Tensor,
             norm_max: float) -> Tuple[List[Tuple[torch.Tensor, int, int]], float]:
        """Groups of queries and the sorted rows [lo, hi) each must scan, and the share of the
        full scan's work that is. ``queries``: (n, d) fp32 rows as scanned; ``bound``: (n,) fp64
        upper bounds on each exact minimum (squared distance)."""
        n = queries.shape[0]
        px = torch.cat([block.double() @ self.u for block in queries.split(STAT_CHUNK)])
        # the band's half width: sqrt of the bound, widened for the fp32 rounding of both rows
        # (their projections) and the fp64 ones of the projections and the square root
        radius = bound.clamp_min(0.0).sqrt() * (1.0 + GROW64) + 4.0 * U32 * (x_norm + norm_max)
        # queries of similar radius, then of similar projection, share a band
        blocks = []
        work = 0
        by_radius = torch.argsort(radius, stable=True)
        for group in by_radius.chunk(max(1, min(BAND_RADIUS_GROUPS, n // BAND_ROWS))):
            group = group[torch.argsort(px[group], stable=True)]
            for start in range(0, group.numel(), BAND_ROWS):
                rows = group[start:start + BAND_ROWS]
                lo_hi = torch.stack([(px[rows] - radius[rows]).min(), (px[rows] + radius[rows]).max()])
                lo = int(torch.searchsorted(self.proj, lo_hi[:1]))
                hi = int(torch.searchsorted(self.proj, lo_hi[1:], right=True))
                blocks.append((rows, lo, hi))
                work += (hi - lo) * rows.numel()
        return blocks, work / max(1, n * self.proj.numel())


def gemm_keep_torch(dots: torch.Tensor, col0: int, sq: Optional[torch.Tensor], coef: float, margin: torch.Tensor,
                    offset: torch.Tensor, best: torch.Tensor, cand_v: torch.Tensor, cand_c: torch.Tensor,
                    count: torch.Tensor) -> None:
    """``_native.gemm_keep`` in torch ops (no C compiler): the same state, the same fp32 objectives
    and thresholds, so the same candidates (finite objectives: the callers' inputs are checked and
    rescaled into range; NaN would propagate here and be skipped by the compiled fold)."""
    v = sq - coef * dots if sq is not None else -dots
    torch.minimum(best, v.amin(dim=1).double(), out=best)
    t = best + margin + 16.0 * U64 * (best.abs() + offset.abs() + margin.abs())
    tf = t.float()
    tf = torch.where(tf.double() < t, torch.nextafter(tf, torch.tensor(math.inf)), tf)
    cap = cand_v.shape[1]
    old = (torch.arange(cap).unsqueeze(0) < count.clamp_min(0).unsqueeze(1)) & (cand_v <= tf.unsqueeze(1))
    old_r, old_s = old.nonzero(as_tuple=True)
    live = count >= 0
    new_r, new_j = ((v <= tf.unsqueeze(1)) & live.unsqueeze(1)).nonzero(as_tuple=True)
    r = torch.cat([old_r, new_r])
    vals = torch.cat([cand_v[old_r, old_s], v[new_r, new_j]])
    cols = torch.cat([cand_c[old_r, old_s], new_j + col0])
    order = torch.argsort(r, stable=True)  # kept entries first, then the block's in column order
    r, vals, cols = r[order], vals[order], cols[order]
    per_row = torch.bincount(r, minlength=count.shape[0]).to(torch.int32)
    slot = torch.arange(r.numel()) - (torch.cumsum(per_row, 0) - per_row)[r]
    fits = (slot < cap) & live[r]
    cand_v[r[fits], slot[fits]] = vals[fits]
    cand_c[r[fits], slot[fits]] = cols[fits]
    count.copy_(torch.where(live & (per_row <= cap), per_row, torch.full_like(count, -1)))


def _flat_search(x: torch.Tensor, codebook: torch.Tensor, metric: str, cells_ok: bool = True,
                 dense: Optional[Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest codewords by a flat fp32 scan (FAISS's algorithm at torch's BLAS speed,
    data-independent), certified: ids (n,) and float64 objective (n,).

    The scan (``settle``) takes fp32 GEMM blocks of queries x codewords and keeps per query its
    least fp32 objective and every codeword within twice the widest error bound of it
    (``_native.gemm_keep``). Every fp32 objective is within a rigorous bound w(x, c) of the exact
    one (fp32 rounding of the inputs, of the GEMM and of the norms), so the least fp32 value plus w
    bounds the exact minimum from above, and a codeword not kept is provably farther than it: the
    exact nearest codeword and every exact tie of it are among the kept ones, of which those whose
    lower bound reaches the upper one are re-ranked in float64 from the original vectors (lowest
    index on ties). Queries that keep more than FLAT_CAP go to a threshold scan in torch that
    keeps every codeword whose lower bound reaches the query's running upper bound, and the few
    with more than THRESHOLD_CAP of those to the streaming float64 scan (masses of distinct,
    equidistant codewords). Exact duplicate codewords are scanned once (see _FlatCodebook).
    ``dense(rows)``, where given (ip / cos: the blocked direct scan), settles the queries that do
    not certify instead of the threshold scan and the cell scan (every query where the codebook is
    known to be clustered).
    """
    n, d = x.shape
    flat = _flat_codebook(codebook, metric)
    k = codebook.shape[0] if flat.ids is None else flat.ids.shape[0]  # rows the flat scan reads
    queries = flat.transform(x, metric)
    # the fp32 objective of a pair (||c||^2 - 2 <q, c>, or -<q, c>; FAISS's evaluation order or the
    # flat scan's) is within w(x, c) of the exact one: the fp32 rounding of the (shifted) inputs,
    # of the GEMM's d-term sums and of the norms' sums, and the final additions
    gamma = sum_rounding(d + 8, U32) * (1.0 + GROW64)
    # (l2: ||q||^2 in float64 once, for the scans' objectives; its root rounded up for the bounds)
    q_sq_all = _native.sq_dist64(queries, torch.zeros(d, dtype=torch.float64)) if metric == "l2" else None
    x_norm = (_native.norms64(queries) if q_sq_all is None else q_sq_all.sqrt()) * (1.0 + GROW64)

    def width(x_norms: torch.Tensor, c_norms: torch.Tensor) -> torch.Tensor:
        if metric == "l2":
            return gamma * (x_norms + c_norms).pow(2)
        if metric == "ip":
            return gamma * x_norms * c_norms
        return torch.full(torch.broadcast_shapes(x_norms.shape, c_norms.shape), 3.0 * gamma, dtype=torch.float64)

    ids = torch.full((n,), -1, dtype=torch.int64)
    best = torch.full((n,), math.inf, dtype=torch.float64)
    bound = torch.full((n,), math.inf, dtype=torch.float64)  # upper bound on each exact minimum

    def finish(rows: torch.Tensor, cols: torch.Tensor, near: torch.Tensor) -> None:
        """Re-rank the near pairs of ``rows`` (cols: (r, kk) original ids) in float64."""
        pair_rows, pair_cols = _near_pairs(x, codebook, rows, cols, near, metric)
        obj, _ = pair_objective(x, codebook, pair_rows, pair_cols, metric, torch.float64)
        row_ids, row_best = lowest_of_min(n, pair_rows, pair_cols, obj)
        ids[rows], best[rows] = row_ids[rows], row_best[rows]

    def settle(todo: torch.Tensor) -> torch.Tensor:
        """The flat scan of the queries ``todo``: fp32 GEMM blocks (torch's BLAS, FAISS's own
        algorithm and speed) folded by ``_native.gemm_keep`` into each query's running minimum and
        the codewords within twice the widest bound of it. Settles the queries with at most
        FLAT_CAP of those (their exact nearest and every tie of it are among them: all others are
        provably farther); returns the rest, their upper bounds recorded in ``bound``."""
        if todo.numel() == 0:
            return todo
        t = todo.numel()
        vectors, sq = flat.scanned(codebook)
        # (todo: ascending query rows, every one or a subset; all of them need no copy)
        rows_in = queries if t == n else queries[todo]
        xn = x_norm[todo]
        q_sq = q_sq_all[todo] if metric == "l2" else torch.zeros(t, dtype=torch.float64)
        w_any = width(xn, torch.tensor(flat.norm_max, dtype=torch.float64))
        # a codeword can be the nearest only if v - w + ||q||^2 <= best + ||q||^2 + w (v: the
        # fp32 objective less ||q||^2, as the threshold scan evaluates it; w <= w_any)
        margin = (2.0 * w_any * (1.0 + 2.0 ** -20)).contiguous()
        least = torch.full((t,), math.inf, dtype=torch.float64)
        cap = min(FLAT_CAP, k)
        cand_v = torch.empty((t, cap), dtype=torch.float32)
        cand_c = torch.zeros((t, cap), dtype=torch.int64)
        count = torch.zeros(t, dtype=torch.int32)
        coef = 2.0 if metric == "l2" else 1.0
        scratch = _scratch()
        fold = _native.gemm_keep if _native.available() else gemm_keep_torch
        for q0 in range(0, t, FLAT_GEMM_ROWS):
            q1 = min(t, q0 + FLAT_GEMM_ROWS)
            q = rows_in[q0:q1]
            for c0 in range(0, k, FLAT_GEMM_COLS):
                c1 = min(k, c0 + FLAT_GEMM_COLS)
                dots = torch.mm(q, vectors[c0:c1].t(), out=scratch.get("flat_dots", (q1 - q0, c1 - c0), torch.float32))
                fold(dots, c0, sq[c0:c1] if metric == "l2" else None, coef, margin[q0:q1], q_sq[q0:q1],
                     least[q0:q1], cand_v[q0:q1], cand_c[q0:q1], count[q0:q1])
        settled = count > 0  # (none kept: objectives that are not numbers; the threshold scan's to judge)
        used = max(int(count.max()), 0)  # (the widest kept list: the tables past it are unused)
        cand_v, cand_c = cand_v[:, :used], cand_c[:, :used]
        slots = torch.arange(cand_v.shape[1]).unsqueeze(0) < count.clamp_min(0).unsqueeze(1)
        v = cand_v.double()
        w = width(xn.unsqueeze(1), flat.norms[cand_c])
        slack = fp64_slack(v, q_sq.unsqueeze(1))
        # >= the exact minimum: the least fp32 objective, and (settled rows) each kept pair's own bound
        upper = least + q_sq + w_any + fp64_slack(least, q_sq)
        pair_upper = torch.where(slots, v + q_sq.unsqueeze(1) + w + slack, torch.full_like(v, math.inf))
        if used:
            upper = torch.minimum(upper, pair_upper.amin(dim=1))
        bound[todo] = upper
        if bool(settled.any()):
            near = (slots & (v + q_sq.unsqueeze(1) - w - slack <= upper.unsqueeze(1)))[settled]
            cols = cand_c[settled] if flat.ids is None else flat.ids[cand_c[settled]]
            finish(todo[settled], cols, near)
        return todo[~settled]

    def threshold(todo: torch.Tensor, view: Optional["_BandIndex"] = None,
                  blocks: Optional[List[Tuple[torch.Tensor, int, int]]] = None) -> torch.Tensor:
        """Settle the queries ``todo`` by one fp32 scan in torch that keeps, block by block, every
        codeword whose lower bound reaches the query's running upper bound (its exact nearest and
        every tie of it among them). Returns the queries with more than THRESHOLD_CAP such
        codewords (masses of distinct, equidistant ones).

        ``view`` and ``blocks``: the band search's codebook sorted by projection, and (rows, lo,
        hi): each group of rows scans only the sorted rows [lo, hi), which hold every codeword
        that can be their nearest (see _BandIndex)."""
        if view is None:
            vectors, sq = flat.scanned(codebook)
            norms, to_scanned = flat.norms, None
            blocks = [(todo[start:start + THRESHOLD_ROWS], 0, k) for start in range(0, todo.numel(), THRESHOLD_ROWS)]
        else:
            vectors, sq, norms, to_scanned = view.vectors, view.sq, view.norms, view.perm
        coef = 2.0 if metric == "l2" else 1.0
        masses = []
        for rows, lo, hi in blocks:
            if lo >= hi:  # (no codeword in the band: cannot happen with a true bound; stay exact)
                masses.append(rows)
                continue
            q = queries[rows]
            xn = x_norm[rows]
            q_sq = q_sq_all[rows] if metric == "l2" else torch.zeros(rows.numel(), dtype=torch.float64)
            upper = bound[rows].clone()
            hit_rows, hit_cols, hit_vals = [], [], []
            count = torch.zeros(rows.numel(), dtype=torch.int64)
            for b0 in range(lo, hi, THRESHOLD_BLOCK):
                b1 = min(hi, b0 + THRESHOLD_BLOCK)
                # fp32 objective less ||q||^2 (l2: ||c||^2 - 2 <q, c>; ip / cos: -<q, c>), FAISS's own
                # evaluation order, so the same width bounds it
                part = (torch.addmm(sq[b0:b1], q, vectors[b0:b1].t(), alpha=-coef) if metric == "l2"
                        else torch.mm(q, vectors[b0:b1].t()).neg_())
                w_blk = width(xn, norms[b0:b1].max())
                blk_min = part.amin(dim=1).double()
                upper = torch.minimum(upper, blk_min + q_sq + w_blk + fp64_slack(blk_min, q_sq))
                thresh_f = _filter_threshold(upper, q_sq, w_blk, torch.float32)
                hit = (part <= thresh_f.unsqueeze(1)).nonzero()
                count += torch.bincount(hit[:, 0], minlength=rows.numel())
                keep = count[hit[:, 0]] <= THRESHOLD_CAP  # past the cap: the query goes to the fp64 scan
                hit = hit[keep]
                hit_rows.append(hit[:, 0])
                hit_cols.append(hit[:, 1] + b0)
                hit_vals.append(part[hit[:, 0], hit[:, 1]].double())
            r, c, v = torch.cat(hit_rows), torch.cat(hit_cols), torch.cat(hit_vals)
            lower = v + q_sq[r] - width(xn[r], norms[c]) - fp64_slack(v, q_sq[r])
            c = c if to_scanned is None else to_scanned[c]  # sorted position -> scanned row
            over = count > THRESHOLD_CAP
            keep = (lower <= upper[r]) & ~over[r]
            r, c = r[keep], c[keep]
            masses.append(rows[over])
            if r.numel() == 0:
                continue
            # the kept pairs as (rows, kk) tables for the re-rank: position of each pair in its row
            order = torch.argsort(r, stable=True)  # hits come block by block: group them by row
            r, c = r[order], c[order]
            per_row = torch.bincount(r, minlength=rows.numel())
            slot = torch.arange(r.numel()) - (torch.cumsum(per_row, 0) - per_row)[r]
            has = per_row > 0
            local = torch.zeros((rows.numel(), int(per_row.max())), dtype=torch.int64)
            near = torch.zeros_like(local, dtype=torch.bool)
            local[r, slot] = c
            near[r, slot] = True
            cols = local if flat.ids is None else flat.ids[local]
            finish(rows[has], cols[has], near[has])
        return torch.cat(masses) if masses else todo[:0]

    with faiss_threads(torch.get_num_threads()):
        # Tight clusters overflow the flat scan's candidate lists almost everywhere: when more than
        # FLAT_FAIL_SHARE of the chunk does, its failures go to the cell scan over a partition built
        # once per codebook; a codebook already partitioned sends every query there directly. The
        # other failures do not go back to a flat scan, which runs far below its speed on a few
        # hundred queries (400 of 8000 cost 27% of the whole at K = 16384, measured with FAISS):
        # the threshold scan settles them.
        every = torch.arange(n)
        band = None
        if cells_ok and _cells_built(codebook, metric):
            to_cells, failed = every, every[:0]
        elif (band := _band_plan(x, codebook, flat, queries, x_norm, metric)) is not None:
            # the band search settles the chunk: every query scans only the codewords of its band
            view, blocks, pilot_bound = band
            bound.copy_(pilot_bound)
            to_cells, failed = every[:0], every[:0]
        else:
            failed = settle(every)
            many = failed.numel() > FLAT_FAIL_SHARE * n
            to_cells = failed if many and cells_ok and _use_cells(codebook, metric, failed.numel()) else every[:0]
            if to_cells.numel():
                failed = every[:0]
            elif dense is not None and failed.numel():
                ids[failed], best[failed] = dense(failed)
                failed = every[:0]
        if to_cells.numel():
            cells = per_tensor(codebook, ("cells", metric), lambda c: _codebook_cells(c, metric))

            def fallback(xr: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
                # cos: the blocked direct scan (the flat scan's threshold scan keeps masses of
                # candidates where cells do not prune: flat image regions); the cell scan takes
                # u2.nearest's distances, 1 - cos, not the objective -cos
                work.append(xr.shape[0] * k_all)  # (a query the cells hand back costs a full scan)
                if metric == "cos" and _direct.takes_blocked(xr, codebook, metric):
                    fb_ids, fb_obj = _direct.search_dot_blocked(xr, codebook, metric, distinct_codewords)
                else:
                    fb_ids, fb_obj = _flat_search(xr, codebook, metric, cells_ok=False)
                return fb_ids, (1.0 + fb_obj if metric == "cos" else fb_obj)

            work: List[int] = []
            k_all = codebook.shape[0]  # (the cells partition every row, duplicates included)
            for start in range(0, to_cells.numel(), CELLS_QUERY_CHUNK):
                rows = to_cells[start:start + CELLS_QUERY_CHUNK]
                ids[rows], best[rows] = _cells.exact_search(cells, x[rows], codebook, False, fallback,
                                                            CELLS_FALLBACK_FRACTION, metric, work)
            # cells that scanned most of the codebook or handed it back (flat image regions: unit
            # rows all alike) did not pay; such a codebook's later chunks take the other paths
            if to_cells.numel() >= CELLS_RECORD_ROWS and sum(work) > CELLS_MAX_WORK * to_cells.numel() * k_all:
                per_tensor(codebook, ("cells_unpaid", metric), lambda c: True)
        todo = threshold(failed) if band is None else threshold(every, view, blocks)
    if todo.numel():  # more than THRESHOLD_CAP distinct codewords within the bound: equidistant masses
        ids[todo], best[todo] = exact_scan(x[todo], codebook, metric)
    return ids, best


def _band_plan(x: torch.Tensor, codebook: torch.Tensor, flat: "_FlatCodebook", queries: torch.Tensor,
               x_norm: torch.Tensor, metric: str):
    """The band search's plan for this chunk, or None where it does not pay: (view, blocks,
    pilot upper bounds). Decided per chunk from its own bands: their total work against the
    full scan's (see _BandIndex), after a pilot bound from a strided codeword sample."""
    n, d = x.shape
    k = flat.norms.shape[0]
    if metric != "l2" or d > BAND_MAX_DIM or k < BAND_MIN_K or n < BAND_ROWS:
        return None
    view = per_tensor(codebook, ("band",), lambda c: _BandIndex(flat, c))
    if not view.worth_trying():
        return None
    pilot_bound = _pilot_upper_bound(x, _pilot_sample(codebook, metric), metric)
    blocks, work = view.plan(queries, pilot_bound, x_norm, flat.norm_max)
    view.record(work <= BAND_MAX_WORK)
    if work > BAND_MAX_WORK:
        return None
    view.materialise()
    return view, blocks, pilot_bound


def _cell_count(k: int) -> int:
    return max(1, min(k, round(math.sqrt(k))))


def _cells_built(codebook: torch.Tensor, metric: str) -> bool:
    """Whether an earlier search partitioned this codebook for ``metric`` (it found it tightly clustered)."""
    return (metric in CELLS_METRICS and cached(codebook, ("cells", metric)) is not None
            and cached(codebook, ("cells_unpaid", metric)) is None)


def _use_cells(codebook: torch.Tensor, metric: str, n: int) -> bool:
    """Whether the queries of a chunk that failed the flat path's pilot go to the cell scan."""
    k = codebook.shape[0]
    if metric not in CELLS_METRICS or k < CELLS_MIN_K or cached(codebook, ("cells_unpaid", metric)) is not None:
        return False
    return _cells_built(codebook, metric) or n >= CELLS_MIN_QUERIES_PER_CELL * _cell_count(k)


def _codebook_cells(codebook: torch.Tensor, metric: str = "l2") -> _cells.Cells:
    """A partition of ``codebook: (K, d)`` into about sqrt(K) cells for the exact cell scan (cos:
    of its unit rows, which the cells then hold: cos is l2 on the unit sphere)."""
    import faiss

    k = codebook.shape[0]
    n_cells = _cell_count(k)

    def rows_of(index: torch.Tensor) -> torch.Tensor:
        rows = codebook.index_select(0, index)
        if metric == "cos":
            r64 = rows.double()
            return r64 / r64.norm(dim=1, keepdim=True)
        return rows

    def rows32(index: torch.Tensor) -> torch.Tensor:
        return rows_of(index).float().contiguous()

    def assign(v32: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(faiss.knn(v32.numpy(), centres.numpy(), 1)[1][:, 0]).long()

    with stage("nearest/cells_build"), faiss_threads(torch.get_num_threads()):
        centres = rows32(torch.linspace(0, k - 1, n_cells).long())
        train = torch.linspace(0, k - 1, min(k, n_cells * CELLS_TRAIN_PER_CELL)).long().unique()
        train32 = rows32(train)
        for _ in range(CELLS_NITER):
            cell = assign(train32, centres)
            means, counts = _cells.cluster_means(train32, cell, n_cells)
            filled = counts > 0
            centres[filled] = means[filled].float()
        cell = torch.empty(k, dtype=torch.int64)
        for start in range(0, k, STAT_CHUNK):
            cell[start:start + STAT_CHUNK] = assign(rows32(torch.arange(start, min(k, start + STAT_CHUNK))), centres)
        perm = torch.sort(cell, stable=True).indices  # stable: a cell keeps its codewords' original order
        result = _cells.Cells(lambda a, b: rows_of(perm[a:b]), perm,
                              _cells.offsets(torch.bincount(cell, minlength=n_cells)), centres, eager=True)
    _announce_copy(codebook, result.residuals()[0], "minus its cell centres, for tightly clustered codebooks")
    return result


def _filter_threshold(upper: torch.Tensor, offset: torch.Tensor, width: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per query, the largest filter value a codeword may have and still be the nearest, in the
    filter's dtype: the pair-space upper bound moved to filter space (fp64, with the rounding of
    that move), plus the block's width, rounded up past the cast."""
    thresh = upper - offset + width + fp64_slack(upper, offset)
    return (thresh + thresh.abs() * 2.0 ** -20).to(dtype)


class _Scratch(threading.local):
    """Per-thread buffers of the filter scan and the flat scan, reused across blocks, chunks and calls.

    A fresh (rows, CODE_BLOCK) result page-faults on first touch, which on a 2-core machine costs
    as much as the int8 GEMM that fills it. At most 3 buffers of QUERY_CHUNK x CODE_BLOCK entries
    (96 MiB) and the flat scan's FLAT_GEMM_ROWS x FLAT_GEMM_COLS block (16 MiB) are held per thread
    that searched.
    """

    def __init__(self):
        self.buffers = {}

    def get(self, name: str, shape: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous uninitialised tensor of ``shape`` backed by the buffer called ``name``."""
        numel = shape[0] * shape[1]
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            if numel <= QUERY_CHUNK * CODE_BLOCK:
                self.buffers[(name, dtype)] = buf
        return buf[:numel].view(shape)


_SCRATCH = _Scratch()


def _scratch() -> _Scratch:
    return _SCRATCH


def native_epilogue() -> bool:
    """Whether the int8 / int8x2 filter finishes its blocks with the compiled C epilogue
    (``_native.filter_epilogue``; the torch passes otherwise: no C compiler)."""
    return _native.available()


class _GroupMinima:
    """Minima of groups of GROUP_WIDTH consecutive columns of one block of filter values, and the
    (row, column) entries at or below a per-row threshold read back only from the groups whose
    minimum is: one pass over the block instead of a compare and a nonzero over all of it."""

    def __init__(self, approx: torch.Tensor, minima: Optional[torch.Tensor] = None):
        # approx: (n, w) contiguous; minima: its (n, groups) group minima when already computed
        self.approx = approx
        if minima is not None:
            self.minima = minima
            return
        n, w = approx.shape
        full = w // GROUP_WIDTH
        parts = []
        if full:
            parts.append(approx[:, :full * GROUP_WIDTH].view(n, full, GROUP_WIDTH).amin(dim=2))
        if w % GROUP_WIDTH:
            parts.append(approx[:, full * GROUP_WIDTH:].amin(dim=1, keepdim=True))
        self.minima = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def below(self, thresh: torch.Tensor, active: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) int64 of the entries <= thresh[row] in the rows where ``active``, row-major."""
        n, w = self.approx.shape
        hit_groups = ((self.minima <= thresh.unsqueeze(1)) & active.unsqueeze(1)).nonzero()
        rows, group = hit_groups[:, 0], hit_groups[:, 1]
        if w % GROUP_WIDTH == 0:
            # whole groups are contiguous 64-value rows of the block: one row gather (memcpy
            # speed; an element-wise index was most of the filter's time on photographs)
            groups = self.approx.view(n * (w // GROUP_WIDTH), GROUP_WIDTH)
            values = groups.index_select(0, rows * (w // GROUP_WIDTH) + group)
            hit = (values <= thresh.index_select(0, rows).unsqueeze(1)).nonzero()
            which = hit[:, 0]
            return rows.index_select(0, which), group.index_select(0, which) * GROUP_WIDTH + hit[:, 1]
        cols = group.unsqueeze(1) * GROUP_WIDTH + torch.arange(GROUP_WIDTH)
        inside = cols < w  # the last group of a block may be short
        cols = cols.clamp_(max=w - 1)
        values = self.approx.reshape(-1)[rows.unsqueeze(1) * w + cols]
        hit = ((values <= thresh[rows].unsqueeze(1)) & inside).nonzero()
        return rows[hit[:, 0]], cols[hit[:, 0], hit[:, 1]]


def _search_chunk(x, codebook, cstats: _CodebookStats, metric: str, kind: str):
    # x: (n, d) queries; returns ids (n,), float64 objective (n,)
    n, d = x.shape
    k = cstats.stats.norm.shape[0]  # rows scanned (distinct codewords)
    qs = _row_stats(x, "int7" if kind == "fbgemm" else kind, metric == "cos", cstats.center, squares=False)
    cs = cstats.stats
    u = _FbgemmBlocks.activations(qs.filt) if kind == "fbgemm" else None
    coef = 2.0 if metric == "l2" else 1.0  # filter objective: ||c||^2 - 2<x,c>  or  -<x,c>
    gemm_round = _gemm_rounding(kind, d)
    integer = kind in ("int8", "int8x2", "fbgemm")
    # int8x2's combined dot products count in units of 1 / X2_BASE (a power of two: exact)
    unit = 1.0 / X2_BASE if kind == "int8x2" else 1.0
    neg_scale = (-coef * unit * qs.scale.double()).to(torch.float32 if integer else cs.filt.dtype)
    # The candidates' exact objectives live in the "pair" space (||x-c||^2 for l2); the filter's
    # omits ||x||^2. pair = filter + offset.
    offset = (_native.sq_dist64(x, cstats.center) if metric == "l2" else torch.zeros(n, dtype=torch.float64))
    two_stage = x.dtype != torch.float64 and codebook.dtype != torch.float64
    x_pair = x.float() if two_stage else x.double()
    pair_gamma = sum_rounding(d, U32) if two_stage else 0.0

    with stage("nearest/pilot"):
        # bound on the true minimum (pair space). A codebook of one block needs none: the block's
        # own minimum bounds it, and the pilot (up to the whole codebook at small K) cost as much
        # as the scan (K = 64, d = 1152: 129 ms of which the pilot took a third, against 47 ms)
        upper = (_pilot_upper_bound(x, cstats.pilot, metric) if k > CODE_BLOCK
                 else torch.full((n,), math.inf, dtype=torch.float64))
    store = CandidateStore(n, x.device)
    overflow = store.overflow  # updated in place by store.admit
    deferred = []  # (rows, block, lower bound of the codewords not extracted)
    kept = 0  # candidate pairs extracted, plus BLOCK_CANDIDATES per deferred (row, block)

    def add(r, local_cols, b):
        """Record candidates (r, block b's local_cols) with their certified pair-space bounds."""
        keep = store.admit(r)
        r, cols = r[keep], local_cols[keep] + b * CODE_BLOCK
        ids = cols if cstats.ids is None else cstats.ids[cols]  # scanned row -> codeword id
        # Exact-ish objective of the block's candidates right away: the block's codewords and the
        # query chunk are still in cache, and the tighter bound prunes the following blocks.
        obj, err = pair_objective(x_pair, codebook, r, ids, metric, gamma=pair_gamma, x_norm=qs.norm,
                                  c_norm=cstats.norm_by_id)
        upper.scatter_reduce_(0, r, obj + err, reduce="amin")
        store.add(r, ids, obj - err)

    scratch = _scratch()

    def block_values(b: int, start: int, stop: int, sel: Optional[torch.Tensor] = None):
        """(approx (m, w), width (m,), minima): the filter objective of the queries ``sel`` (None:
        all) against block b, the bound on its distance from the true filter objective, and the
        (m, groups) group minima when the native epilogue computed them (else None)."""
        def of(v: torch.Tensor) -> torch.Tensor:
            return v if sel is None else v[sel]

        m = n if sel is None else sel.numel()
        if kind == "fbgemm":
            approx = cstats.fbgemm.dots(u if sel is None else torch.cat([u[sel], u[-1:]]), b, start, stop)
            approx.mul_(cs.scale[start:stop])
        elif kind in ("int8", "int8x2"):
            # into reused buffers: fresh (n, CODE_BLOCK) results page-fault on every block, and
            # copy_ + mul_ runs ~3x faster than a mixed-dtype mul
            dots = _filter_gemm(of(qs.filt), cs.filt[start:stop], kind, scratch.get("dots", (m, stop - start), torch.int32))
            low = None
            if kind == "int8x2":
                low = _filter_gemm(of(qs.filt2), cs.filt2[start:stop], kind,
                                   scratch.get("dots2", (m, stop - start), torch.int32))
            approx = scratch.get("approx", (m, stop - start), torch.float32)
            if native_epilogue():
                # the int32 sum (exact: d <= MAX_INT8X2_DIM), the scaling, the l2 terms and the
                # group minima in one C pass instead of five torch passes over the block
                minima = torch.empty((m, -(-(stop - start) // GROUP_WIDTH)), dtype=torch.float32)
                # (the codewords' fp32 scales and squared norms: slices of contiguous (K',) vectors)
                _native.filter_epilogue(dots, low, X2_BASE, cs.scale[start:stop],
                                        cs.sq[start:stop] if metric == "l2" else None,
                                        of(neg_scale).contiguous(), approx, minima, GROUP_WIDTH)
                return approx, block_width(b, sel), minima
            if low is not None:
                dots = low.add_(dots, alpha=X2_BASE)  # exact: d <= MAX_INT8X2_DIM
            approx = approx.copy_(dots).mul_(cs.scale[start:stop])
        else:
            approx = _filter_gemm(of(qs.filt), cs.filt[start:stop], kind)
        if metric == "l2":
            approx = torch.addcmul(cs.sq[start:stop].to(approx.dtype), approx, of(neg_scale).unsqueeze(1), out=approx)
        else:
            approx.mul_(of(neg_scale).unsqueeze(1))
        return approx, block_width(b, sel), None

    def block_width(b: int, sel: Optional[torch.Tensor]) -> torch.Tensor:
        """(m,) bound on |true filter objective - approx| for every codeword of block b (queries ``sel``)."""
        def of(v: torch.Tensor) -> torch.Tensor:
            return v if sel is None else v[sel]

        filt_norm = of(qs.filt_norm)
        dot_err = filt_norm * cstats.block_res_max[b] + of(qs.res_norm) * cstats.block_norm_max[b]
        dot_err = dot_err + gemm_round * filt_norm * cstats.block_filt_max[b]
        if qs.lo_norm is not None:  # int8x2: the <q2x, q2c> term left out of the GEMMs
            dot_err = dot_err + of(qs.lo_norm) * cstats.block_lo_max[b]
        if kind == "fbgemm" and cstats.fbgemm.dot_error[b]:
            dot_err = dot_err + cstats.fbgemm.dot_error[b] * of(qs.scale).double() * cstats.block_scale_max[b]
        # fp32 evaluation of the approximate objective: a few roundings of terms of this size
        magnitude = coef * filt_norm * cstats.block_filt_max[b] + cstats.block_sq_max[b]
        # (+ the absolute rounding of fp32 values below the normal range: squares, products)
        return (coef * dot_err + 2.0 ** -19 * magnitude + cs.sq_rel_err * cstats.block_sq_max[b]
                + 4.0 * d * FP32_SUBNORMAL_STEP)

    with stage("nearest/filter_scan"):
        for b, start in enumerate(range(0, k, CODE_BLOCK)):
            stop = min(k, start + CODE_BLOCK)
            approx, width, minima = block_values(b, start, stop)
            groups = _GroupMinima(approx, minima)
            blk_min = groups.minima.amin(dim=1).double()
            # pair space = filter space + offset: each move between them rounds in fp64, by up to
            # an ulp of the larger side, which can exceed the width when the queries lie far from
            # the codebook (offset >> filter values); _fp64_slack keeps both sides bounds
            upper = torch.minimum(upper, blk_min + width + offset + fp64_slack(blk_min, offset))
            thresh_f = _filter_threshold(upper, offset, width, approx.dtype)
            rows, cols = groups.below(thresh_f, ~overflow)
            if rows.numel() == 0:
                continue
            counts = torch.bincount(rows, minlength=n)
            many = counts > BLOCK_CANDIDATES
            if bool(many.any()):
                # A row with many candidates here is usually looking at the siblings of its nearest
                # codeword before reaching it: extract only the smallest few now and re-check the rest
                # against the final bound (they are rarely needed).
                many_rows = many.nonzero().squeeze(1)
                smallest, small_cols = approx[many_rows].topk(BLOCK_CANDIDATES, dim=1, largest=False)
                keep = ~many[rows]
                rows = torch.cat([rows[keep], many_rows.repeat_interleave(BLOCK_CANDIDATES)])
                cols = torch.cat([cols[keep], small_cols.reshape(-1)])
                deferred.append((many_rows, b, smallest[:, -1].double() - width[many_rows]))
                kept += BLOCK_CANDIDATES * many_rows.numel()
            kept += rows.shape[0]
            if b + 1 >= PRUNE_CHECK_BLOCKS and kept > PRUNE_LIMIT * n * (b + 1):
                # the filter keeps too much of the codebook (many codewords within its error bound
                # of the queries): re-checking the survivors would cost more than FAISS's flat scan
                # (checked before this block's candidates are measured: they would be wasted)
                return None
            add(rows, cols, b)

    with stage("nearest/rerank"):
        # Deferred (row, block) pairs whose unextracted codewords could still beat the final bound
        # need the rest of that block.
        # Their block is scored again for just those rows, against the final thresholds: only
        # its codewords within them are measured (re-adding the whole block would push flat-region
        # queries past the candidate cap, to the flat search).
        for many_rows, b, rest_lower in deferred:
            rest_upper = upper[many_rows] - offset[many_rows] + fp64_slack(upper[many_rows], offset[many_rows])
            need = many_rows[(rest_lower <= rest_upper) & ~overflow[many_rows]]
            if need.numel():
                start = b * CODE_BLOCK
                approx, width, _ = block_values(b, start, min(k, start + CODE_BLOCK), need)
                thresh_f = _filter_threshold(upper[need], offset[need], width, approx.dtype)
                hit = (approx <= thresh_f.unsqueeze(1)).nonzero()
                # a query with masses of them (flat regions: hundreds of near-equal codewords) is
                # cheaper to settle by the flat search's fp32 scan than by measuring each
                crowded = torch.bincount(hit[:, 0], minlength=need.numel()) > DEFERRED_CAP
                overflow[need[crowded]] = True
                hit = hit[~crowded[hit[:, 0]]]
                add(need[hit[:, 0]], hit[:, 1], b)

        rows, cols, lower = store.surviving(upper)
        obj = pair_objective(x, codebook, rows, cols, metric, torch.float64)[0] if two_stage else lower
    ids, best = lowest_of_min(n, rows, cols, obj)
    if bool(overflow.any()):
        over_rows = overflow.nonzero().squeeze(1)
        # fp64 filter rows overflowing are equidistant to float64 precision: stream them exactly
        over = exact_scan if kind == "fp64" else _flat_search
        ids[over_rows], best[over_rows] = over(x[over_rows], codebook, metric)
    return ids, best
