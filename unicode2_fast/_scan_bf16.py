"""u2.nearest's bf16 scan: exact l2 nearest codewords on CPUs with AVX-512 BF16, for codebooks of
up to a few ten thousand rows (a VQ layer's 128 .. 16,384 codes, the codebook build's assignment).

FAISS's flat scan is an fp32 GEMM and an argmin. Its fp32 rate is the ceiling of every method
that only wraps it: at a small codebook the certification around it (u2's flat path) cost up to
2x FAISS's own time. The compiled loop of ``_native.bf16_scan_l2`` instead runs the dot products
as AVX-512 BF16 instructions (``vdpbf16ps``: exact products, fp32 accumulation, fp32 results;
about 4x the fp32 FMA rate) on rows shifted by the codebook's fp32 column mean and rounded to
bf16 once, with the epilogue fused into the loop: no (queries x codewords) matrix is written.

Rigour. With a = x - m and b = c - m (exact, m the fp32 center), the objective of a pair is
f = ||b||^2 - 2 <a, b> (||x - c||^2 less the query's own ||a||^2). The loop computes
v = fl32(csq - 2 s), s the fp32 accumulation of <bf16(a32), bf16(b32)>, a32 = fl32(x - m). With
A >= ||a||, R_a >= ||bf16(a32) - a|| (the measured rounding-error norm, plus the fp32 shift's),
B, R_b alike, and g the fp32 accumulation bound of dp terms,

    |f - v| <= 2 (R_a B' + A' R_b) + (2 g + 2 u) A' B' + 5 u B^2 + flush terms,  A' = A + R_a, B' = B + R_b

(u = 2^-24; the flush terms cover inputs and results below 2^-126, which vdpbf16ps flushes to
zero). It is evaluated per pair as aq pw + rq qw + sw from per-query and per-codeword fp32
factors rounded up, widened for its own roundings. Every codeword whose lower bound v - e reaches
the least upper bound v + e is a candidate: the exact nearest and all its ties are among them.
The candidates are re-ranked in float64 from the original fp32 rows (lowest id on ties). A query
with more than SCAN_CAP candidates (masses of near-equidistant codewords: flat image regions,
tight clusters) is returned to the caller, which finishes it by its other exact paths.

Exact duplicate codewords are scanned once (the caller passes the distinct rows' ids).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _native
from ._cache import reused_buffer
from ._certified import U64, lowest_of_min, pair_objective

#: candidates a query may keep; beyond, the caller's exact paths take it
SCAN_CAP = 128
#: queries per call of the compiled scan (its candidate lists: SCAN_CHUNK x SCAN_CAP x 8 bytes; a
#: multiple of TILE_ROWS, so every chunk of packed rows is whole tiles)
SCAN_CHUNK = 6144
#: row and codebook norms outside [2^-MAGNITUDE, 2^MAGNITUDE] are left to the other paths (fp32
#: products of such rows overflow or flush; the bound would keep every codeword)
MAGNITUDE = 40
U = 2.0 ** -24
#: queries farther than this many times the codebook's radius from its center go to the other paths
#: (see _scan: at 2^20 the bound still exceeds float64's rounding of the distances 30,000-fold)
FAR_RATIO = 2.0 ** 20
#: longer rows are left to the other paths (the fp32 accumulation bound grows with d)
MAX_DIM = 65536
#: float64 sums of squares of fp32 values (exact products) err by far less than this, relatively
SUM64 = 2.0 ** -30
#: fp32 factors rounded up: float64 -> fp32 rounds to nearest (relative 2^-24), after this growth
UP32 = 1.0 + 2.0 ** -20
TINY = 2.0 ** -126
#: queries per register tile of the compiled loop (its padding of the query rows)
TILE_ROWS = 6
#: the loop reads rows as bf16 pairs: rows are zero padded to an even length, no more (padding to
#: 32, as before, doubled the dot products at d = 16 and quadrupled them at d = 8)
PAIR = 2


def padded_dim(d: int) -> int:
    """Columns of a packed row of d elements (the compiled loop's step is one bf16 pair)."""
    return -(-d // PAIR) * PAIR


def available() -> bool:
    """Whether this machine runs the bf16 scan (native loops built, AVX-512 BF16)."""
    return _native.bf16_scan_available()


def _rounded_up(v: torch.Tensor) -> torch.Tensor:
    return (v * UP32).float()


class ScanCodebook:
    """The codebook as the bf16 scan reads it: the distinct rows less a fp32 center (default their
    column mean), rounded to bf16 and laid out as panels of 64 codewords (P, dp / 2, 64) of bf16
    pairs, with the per-codeword factors of the error bound. ``usable`` is False where the
    magnitudes leave the range the bound covers."""

    def __init__(self, codebook: torch.Tensor, ids: Optional[torch.Tensor], center: Optional[torch.Tensor] = None):
        rows = codebook if ids is None else codebook.index_select(0, ids)
        rows = rows.contiguous()
        self.ids = ids
        k, d = rows.shape
        self.k = k
        self.dp = padded_dim(d)
        self.center = rows.mean(dim=0, dtype=torch.float64).float().contiguous() if center is None else center
        panel_count = -(-k // 64)
        packed = torch.empty((panel_count * 64, self.dp), dtype=torch.int16)
        norm = torch.empty(panel_count * 64, dtype=torch.float64)
        resid = torch.empty_like(norm)
        _native.bf16_pack_rows(rows, self.center, packed, norm, resid)
        self.panels = packed.view(torch.int32).view(panel_count, 64, self.dp // 2).transpose(1, 2).contiguous()
        b = norm * (1.0 + SUM64) * (1.0 + 2.0 * U)  # >= ||c - m|| (the fp32 shift errs by u per element)
        rb = resid * (1.0 + SUM64) + U * b  # >= ||bf16(b32) - (c - m)||
        b1 = b + rb
        gamma = self.dp * U / (1.0 - self.dp * U) if self.dp * U < 0.01 else math.inf  # fp32 sums of dp exact products
        root = math.sqrt(self.dp)
        self.csq = (norm * norm).float()
        self.pw = _rounded_up(2.0 * rb + (2.0 * gamma + 2.0 * U) * b1 + 2.0 * TINY * root)
        self.qw = _rounded_up(2.0 * b1)
        self.sw = _rounded_up(5.0 * U * b * b + 2.0 * TINY * (2.0 * self.dp + root * b1))
        for factor in (self.pw, self.qw, self.sw):
            factor[k:] = 0.0
        self.csq[k:] = math.inf  # padding: never a candidate
        top = float(b[:k].max()) if k else 0.0
        self.top = top  # >= every ||c - m||
        self.usable = k > 0 and self.dp <= MAX_DIM and 2.0 ** -MAGNITUDE <= top <= 2.0 ** MAGNITUDE and bool(torch.isfinite(self.csq[:k]).all())


class PackedRows:
    """Query rows packed once for the bf16 scan against codebooks that share ``center`` (Lloyd's
    assignment: the same training rows every iteration, new centroids): their bf16 rows and
    per-row bound factors. ``usable`` as for ScanCodebook."""

    def __init__(self, x: torch.Tensor, center: torch.Tensor, buffers: Optional[torch.Tensor] = None):
        self.x = x
        self.center = center
        self.owner = x if buffers is None else buffers  # the tensor the scan's candidate buffers are kept for
        n = x.shape[0]
        dp = padded_dim(x.shape[1])
        npad = -(-n // TILE_ROWS) * TILE_ROWS
        if buffers is None:  # owned rows
            self.q = torch.empty((npad, dp), dtype=torch.int16)
            norm, resid = torch.empty(npad, dtype=torch.float64), torch.empty(npad, dtype=torch.float64)
        else:  # one chunk of a single search: memory reused between calls (see reused_buffer)
            self.q = reused_buffer(buffers, ("bf16_scan", "rows"), (npad, dp), torch.int16)
            norm = reused_buffer(buffers, ("bf16_scan", "norm"), (npad,), torch.float64)
            resid = reused_buffer(buffers, ("bf16_scan", "resid"), (npad,), torch.float64)
        _native.bf16_pack_rows(x, center, self.q, norm, resid)
        a = norm[:n] * ((1.0 + SUM64) * (1.0 + 2.0 * U))  # >= ||x - m||
        ra = resid[:n] * (1.0 + SUM64) + U * a  # >= ||bf16(a32) - (x - m)||
        self.usable = n == 0 or float(a.max()) <= 2.0 ** MAGNITUDE
        self.a = a  # (n,) fp64 >= ||x - m||
        self.aq = _rounded_up(a + ra)
        self.rq = _rounded_up(ra)


def search(x: torch.Tensor, codebook: torch.Tensor, book: ScanCodebook,
           owner: Optional[torch.Tensor] = None) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Exact l2 nearest codewords of ``x: (n, d)`` fp32 in ``codebook: (K, d)`` fp32.

    Returns (ids (n,) int64, squared distances (n,) float64, rest) where ``rest`` holds the rows
    with too many candidates (their ids are -1: the caller finishes them), or None when the
    query magnitudes leave the bound's range (the whole search goes to the other paths).
    ``owner``: the tensor the scan's working memory is kept for between calls (default: codebook;
    the caller's own codebook where ``codebook`` is a converted copy).
    """
    owner = codebook if owner is None else owner
    n = x.shape[0]
    ids = torch.full((n,), -1, dtype=torch.int64)
    dist = torch.full((n,), math.inf, dtype=torch.float64)
    rests = []
    for start in range(0, n, SCAN_CHUNK):
        rows = PackedRows(x[start:start + SCAN_CHUNK], book.center, buffers=owner)
        if not rows.usable:
            return None
        rests.append(_scan(rows, 0, rows.x.shape[0], codebook, book, ids[start:start + SCAN_CHUNK],
                           dist[start:start + SCAN_CHUNK]) + start)
    return ids, dist, torch.cat(rests)


def search_packed(rows: PackedRows, codebook: torch.Tensor, book: ScanCodebook) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`search` for rows packed once (``rows.center`` must be ``book.center``; both usable)."""
    if rows.center is not book.center:
        raise ValueError("search_packed: the rows and the codebook were packed against different centers")
    n = rows.x.shape[0]
    ids = torch.full((n,), -1, dtype=torch.int64)
    dist = torch.full((n,), math.inf, dtype=torch.float64)
    rests = [_scan(rows, start, min(n, start + SCAN_CHUNK), codebook, book, ids[start:start + SCAN_CHUNK],
                   dist[start:start + SCAN_CHUNK]) + start for start in range(0, n, SCAN_CHUNK)]
    return ids, dist, torch.cat(rests) if rests else torch.empty(0, dtype=torch.int64)


def _scan(rows: PackedRows, start: int, stop: int, codebook: torch.Tensor, book: ScanCodebook, ids: torch.Tensor,
          dist: torch.Tensor) -> torch.Tensor:
    """Scan rows [start, stop) of ``rows`` (``ids`` / ``dist``: their output slices); returns the
    positions within the slice of the rows with too many candidates."""
    n = stop - start
    q = rows.q[start:start + -(-n // TILE_ROWS) * TILE_ROWS]  # whole tiles (the padding is zero)
    cand = reused_buffer(rows.owner, ("bf16_scan", "cand"), (n, SCAN_CAP), torch.int32)
    cand_lo = reused_buffer(rows.owner, ("bf16_scan", "cand_lo"), (n, SCAN_CAP), torch.float32)
    count = reused_buffer(rows.owner, ("bf16_scan", "count"), (n,), torch.int32)
    _native.bf16_scan_l2(q, n, book.panels, book.csq, book.pw, book.qw, book.sw, rows.aq[start:stop],
                         rows.rq[start:stop], cand, cand_lo, count)
    near = reused_buffer(rows.owner, ("bf16_scan", "near"), (n,), torch.int8)
    x = rows.x[start:stop]
    d = x.shape[1]
    # a float64 sum of d non-negative terms, in any order, is within gamma_d of the exact sum: where
    # our sums differ by more than ((1 + g) / (1 - g))^2, torch's order ranks the pair the same way
    gamma = (d + 2) * U64 / (1.0 - (d + 2) * U64)
    # (near also flags a winner whose sum, moved by that much, would round to another fp32 distance:
    # re-ranked in torch's order too, the returned distances are bit for bit the other paths')
    _native.rerank_l2_f64(x, codebook, book.ids, cand, count, ids, dist, near,
                          ((1.0 + gamma) / (1.0 - gamma)) ** 2 * (1.0 + 4 * U64))
    close = near.nonzero().squeeze(1)
    if close.numel():  # near ties: ranked by the objective every other exact path computes (torch's order)
        per_row = count[close].long()
        pair_rows = torch.repeat_interleave(close, per_row)
        slot = torch.arange(pair_rows.numel()) - torch.repeat_interleave(torch.cumsum(per_row, 0) - per_row, per_row)
        pair_cols = cand[pair_rows, slot].long()
        pair_cols = pair_cols if book.ids is None else book.ids[pair_cols]
        obj, _ = pair_objective(x, codebook, pair_rows, pair_cols, "l2", torch.float64)
        row_ids, row_best = lowest_of_min(n, pair_rows, pair_cols, obj)
        ids[close], dist[close] = row_ids[close], row_best[close]
    # a query FAR_RATIO times farther from the center than every codeword: float64's own rounding
    # of its distances (~gamma_d ||x - c||^2) may pass the bound (~2^-8 ||x - m|| ||c - m||), so
    # the float64 argmin could lie outside the candidates: the other paths take it
    far = rows.a[start:stop] > FAR_RATIO * book.top
    return ((count < 0) | far).nonzero().squeeze(1)
