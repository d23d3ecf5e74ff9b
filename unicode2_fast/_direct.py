"""u2.nearest's direct scan: exact l2 / ip / cos nearest codewords for small codebooks (up to 4,096 rows).

A residual VQ stage of 8 .. 256 codes, a tiny call of 81 queries: here FAISS's whole search takes
microseconds, and the fixed cost of the filters (quantisation statistics, candidate stores, the
bf16 scan's 64-codeword panels) was most of u2's time (0.02x FAISS on 81 queries x 8 codewords).

The compiled loop of ``_native.direct_l2`` computes the distances in the direct form
s = sum_t fl32(x_t - c_t)^2, accumulated in fp32 by FMAs, 16 codewords per vector. All its terms
are non-negative, so its error is relative to the distance itself -- |s - f| <= g f + a, g about
(d + 3) 2^-24, a the subnormal roundings' absolute bound -- not to ||x|| ||c|| as in the
dot-product form of every GEMM (FAISS's included), and it holds for any finite fp32 inputs
(an overflowed sum keeps every codeword). The codewords whose lower bound reaches the least upper
bound are re-ranked by the float64 direct distance from the original rows; queries where two of
them are within float64's summation-order margin (or whose fp32 distance could round the other
way) are ranked again in torch's order by ``pair_objective`` -- the objective of every other
exact path, so ids and distances are theirs bit for bit, ties to the lowest index.

ip and cos (``_native.direct_dot``) use the same loop with fused dot products: their error is
bounded by g ||x|| ||c|| (cos: on rows over their float64 norms, rounded to fp32), every codeword
within twice that bound of the best fp32 value is re-ranked in float64 from the original rows,
and near ties go to torch's order the same way. Queries with more near ties than the loop lists
(flat image regions: their unit rows are all alike) have them pre-selected by a float64 GEMM
(``_mass_pairs``) before torch's order ranks them. Past MAX_K codewords (``search_dot_blocked``)
the same loop runs over blocks of the codebook that stay in the cache, and the blocks' winners
are ranked against each other.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from . import _native
from ._cache import per_tensor, reused_buffer
from ._certified import U32, U64, lowest_of_min, pair_objective

#: the largest codebook the direct scan takes (its per-tile sums live on the compiled loop's stack)
MAX_K = _native.DIRECT_MAX_K
#: rows longer than this go to the other paths (the fp32 sums' relative bound grows with d)
MAX_DIM = 1 << 16
#: where the bf16 scan runs (AVX-512 BF16) the automatic choice compares cost models fitted to a
#: grid measured on a 2-core AVX-512 BF16 EPYC (n in {256, 2048, 16384}, K in {16 .. 1024}, d in
#: {16, 64, 192, 1152}): the direct scan's time ~ n K (d + DIRECT_EXTRA), the bf16 scan's ~
#: SCAN_FIXED + SCAN_RELATIVE n K64 (d + SCAN_EXTRA), K64 = K rounded up to its 64-codeword panels
#: (about 0.006 ns per direct element on 2 cores). It picks the faster in 45 of the 46 grid cases
#: and loses 20% on the other (16384 x 128 x 64: bf16 scan 1.77 ms, direct 1.47 ms); the direct
#: scan's gains run to 5x (256 x 16 x 64: 25 us against 139 us)
DIRECT_EXTRA = 32
SCAN_EXTRA = 64
SCAN_RELATIVE = 0.7
SCAN_FIXED = 8_000_000
#: queries per call of the compiled loop (its near-tie lists: CHUNK x 64 x 4 bytes)
CHUNK = 16384


#: row dtypes the direct scan takes (fp16 / bf16 rows widen to fp32 exactly)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def takes(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> bool:
    """Whether the direct scan can run: fp32 / fp16 / bf16 rows, K <= MAX_K, d <= MAX_DIM, compiled
    loops (l2: the direct form; ip / cos: fp32 dot products, see :func:`search_dot`)."""
    k, d = codebook.shape
    return (metric in ("l2", "ip", "cos") and x.dtype in DTYPES and codebook.dtype in DTYPES and 0 < k <= MAX_K
            and d <= MAX_DIM and _native.available())


def fits(x: torch.Tensor, codebook: torch.Tensor, metric: str, scan: Callable[[], bool]) -> bool:
    """Whether the automatic choice takes the direct scan: it can run (:func:`takes`), and its cost
    model is below the bf16 scan's or the bf16 scan would not take the search (``scan()``, asked
    only then)."""
    if not takes(x, codebook, metric):
        return False
    if metric != "l2":
        return True  # no bf16 scan for ip / cos; the fp32 filter ran them at 0.2-0.5x FAISS
    n = x.shape[0]
    k, d = codebook.shape
    panels = -(-k // 64) * 64
    if n * k * (d + DIRECT_EXTRA) <= SCAN_FIXED + SCAN_RELATIVE * n * panels * (d + SCAN_EXTRA):
        return True
    # where the bf16 scan does not run: the filter engine (fp32 below K x d = 65,536) or FAISS's flat
    # path, a GEMM at about the direct scan's rate plus the certification. (Measured with AVX2 code
    # and on AVX-512 BF16 CPUs; CPUs with a fast int8 GEMM but no BF16, where the int8 filter could
    # win at K ~ 1,024 and large d, were not measured.)
    return not scan()


def search(x: torch.Tensor, codebook: torch.Tensor,
           distinct: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact l2 nearest codewords of ``x: (n, d)`` in ``codebook: (K, d)`` (fp32 / fp16 / bf16), K <= MAX_K:
    ids (n,) int64 and squared distances (n,) float64. Only the distinct rows are scanned:
    ``distinct(codebook)``, called once per codebook version, gives their sorted ids (the first of
    each set of exact duplicates), or None where all rows are distinct."""
    ids, copy, panels = per_tensor(codebook, ("direct_scan",), lambda c: _book(c, distinct(c)))
    rows = codebook if copy is None else copy
    d = x.shape[1]
    # a float64 sum of d non-negative terms, in any order, is within gamma_d of the exact sum: where
    # two sums differ by less than ((1 + g) / (1 - g))^2, torch's order may rank them otherwise
    gamma = (d + 2) * U64 / (1.0 - (d + 2) * U64)
    margin = ((1.0 + gamma) / (1.0 - gamma)) ** 2 * (1.0 + 4 * U64)
    return _chunked(x, codebook, rows, ids, "l2", lambda part, near: _native.direct_l2(part, rows, panels, margin, near))


def _book(codebook: torch.Tensor, ids: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor],
                                                                       torch.Tensor]:
    """(ids, the rows they select where those are a copy or None, their panels): cached per
    codebook, and never the codebook itself, which a cache value would keep alive forever."""
    rows = _distinct_rows(codebook, ids)
    return ids, (None if rows is codebook else rows), _native.direct_pack(rows)


def search_dot(x: torch.Tensor, codebook: torch.Tensor, metric: str,
               distinct: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact "ip" / "cos" nearest codewords (the least -<x, c> / -cos(x, c)) of ``x: (n, d)`` in
    ``codebook: (K, d)`` (fp32 / fp16 / bf16, no zero rows for cos), K <= MAX_K: ids (n,) int64
    and the objective (n,) float64, as :func:`search` (``distinct``: see there)."""
    cosine = metric == "cos"
    ids, rows, cnorm, panels, bound = per_tensor(codebook, ("direct_dot", metric),
                                                 lambda c: _dot_book(c, distinct(c), cosine))
    rows = codebook if rows is None else rows
    g, dev = _dot_bounds(x.shape[1], cosine)
    return _chunked(x, codebook, rows, ids, metric,
                    lambda part, near: _native.direct_dot(part, rows, cnorm, panels, bound, g, dev, cosine, near))


#: past MAX_K codewords the ip / cos scan runs over blocks of the codebook of at most this many bytes of
#: fp32 rows (each block's panels stay in the cache while every tile of queries passes over them)
BLOCK_BYTES = 1 << 21


def block_rows(d: int) -> int:
    """Codewords per block of :func:`search_dot_blocked`: a multiple of 16, at most MAX_K."""
    return max(16, min(MAX_K, BLOCK_BYTES // (4 * max(1, d)) // 16 * 16))


def takes_blocked(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> bool:
    """Whether :func:`search_dot_blocked` can run: ip / cos, fp32 / fp16 / bf16 rows, d <= MAX_DIM,
    compiled loops (any K)."""
    return (metric in ("ip", "cos") and x.dtype in DTYPES and codebook.dtype in DTYPES and codebook.shape[0] > 0
            and codebook.shape[1] <= MAX_DIM and _native.available())


def search_dot_blocked(x: torch.Tensor, codebook: torch.Tensor, metric: str,
                       distinct: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`search_dot` for codebooks of any size: the compiled scan over blocks of
    :func:`block_rows` codewords, each block's exact winner (ranked in torch's order where the
    block had near ties) merged into a running winner per query: where the two objectives lie
    within twice the float64 evaluations' deviation they are ranked in torch's order, the lower
    index on ties. No codeword outside a block's winner can win: within its block it lost to the
    winner in torch's order, or tied it with a higher index. Memory: O(n) besides the scan's own.

    Its cost is the full scan's (FAISS's work at the fp32 dot-product rate, data-independent): the
    bound is ``g ||x|| max ||c||`` per block, so masses of near-equal codewords (flat image regions,
    tight clusters) cost float64 re-ranks of those codewords only, never a wider scan."""
    cosine = metric == "cos"
    step = block_rows(codebook.shape[1])
    ids, rows, cnorm, blocks, bound = blocked_book(codebook, metric, distinct)
    rows = codebook if rows is None else rows
    d = x.shape[1]
    g, dev = _dot_bounds(d, cosine)
    x = x.float()
    x = x if d <= 1 or x.stride(1) == 1 else x.contiguous()
    n, k = x.shape[0], rows.shape[0]
    # two float64 evaluations of one objective differ by at most margin (see search_dot)
    margin = (torch.full((n,), dev, dtype=torch.float64) if cosine
              else dev * _native.norms64(x) * cnorm.max() * (1.0 + 2.0 ** -40))
    best = torch.full((n,), math.inf, dtype=torch.float64)
    won = torch.zeros(n, dtype=torch.int64)
    for b, panels in enumerate(blocks):
        lo, hi = b * step, min(k, (b + 1) * step)
        part_rows, part_norms, part_bound = rows[lo:hi], cnorm[lo:hi], bound[lo:hi]
        got, val = _chunked(x, codebook, part_rows, None, metric,
                            lambda part, near: _native.direct_dot(part, part_rows, part_norms, panels, part_bound, g, dev,
                                                                  cosine, near), rounding=False)
        got += lo
        # the running winner against this block's: one clearly better (by more than 2 margin) wins
        # in any order; two closer than that are ranked in torch's order, the lower index on ties.
        # (Exact: every codeword left out lost to one kept, clearly or in torch's order.)
        better = val < best - 2.0 * margin
        close = (val <= best + 2.0 * margin) & ~better
        best = torch.where(better, val, best)
        won = torch.where(better, got, won)
        again = close.nonzero().squeeze(1)
        if again.numel():
            held, new = won[again], got[again]
            pairs = torch.cat([again, again])
            obj, _ = pair_objective(x, rows, pairs, torch.cat([held, new]), metric, torch.float64)
            old_obj, new_obj = obj[:again.numel()], obj[again.numel():]
            take = (new_obj < old_obj) | ((new_obj == old_obj) & (new < held))
            won[again] = torch.where(take, new, held)
            best[again] = torch.where(take, new_obj, old_obj)
    if n:  # the winners' objectives in torch's order: the fp32 distances every other exact path returns
        best, _ = pair_objective(x, rows, torch.arange(n), won, metric, torch.float64)
    return (won if ids is None else ids[won]), best


def blocked_book(codebook: torch.Tensor, metric: str, distinct: Callable[[torch.Tensor], Optional[torch.Tensor]]):
    """The per-codebook tables of :func:`search_dot_blocked` (built on the first call, then cached)."""
    step = block_rows(codebook.shape[1])
    return per_tensor(codebook, ("direct_dot_blocked", metric, step),
                      lambda c: _dot_blocks(c, distinct(c), metric == "cos", step))


def _dot_blocks(codebook: torch.Tensor, ids: Optional[torch.Tensor], cosine: bool, step: int):
    """:func:`_dot_book` for :func:`search_dot_blocked`: (ids, rows copy or None, float64 norms, the
    panels of each block of ``step`` scanned rows, fp32 norm bounds)."""
    rows = _distinct_rows(codebook, ids)
    scanned, cnorm, bound = _scanned_rows(rows, cosine)
    blocks = [_native.direct_pack(scanned[lo:lo + step]) for lo in range(0, rows.shape[0], step)]
    return ids, (None if rows is codebook else rows), cnorm, blocks, bound


def _dot_bounds(d: int, cosine: bool) -> Tuple[float, float]:
    """(g, dev) of the dot-product scans: the fp32 scan's relative bound and the float64 evaluations'
    deviation (see search_dot)."""
    g = 1.01 * (d + 2) * U32 / (1.0 - (d + 2) * U32)  # the fp32 sum of d fused products
    if cosine:
        g += 2.1 * U32  # the normalised rows' fp32 roundings (relative u each, both sides)
    # two float64 evaluations of one objective, in any summation order, differ by at most dev
    # (times ||x|| ||c|| for ip; cos: the dot product's, both norms' and the division's roundings)
    dev = 2.02 * ((d + 2) * U64 if not cosine else (2 * d + 10) * U64)
    return g, dev


def _chunked(x: torch.Tensor, codebook: torch.Tensor, rows: torch.Tensor, ids: Optional[torch.Tensor], metric: str,
             scan: Callable, rounding: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """``scan(part, near)`` (a compiled loop's call) over chunks of CHUNK queries, the near ties of
    each chunk ranked in torch's order (:func:`_rerank`); the ids mapped back through ``ids``. The
    near-tie lists of chunks of more than 1,024 queries are written into memory kept between calls.
    ``rounding=False``: rows flagged only because their fp32 distance could round the other way
    (count 1: no second candidate) keep the loop's float64 value (the blocked scan ranks its final
    winners in torch's order itself)."""
    x = x.float()  # (exact for fp16 / bf16)
    x = x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()
    n = x.shape[0]
    parts = []
    for start in range(0, max(n, 1), CHUNK):  # (no queries: one empty chunk)
        part = x[start:start + CHUNK]
        near = None if part.shape[0] <= 1024 else reused_buffer(codebook, ("direct_scan", "near"),
                                                                (part.shape[0], _native.DIRECT_NEAR_CAP), torch.int32)
        got, val, near, count, flagged = scan(part, near)
        if flagged:  # near ties: ranked by the objective every other exact path computes (torch's order)
            _rerank(part, rows, got, val, near, count if rounding else count.masked_fill(count == 1, 0), metric)
        parts.append((got, val))
        del near  # (no reference to the buffer outlives the chunk: the next one gets the same memory)
    best, value = parts[0] if len(parts) == 1 else (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return (best if ids is None else ids[best]), value


#: float64 products per block of the pre-selection of :func:`_mass_pairs` (8 MiB)
MASS_BLOCK = 1 << 20


def _rerank(x: torch.Tensor, rows: torch.Tensor, best: torch.Tensor, value: torch.Tensor, near: torch.Tensor,
            count: torch.Tensor, metric: str) -> None:
    """Rows with ``count != 0``: their listed candidates ranked by ``pair_objective`` (torch's order),
    the lowest index on ties, into ``best`` / ``value``. Where count is -1 (more near ties than the
    loop lists): every codeword for l2; for ip / cos those :func:`_mass_pairs` pre-selects."""
    close = count.nonzero().squeeze(1)
    if close.numel() == 0:
        return
    per_row = count[close].long()
    every = per_row < 0
    if metric != "l2" and bool(every.any()):
        mass_rows, mass_cols = _mass_pairs(x, rows, close[every], metric)
        close_listed, per_listed = close[~every], per_row[~every]
        every_listed = torch.zeros(close_listed.numel(), dtype=torch.bool)
    else:
        mass_rows = mass_cols = None
        close_listed, per_listed, every_listed = close, torch.where(every, rows.shape[0], per_row), every
    pair_rows = close_listed.repeat_interleave(per_listed)
    slot = torch.arange(pair_rows.numel()) - torch.repeat_interleave(torch.cumsum(per_listed, 0) - per_listed, per_listed)
    listed = near[pair_rows, slot.clamp_max(near.shape[1] - 1)].long()
    pair_cols = torch.where(every_listed.repeat_interleave(per_listed), slot, listed)
    if mass_rows is not None:
        pair_rows, pair_cols = torch.cat([pair_rows, mass_rows]), torch.cat([pair_cols, mass_cols])
    obj, _ = pair_objective(x, rows, pair_rows, pair_cols, metric, torch.float64)
    row_ids, row_best = lowest_of_min(x.shape[0], pair_rows, pair_cols, obj)
    best[close], value[close] = row_ids[close], row_best[close]


def _mass_pairs(x: torch.Tensor, rows: torch.Tensor, queries: torch.Tensor, metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(query, codeword) pairs that can hold the torch-order winner of each of ``queries`` (ip /
    cos rows with more near ties than the loop lists: flat image regions, whose unit rows are
    all alike), from a float64 GEMM of them against every codeword. Any two float64 evaluations
    of one objective differ by at most dev (times ||x|| max ||c|| for ip), so the torch-order
    winner's GEMM value is within 3 dev of the least GEMM value: keeping every codeword within
    4 dev keeps it, and usually a few dozen codewords instead of all K."""
    cosine = metric == "cos"
    _, dev = _dot_bounds(x.shape[1], cosine)
    c64 = rows.double()
    c_norm = c64.norm(dim=1)
    step = max(1, MASS_BLOCK // max(1, rows.shape[0]))
    out_rows, out_cols = [], []
    for start in range(0, queries.numel(), step):
        q = queries[start:start + step]
        x64 = x.index_select(0, q).double()
        x_norm = x64.norm(dim=1, keepdim=True)
        obj = (x64 @ c64.t()).neg_()
        if cosine:
            obj.div_(x_norm * c_norm)
            tol = torch.full_like(x_norm, 4.0 * dev)
        else:
            tol = 4.0 * dev * x_norm * c_norm.max() * (1.0 + 2.0 ** -40)
        keep = obj <= obj.amin(dim=1, keepdim=True) + tol
        r, c = keep.nonzero().unbind(1)
        out_rows.append(q[r])
        out_cols.append(c)
    return torch.cat(out_rows), torch.cat(out_cols)


#: rows per step of :func:`_unit_rows` (its float64 quotients stay a few MiB)
UNIT_CHUNK = 4096


def _unit_rows(v: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """fp32 rows of ``v`` (fp32) over their float64 ``norms`` (each element within relative 2^-24 of
    the exact quotient), a chunk of rows at a time."""
    out = torch.empty(v.shape, dtype=torch.float32)
    for start in range(0, v.shape[0], UNIT_CHUNK):
        stop = start + UNIT_CHUNK
        out[start:stop] = v[start:stop].double().div_(norms[start:stop].unsqueeze(1))  # (rounded to fp32)
    return out


def _scanned_rows(rows: torch.Tensor, cosine: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the rows the fp32 scan reads: ``rows`` for ip, unit rows for cos; float64 norms of ``rows``;
    fp32 upper bounds of the scanned rows' norms, rounded up past fp32's rounding)."""
    cnorm = _native.norms64(rows).contiguous()
    scanned = _unit_rows(rows, cnorm) if cosine else rows
    bound = (_native.norms64(scanned) * (1.0 + 2.0 ** -20)).float()
    return scanned, cnorm, bound


def _dot_book(codebook: torch.Tensor, ids: Optional[torch.Tensor], cosine: bool):
    """(ids, the distinct fp32 rows where a copy else None, their float64 norms, the scanned rows'
    panels, fp32 upper bounds of the scanned rows' norms): cached per codebook (never the codebook)."""
    rows = _distinct_rows(codebook, ids)
    scanned, cnorm, bound = _scanned_rows(rows, cosine)
    return ids, (None if rows is codebook else rows), cnorm, _native.direct_pack(scanned), bound


def _distinct_rows(codebook: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The scanned fp32 rows: ``codebook`` itself where it is fp32 with unit column stride and ``ids`` is None."""
    rows = (codebook if ids is None else codebook.index_select(0, ids)).float()
    return rows if rows.shape[1] <= 1 or rows.stride(1) == 1 else rows.contiguous()
