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

#: candidates a query may keep; beyond, the caller's exact paths take it
SCAN_CAP = 128
#: queries per call of the compiled scan (its candidate lists: SCAN_CHUNK x SCAN_CAP x 8 bytes)
SCAN_CHUNK = 8192
#: row and codebook norms outside [2^-MAGNITUDE, 2^MAGNITUDE] are left to the other paths (fp32
#: products of such rows overflow or flush; the bound would keep every codeword)
MAGNITUDE = 40
U = 2.0 ** -24
#: float64 sums of squares of fp32 values (exact products) err by far less than this, relatively
SUM64 = 2.0 ** -30
#: fp32 factors rounded up: float64 -> fp32 rounds to nearest (relative 2^-24), after this growth
UP32 = 1.0 + 2.0 ** -20
TINY = 2.0 ** -126
#: queries per register tile of the compiled loop (its padding of the query rows)
TILE_ROWS = 6


def available() -> bool:
    """Whether this machine runs the bf16 scan (native loops built, AVX-512 BF16)."""
    return _native.bf16_scan_available()


def _rounded_up(v: torch.Tensor) -> torch.Tensor:
    return (v * UP32).float()


class ScanCodebook:
    """The codebook as the bf16 scan reads it: the distinct rows less their fp32 column mean,
    rounded to bf16 and laid out as panels of 64 codewords (P, dp / 2, 64) of bf16 pairs, with
    the per-codeword factors of the error bound. ``usable`` is False where the magnitudes leave
    the range the bound covers."""

    def __init__(self, codebook: torch.Tensor, ids: Optional[torch.Tensor]):
        rows = codebook if ids is None else codebook.index_select(0, ids)
        rows = rows.contiguous()
        self.ids = ids
        k, d = rows.shape
        self.k = k
        self.dp = -(-d // 32) * 32
        self.center = rows.mean(dim=0, dtype=torch.float64).float().contiguous()
        panel_count = -(-k // 64)
        packed = torch.empty((panel_count * 64, self.dp), dtype=torch.int16)
        norm = torch.empty(panel_count * 64, dtype=torch.float64)
        resid = torch.empty_like(norm)
        _native.bf16_pack_rows(rows, self.center, packed, norm, resid)
        self.panels = packed.view(torch.int32).view(panel_count, 64, self.dp // 2).transpose(1, 2).contiguous()
        b = norm * (1.0 + SUM64) * (1.0 + 2.0 * U)  # >= ||c - m|| (the fp32 shift errs by u per element)
        rb = resid * (1.0 + SUM64) + U * b  # >= ||bf16(b32) - (c - m)||
        b1 = b + rb
        gamma = 1.01 * self.dp * U  # fp32 accumulation of dp exact products
        root = math.sqrt(self.dp)
        self.csq = (norm * norm).float()
        self.pw = _rounded_up(2.0 * rb + (2.0 * gamma + 2.0 * U) * b1 + 2.0 * TINY * root)
        self.qw = _rounded_up(2.0 * b1)
        self.sw = _rounded_up(5.0 * U * b * b + 2.0 * TINY * (2.0 * self.dp + root * b1))
        for factor in (self.pw, self.qw, self.sw):
            factor[k:] = 0.0
        self.csq[k:] = math.inf  # padding: never a candidate
        top = float(b[:k].max()) if k else 0.0
        self.usable = k > 0 and 2.0 ** -MAGNITUDE <= top <= 2.0 ** MAGNITUDE and bool(torch.isfinite(self.csq[:k]).all())
        self.bytes = self.panels.numel() * 4


def search(x: torch.Tensor, codebook: torch.Tensor, book: ScanCodebook) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Exact l2 nearest codewords of ``x: (n, d)`` fp32 in ``codebook: (K, d)`` fp32.

    Returns (ids (n,) int64, squared distances (n,) float64, rest) where ``rest`` holds the rows
    with too many candidates (their ids are -1: the caller finishes them), or None when the
    query magnitudes leave the bound's range (the whole chunk goes to the other paths).
    """
    n, d = x.shape
    ids = torch.full((n,), -1, dtype=torch.int64)
    dist = torch.full((n,), math.inf, dtype=torch.float64)
    rests = []
    for start in range(0, n, SCAN_CHUNK):
        part = _scan_chunk(x[start:start + SCAN_CHUNK], codebook, book, ids[start:start + SCAN_CHUNK],
                           dist[start:start + SCAN_CHUNK])
        if part is None:
            return None
        rests.append(part + start)
    return ids, dist, torch.cat(rests)


def _scan_chunk(x: torch.Tensor, codebook: torch.Tensor, book: ScanCodebook, ids: torch.Tensor,
                dist: torch.Tensor) -> Optional[torch.Tensor]:
    n = x.shape[0]
    npad = -(-n // TILE_ROWS) * TILE_ROWS
    q = reused_buffer(codebook, ("bf16_scan", "rows"), (npad, book.dp), torch.int16)
    norm = reused_buffer(codebook, ("bf16_scan", "norm"), (npad,), torch.float64)
    resid = reused_buffer(codebook, ("bf16_scan", "resid"), (npad,), torch.float64)
    _native.bf16_pack_rows(x, book.center, q, norm, resid)
    a = norm[:n] * ((1.0 + SUM64) * (1.0 + 2.0 * U))
    top = float(a.max())
    if top > 2.0 ** MAGNITUDE:
        return None
    ra = resid[:n] * (1.0 + SUM64) + U * a
    aq = _rounded_up(a + ra)
    rq = _rounded_up(ra)
    cand = reused_buffer(codebook, ("bf16_scan", "cand"), (n, SCAN_CAP), torch.int32)
    cand_lo = reused_buffer(codebook, ("bf16_scan", "cand_lo"), (n, SCAN_CAP), torch.float32)
    count = reused_buffer(codebook, ("bf16_scan", "count"), (n,), torch.int32)
    _native.bf16_scan_l2(q, n, book.panels, book.csq, book.pw, book.qw, book.sw, aq, rq, cand, cand_lo, count)
    _native.rerank_l2_f64(x, codebook, book.ids, cand, count, ids, dist)
    return (count < 0).nonzero().squeeze(1)
