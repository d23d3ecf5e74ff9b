"""The certified-exact CPU path of ``u2.nearest_grouped`` (and the plain scan it is built on).

At UniTok's shape (G = 8 sub-codebooks of K = 4096, chunks of d = 144) a query costs 8 small
GEMMs; one batched fp32 GEMM over every group per block of queries runs at the BLAS rate, as
FAISS's product-quantizer encoding does, and beats G separate FAISS searches on small batches
(FAISS runs well below its speed on calls of a few hundred queries). On CPUs whose int8 GEMM is
fast (AVX-512 VNNI: ``_nearest_cpu.choose_filter`` says "int8") u2.nearest's certified int8
filters run faster still, so there each group goes to u2.nearest's engine instead.

Certification: each (query, group) gets the smallest and second smallest fp32 objective and a
rigorous bound ``e`` on their rounding error. Where the two are more than 2e apart the fp32 winner
is the exact nearest codeword. The scan works on vectors centred on their group's codebook mean
(which leaves every argmin unchanged), so ``e``, proportional to the centred norms, stays small
on data far from the origin (image patches: every pixel positive), and leaves out later exact
copies of a codeword (they can only tie with the first, which wins). The other pairs (near ties)
keep as candidates the codewords whose fp32 objective lies within 2e of the
minimum -- the true nearest is always among them -- which are settled in float64 from the original
vectors with the lowest id among equal minima (``_certified``, u2.nearest's re-ranking). A pair with
more than CANDIDATE_CAP candidates (a mass of duplicates) is settled by the streaming float64
scan. Scores live one block at a time: at most SCORE_ELEMENTS floats, never N x K.
"""
from __future__ import annotations

import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch

from . import _certified, _dispatch, _nearest_cpu
from ._cache import per_tensor

#: fp32 scores (groups x queries x codewords) held at a time: 32 MiB
SCORE_ELEMENTS = 1 << 23
#: codewords scored per block; larger codebooks are scanned block by block with a running top 2
CODE_BLOCK = 8192
#: scores reduced per run by the two-step minimum of _top2 (divides CODE_BLOCK)
SUB_BLOCK = 128
#: smallest normal fp32 number: each product below it may lose up to this much to underflow
_FP32_TINY = 2.0 ** -126


class _Prepared(NamedTuple):
    """The codebooks as the scan multiplies them (see :func:`_prepared`)."""

    blocks: List[torch.Tensor]  # contiguous (G, d + 1, <= CODE_BLOCK) column blocks
    center: torch.Tensor  # (G, d) float64 subtracted from the codewords (and the l2 queries)
    norm_max: torch.Tensor  # (G,) float64 largest norm of a centred (stored) codeword
    column_ids: Optional[torch.Tensor]  # (G, K') codeword id of each column; None: column k is id k


def scan(x: torch.Tensor, codebooks: torch.Tensor, metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blocked batched matmul + argmin in the torch compute dtype (fp32, or float64 for float64
    inputs) on any device: the CUDA "torch" backend.

    x: (N, G, d), codebooks: (G, K, d). Returns ids (N, G) int64, dists (N, G) fp32.
    """
    dtype = _dispatch.torch_dtype(x, codebooks)
    ids, _, _, _, _ = _top2(x, _prepared(codebooks, metric, dtype), metric, dtype)
    return ids.t().contiguous(), _pair_distances(x, codebooks, ids.t(), metric)


def nearest_grouped_cpu(x: torch.Tensor, codebooks: torch.Tensor, metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest codeword per group on the CPU.

    x: (N, G, d) finite queries, codebooks: (G, K, d) finite codewords (inputs rescaled into the
    safe range by the caller). Returns ids (N, G) int64 and dists (N, G) fp32.
    """
    n, groups, d = x.shape
    if n == 0:
        return torch.empty((0, groups), dtype=torch.int64), torch.empty((0, groups), dtype=torch.float32)
    float64 = x.dtype == torch.float64 or codebooks.dtype == torch.float64
    if float64 or _nearest_cpu.choose_filter(n, codebooks.shape[1], d) == "int8":
        # float64: converting it to fp32 would add an error the bound does not cover. int8: where
        # this CPU's int8 GEMM is fast (AVX-512 VNNI), u2.nearest's certified int8 filters beat
        # one batched fp32 GEMM (1.5-2.2x FAISS PQ against 1.3-1.4x at UniTok's shape). Either
        # way u2.nearest's exact engine, group by group, on per-group copies its caches can key on.
        parts = per_tensor(codebooks, ("group_rows",), _group_rows)
        ids = torch.stack([_nearest_cpu.nearest_cpu(x[:, g].contiguous(), parts[g], metric)[0]
                           for g in range(groups)], dim=1)
        return ids, _pair_distances(x, codebooks, ids, metric)
    prep = _prepared(codebooks, metric, torch.float32)
    ids, first, second, x_norm, candidates = _top2(x, prep, metric, torch.float32, certify=True)
    if candidates is None:  # several score blocks: the uncertain pairs' candidates are rescanned
        bound = _rounding_bound(x_norm, prep, metric)  # (G, N) fp64
        pair_group, pair_row = ((second.double() - first.double()) <= 2.0 * bound).nonzero(as_tuple=True)
        window = first[pair_group, pair_row].double() + 2.0 * bound[pair_group, pair_row]
        candidates = _rescan(x, prep, pair_group, pair_row, window, metric)
    pair_group, pair_row, cand_pair, cand_col, crowded = candidates
    if pair_group.numel():
        ids[pair_group, pair_row] = settle(x, codebooks, pair_group, pair_row, cand_pair, cand_col, crowded, metric)
    ids = ids.t().contiguous()  # (N, G)
    return ids, _pair_distances(x, codebooks, ids, metric)


def _group_rows(codebooks: torch.Tensor) -> List[torch.Tensor]:
    """Contiguous copies of each group's codebook (G x (K, d)): u2.nearest caches its statistics
    per codebook tensor, and a fresh view per call would rebuild them every time (a view would
    also keep ``codebooks``, the cache's key, alive)."""
    size = codebooks.numel() * codebooks.element_size()
    if size >= _nearest_cpu.COPY_WARN_BYTES:
        warnings.warn(f"u2.nearest_grouped keeps a copy of this {tuple(codebooks.shape)} {codebooks.dtype} codebook "
                      f"({size / 2 ** 30:.2f} GiB, one contiguous block per group) for its exact CPU search, "
                      f"until the codebooks are freed or changed in place", UserWarning, stacklevel=5)
    return [codebooks[g].clone(memory_format=torch.contiguous_format) for g in range(codebooks.shape[0])]


def settle(x: torch.Tensor, codebooks: torch.Tensor, pair_group: torch.Tensor, pair_row: torch.Tensor,
           cand_pair: torch.Tensor, cand_col: torch.Tensor, crowded: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact ids of the (group, query) pairs the fp32 pass could not certify, from their
    candidates (the codewords whose fp32 objective lies within 2e of the pair's minimum): compared
    in float64 from the original vectors, ties to the lowest id; a pair with more than
    CANDIDATE_CAP candidates is settled by the streaming float64 scan of its group.

    x: (N, G, d), codebooks: (G, K, d); pair_group, pair_row: (P,) int64 pairs; cand_pair,
    cand_col: (C,) int64, candidate c is codeword cand_col[c] of pair cand_pair[c]; crowded: (P,)
    bool, the pairs whose candidates were dropped for passing the cap. Returns (P,) int64 ids.
    """
    n, groups, d = x.shape
    k = codebooks.shape[1]
    pairs = pair_group.numel()
    group = pair_group[cand_pair]
    obj, _ = _certified.pair_objective(x.reshape(-1, d), codebooks.reshape(-1, d), pair_row[cand_pair] * groups + group,
                                       group * k + cand_col, metric, dtype=torch.float64)
    best, _ = _certified.lowest_of_min(pairs, cand_pair, cand_col, obj)
    for g in pair_group[crowded].unique().tolist():
        which = (crowded & (pair_group == g)).nonzero().squeeze(1)
        best[which] = _nearest_cpu.exact_scan(x[pair_row[which], g], codebooks[g], metric)[0]
    return best


def _rescan(x: torch.Tensor, prep: _Prepared, pair_group: torch.Tensor, pair_row: torch.Tensor,
            window: torch.Tensor, metric: str):
    """(pair_group, pair_row, cand_pair, cand_col) of the given pairs: their fp32 objectives are
    computed again, group by group, and the codewords within ``window`` (float64) kept."""
    cand_pair, cand_col, crowded = [], [], torch.zeros(pair_group.numel(), dtype=torch.bool)
    k_padded = sum(block.shape[2] for block in prep.blocks)
    rows_per_chunk = max(1, SCORE_ELEMENTS // min(k_padded, CODE_BLOCK))
    for g in pair_group.unique().tolist():
        which = (pair_group == g).nonzero().squeeze(1)  # pairs of this group
        one = _Prepared([b[g:g + 1] for b in prep.blocks], prep.center[g:g + 1], prep.norm_max[g:g + 1], None)
        for start in range(0, which.numel(), rows_per_chunk):
            chunk = which[start:start + rows_per_chunk]
            queries = _queries(x[pair_row[chunk], g:g + 1], one, metric, torch.float32)  # (1, m, d + 1)
            limit = _fp32_window(window[chunk])
            rows, cols = [], []
            for b, block in enumerate(one.blocks):
                r, c = (torch.bmm(queries, block)[0] <= limit[:, None]).nonzero(as_tuple=True)
                rows.append(r)
                cols.append(c + b * CODE_BLOCK if prep.column_ids is None else prep.column_ids[g, c + b * CODE_BLOCK])
            r, c, many = _capped(torch.cat(rows), torch.cat(cols), chunk.numel())
            cand_pair.append(chunk[r])
            cand_col.append(c)
            crowded[chunk] = many
    empty = torch.empty(0, dtype=torch.int64)
    return (pair_group, pair_row, torch.cat(cand_pair) if cand_pair else empty,
            torch.cat(cand_col) if cand_col else empty, crowded)


def _capped(cand_pair: torch.Tensor, cand_col: torch.Tensor, pairs: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates of ``pairs`` pairs (local ids 0 .. pairs - 1) without those of pairs holding
    more than CANDIDATE_CAP (kept: the streaming float64 scan settles those), and their (pairs,)
    crowded mask: a mass of near-equidistant codewords never piles up N x G x K candidates."""
    crowded = torch.bincount(cand_pair, minlength=pairs) > _certified.CANDIDATE_CAP
    keep = ~crowded[cand_pair]
    return cand_pair[keep], cand_col[keep], crowded


def _fp32_window(window: torch.Tensor) -> torch.Tensor:
    """The float64 ``window`` in fp32, rounded up: it keeps every score the float64 one keeps
    (the +inf scores of padding and exact copies stay out)."""
    return torch.nextafter(window.float(), torch.tensor(float("inf")))


def _prepared(codebooks: torch.Tensor, metric: str, dtype: torch.dtype) -> _Prepared:
    """The codebooks as the scan multiplies them, cached per codebooks version.

    Column j of group g of the (G, d + 1, K') matrix holds one distinct codeword (on the CPU later
    exact copies are left out: a copy can only tie with its first occurrence, which wins the tie;
    ``column_ids`` maps columns back to ids, in increasing order, so the lowest column is the
    lowest id) minus its group's mean (a unit codeword for "cos", normalised in float64), rounded
    to ``dtype``, followed by its additive term: ||c'||^2 for l2, 0 for ip / cos. K' is the
    largest distinct count rounded up to a multiple of SUB_BLOCK; the padding columns are zero
    codewords with term +inf (never chosen). With the queries as [-2x', 1] (l2) or [-x, 1], one
    plain batched GEMM yields the objective: no separate pass adds the term (a broadcast
    ``baddbmm`` input costs a full copy of the scores first). Centring changes no argmin: for l2
    both sides move, for ip / cos the query's <x, mean> is the same for every code.
    """
    def build(c: torch.Tensor) -> _Prepared:
        groups, k, d = c.shape
        c64 = c.double()
        if metric == "cos":
            c64 = c64 / c64.norm(dim=-1, keepdim=True)
        # any common shift keeps the argmin: the mean rounded to the scan dtype, so that a query
        # in that dtype is centred with one rounding (x - center is exact before it is rounded)
        center = c64.mean(dim=1).to(dtype).double()  # (G, d)
        stored = (c64 - center[:, None]).to(dtype)  # what the GEMM multiplies
        distinct = [_nearest_cpu.first_of_duplicates(c[g]) if c.device.type == "cpu" else None for g in range(groups)]
        counts = [k if ids is None else ids.numel() for ids in distinct]
        padded = -(-max(counts) // SUB_BLOCK) * SUB_BLOCK
        c_t = torch.zeros((groups, d + 1, padded), dtype=dtype, device=c.device)
        c_t[:, d] = float("inf")
        column_ids = None
        if any(ids is not None for ids in distinct):
            column_ids = torch.zeros((groups, padded), dtype=torch.int64, device=c.device)
        for g, ids in enumerate(distinct):
            rows = stored[g] if ids is None else stored[g, ids]
            c_t[g, :d, :counts[g]] = rows.t()
            c_t[g, d, :counts[g]] = rows.double().pow(2).sum(dim=-1) if metric == "l2" else 0.0
            if column_ids is not None:
                column_ids[g, :counts[g]] = torch.arange(k, device=c.device) if ids is None else ids
        blocks = [c_t[:, :, k0:k0 + CODE_BLOCK].contiguous() for k0 in range(0, padded, CODE_BLOCK)]
        return _Prepared(blocks, center, stored.double().norm(dim=-1).amax(dim=1), column_ids)

    return per_tensor(codebooks, ("grouped_scan", metric, dtype), build)


def _queries(x: torch.Tensor, prep: _Prepared, metric: str, dtype: torch.dtype) -> torch.Tensor:
    """(G, n, d + 1) contiguous [-2x', 1] (l2: x' = x - the group's mean, in float64) or [-x, 1]
    (ip; cos on unit rows normalised in float64) in ``dtype``, for x (n, G, d)."""
    n, groups, d = x.shape
    out = torch.empty((groups, n, d + 1), dtype=dtype, device=x.device)
    body = out[:, :, :d]
    if metric == "l2":
        # x and the center are both in ``dtype`` (float64 inputs: float64): one rounding
        torch.sub(x.transpose(0, 1).to(dtype), prep.center[:, None].to(dtype), out=body)
        body.mul_(-2.0)  # exact scaling
    elif metric == "cos":
        x = x.double()
        torch.mul((x / x.norm(dim=-1, keepdim=True)).transpose(0, 1), -1.0, out=body)
    else:
        torch.mul(x.transpose(0, 1), -1.0, out=body)
    out[:, :, d] = 1.0
    return out


def _top2(x: torch.Tensor, prep: _Prepared, metric: str, dtype: torch.dtype, certify: bool = False):
    """Per (group, query): argmin, smallest and second smallest objective of the scan, where the
    objective is ||c'||^2 - 2<x', c'> (l2, centred vectors) or -<x, c'> (ip, and cos on unit rows).

    The minimum is found in two steps, since a full argmin over the scores costs 3-4x a min
    (torch's argmin does not vectorise here): the minimum of every run of SUB_BLOCK scores, then
    the argmin among those minima and the argmin inside the winning run, which also give the
    second smallest value (the smallest of the other runs' minima and of the winning run's rest).

    x: (N, G, d). Returns ids (G, N) int64, first (G, N), second (G, N) in ``dtype``, the lowest
    index winning a tie (first minimum of each argmin, blocks in order), and (G, N) float64 upper
    bounds on the norms of the query vectors the scan multiplied (centred for l2, unit for cos).
    With ``certify`` and a codebook of one score block, also the candidates of the pairs whose
    top two lie within 2e (``_rounding_bound``), read from the scores while they are at hand:
    (pair_group, pair_row, cand_pair, cand_col) as ``settle`` takes them; otherwise None.
    """
    n, groups, d = x.shape
    x_norm = torch.empty((groups, n), dtype=torch.float64, device=x.device)
    # a d-term fp32 sum of squares and its square root, rounded up: within (d + 4) u relative
    inflate = 1.0 + 1.01 * (d + 4) * (_certified.U32 if dtype == torch.float32 else _certified.U64)
    rows = max(1, SCORE_ELEMENTS // (groups * prep.blocks[0].shape[2]))
    ids = torch.zeros((groups, n), dtype=torch.int64, device=x.device)
    first = torch.full((groups, n), float("inf"), dtype=dtype, device=x.device)
    second = torch.full((groups, n), float("inf"), dtype=dtype, device=x.device)
    buffers = {}  # (rows, columns) -> scores buffer: at most four shapes per call
    collect = certify and len(prep.blocks) == 1
    found = [[], [], [], [], []]  # pair_group, pair_row, cand_pair, cand_col, crowded
    pairs = 0
    for start in range(0, n, rows):
        xs = _queries(x[start:start + rows], prep, metric, dtype)  # (G, r, d + 1)
        r = xs.shape[1]
        scale = 0.5 if metric == "l2" else 1.0  # the queries are stored as -2 x' or -x
        x_norm[:, start:start + r] = torch.linalg.vector_norm(xs[:, :, :d], dim=-1).double() * (scale * inflate)
        for b, c_block in enumerate(prep.blocks):
            k0, cols = b * CODE_BLOCK, c_block.shape[2]
            out = buffers.get((r, cols))
            if out is None:
                out = buffers[(r, cols)] = torch.empty((groups, r, cols), dtype=dtype, device=x.device)
            torch.bmm(xs, c_block, out=out)
            n_runs = cols // SUB_BLOCK
            runs = out.view(groups * r * n_runs, SUB_BLOCK)
            run_min = runs.amin(dim=-1).view(groups, r, n_runs)
            best_run = run_min.argmin(dim=-1, keepdim=True)  # (G, r, 1)
            v1 = run_min.gather(-1, best_run).squeeze(-1)
            which = torch.arange(groups * r, device=x.device) * n_runs + best_run.reshape(-1)
            inner = runs.index_select(0, which)  # (G * r, SUB) copy of each winning run
            pos = inner.argmin(dim=-1, keepdim=True)
            v2 = torch.minimum(inner.scatter_(-1, pos, float("inf")).amin(dim=-1).view(groups, r),
                               run_min.scatter_(-1, best_run, float("inf")).amin(dim=-1))
            arg = best_run.squeeze(-1) * SUB_BLOCK + pos.view(groups, r) + k0
            f, s, i = first[:, start:start + r], second[:, start:start + r], ids[:, start:start + r]
            better = v1 < f  # strictly: an equal value in a later block keeps the lower id
            s.copy_(torch.where(better, torch.minimum(f, v2), torch.minimum(s, v1)))
            i.copy_(torch.where(better, arg, i))
            f.copy_(torch.minimum(f, v1))
            if collect:
                bound = _rounding_bound(x_norm[:, start:start + r], prep, metric)  # (G, r)
                unsure_group, unsure_row = ((v2.double() - v1.double()) <= 2.0 * bound).nonzero(as_tuple=True)
                if unsure_group.numel():
                    limit = _fp32_window(v1[unsure_group, unsure_row].double() + 2.0 * bound[unsure_group, unsure_row])
                    # only runs whose minimum is within the window hold candidates (the winning
                    # run's minimum was overwritten above: it always qualifies)
                    hit = run_min[unsure_group, unsure_row] <= limit[:, None]  # (P, runs)
                    hit.scatter_(1, best_run[unsure_group, unsure_row], True)
                    pair_of, run_of = hit.nonzero(as_tuple=True)
                    segments = runs.index_select(0, (unsure_group[pair_of] * r + unsure_row[pair_of]) * n_runs + run_of)
                    seg, pos = (segments <= limit[pair_of, None]).nonzero(as_tuple=True)
                    cand, col, crowded = _capped(pair_of[seg], run_of[seg] * SUB_BLOCK + pos, unsure_group.numel())
                    found[0].append(unsure_group)
                    found[1].append(unsure_row + start)
                    found[2].append(cand + pairs)
                    found[3].append(col)
                    found[4].append(crowded)
                    pairs += unsure_group.numel()
    if prep.column_ids is not None:
        ids = prep.column_ids.gather(1, ids)
    if not collect:
        return ids, first, second, x_norm, None
    empty = torch.empty(0, dtype=torch.int64, device=x.device)
    pair_group, pair_row, cand_pair, cand_col = (torch.cat(f) if f else empty for f in found[:4])
    crowded = torch.cat(found[4]) if found[4] else empty.bool()
    if prep.column_ids is not None:
        cand_col = prep.column_ids[pair_group[cand_pair], cand_col]
    return ids, first, second, x_norm, (pair_group, pair_row, cand_pair, cand_col, crowded)


def _rounding_bound(x_norm: torch.Tensor, prep: _Prepared, metric: str) -> torch.Tensor:
    """(G, N) float64 bound on the fp32 error of every objective of a (query, group) in the scan.

    The GEMM sums d + 1 products; its error is within gamma = (d + 5) u (u = 2^-24) times the sum
    of their magnitudes whatever the summation order. With X the norm of the query the scan
    multiplied (``x_norm`` from ``_top2``: centred for l2, unit for cos) and C the group's largest
    stored codeword norm: l2 (products -2 x'_i c'_i and 1 * ||c'||^2): gamma (2 X C + C^2), plus
    u C^2 for ||c'||^2 rounded to fp32, plus 2.01 u (C^2 + 2 X C) because x' and c' are the centred
    vectors rounded to fp32 (each entry within u); ip: (gamma + 2.01 u) X C (rounded codewords);
    cos: (gamma (1 + u) + 2.01 u) C (rounded unit query and centred codeword). Everything times
    1.01, plus d + 1 products that may underflow.
    """
    d = prep.center.shape[1]
    u = _certified.U32
    gamma = _certified.sum_rounding(d + 1, u)
    c = prep.norm_max[:, None]  # (G, 1)
    tiny = (d + 5) * _FP32_TINY
    if metric == "cos":
        value = ((gamma * (1.0 + u) + 2.01 * u) * c).expand_as(x_norm)
    elif metric == "l2":
        value = gamma * (2.0 * x_norm * c + c * c) + u * c * c + 2.01 * u * (c * c + 2.0 * x_norm * c)
    else:
        value = (gamma + 2.01 * u) * x_norm * c
    return 1.01 * (value + tiny)


def _pair_distances(x: torch.Tensor, codebooks: torch.Tensor, ids: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, G) fp32 distances of the chosen pairs, computed in float64 from the original vectors
    (the same arithmetic as ``u2.nearest``'s re-ranking). ids: (N, G)."""
    n, groups, d = x.shape
    k = codebooks.shape[1]
    rows = torch.arange(n * groups, device=x.device)
    cols = (ids + torch.arange(groups, device=x.device) * k).reshape(-1)  # rows of the (G * K, d) codebooks
    obj, _ = _certified.pair_objective(x.reshape(-1, d), codebooks.reshape(-1, d), rows, cols, metric,
                                       dtype=torch.float64)
    dists = obj if metric != "cos" else 1.0 + obj
    return dists.float().reshape(n, groups)
