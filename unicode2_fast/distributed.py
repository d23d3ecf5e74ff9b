"""``u2.distributed``: the codebook sharded by rows across the ranks of a torch.distributed job.

At K = 500K, d = 1152 one codebook is 2.3 GB in fp32: a rank can hold a row range of it instead
(FAISS IndexShards, Megatron's vocab-parallel tables). Every function here moves tensors through
torch.distributed collectives only (NCCL on GPUs, gloo on CPUs), never pickled objects, and checks
its inputs on every rank *before* the data collective: bad input on one rank raises a clear error
on every rank (naming the rank) instead of leaving the others blocked in a collective.

    ids, dists = u2.distributed.nearest(x, local_codebook, offset)   # same x on every rank
    emb = u2.distributed.VocabParallelEmbedding(K, d, weight=c2)       # this rank keeps its rows
    rows = emb(ids)                                                    # each rank its own batch's ids
    loss = u2.distributed.large_vocab_cross_entropy(hidden, local_head, targets, offset)

Each rank searches its shard with ``u2.nearest`` (exact, ties to the lowest index), recomputes the
chosen codeword's objective in float64 from the vectors (the arithmetic u2.nearest re-ranks
with), and one all-gather of (objective, global id) pairs -- 16 bytes per query per rank --
lets every rank pick the same global argmin, ties to the lowest global id: the result of
``u2.nearest`` on the whole codebook.

``VocabParallelEmbedding`` shards the trainable C2 table the same way: each rank holds its row
range and that range's optimizer state (``u2.SparseRowAdamW`` on ``emb.weight``), lookups of any
rank's ids are served by their owners, and each owner receives the row-sparse gradient of its
own rows only -- the updates of one process training on the whole table.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import safetensors
import safetensors.torch
import torch
from torch import nn

from . import _certified
from ._checks import check_finite, check_float, check_matrix, check_no_zero_rows, flatten_queries, to_tensor
from ._io import atomic_write, atomic_write_text, load_json
from .cross_entropy import cross_entropy_backward_torch, lse_and_target_torch
from .embedding import check_indices, embedding_backward_torch
from .nearest import METRICS
from .nearest import nearest as _search_shard

#: int64 slots of the status every rank shares before the data collective
_STATUS = ("ok", "n", "d", "offset", "k_local", "dtype")
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.int64: 4, torch.int32: 5}


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("u2.distributed needs an initialised process group (torch.distributed.init_process_group)")
    return dist


def _collective_device(dist, group) -> torch.device:
    """Where the collectives' tensors live: CUDA for NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor: torch.Tensor, dist, group) -> torch.Tensor:
    """(world, *tensor.shape) of every rank's ``tensor`` (same shape and dtype on every rank)."""
    device = _collective_device(dist, group)
    local = tensor.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts)


def check_all(error: Optional[BaseException], group: Any = None, what: str = "input") -> None:
    """Raise on every rank when ``error`` is not None on any rank (one small all-gather).

    The rank that failed re-raises its own error; the others raise a RuntimeError that names it,
    so no rank is left waiting in the next collective.
    """
    dist = _dist()
    flags = _all_gather(torch.tensor([0 if error is None else 1], dtype=torch.int64), dist, group)[:, 0]
    if error is not None:
        raise error
    failed = flags.nonzero().squeeze(1).tolist()
    if failed:
        raise RuntimeError(f"u2.distributed: rank(s) {failed} failed the {what} checks; see their errors")


def nearest(
    x: Any,
    local_codebook: Any,
    offset: int,
    group: Any = None,
    metric: str = "l2",
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest codeword over a codebook sharded by rows across the ranks of ``group``.

    Args:
        x: (..., d) queries, the same on every rank (checked), as for ``u2.nearest``.
        local_codebook: (K_r, d) rows ``offset .. offset + K_r`` of the global codebook held by
            this rank (a tensor or a :class:`u2.Codebook`). Shards may be uneven, but together
            they must tile [0, K) without gaps or overlaps (checked).
        offset: the global id of this rank's first row.
        group: the process group (default: the world).
        metric, backend: as ``u2.nearest`` (the local search).

    Returns:
        ``(ids, dists)`` identical on every rank: global int64 ids and float32 dists of shape
        x.shape[:-1]; the same as ``u2.nearest(x, full_codebook, metric)``: ties across shards go
        to the lowest global id.

    Raises (on every rank of the group, whichever rank the problem is on):
        ValueError / TypeError: bad input as for ``u2.nearest``, queries that differ between
        ranks, shards that do not tile [0, K), different d or dtypes across ranks.
        RuntimeError: no initialised process group.
    """
    dist = _dist()
    rank = dist.get_rank(group)
    status = torch.zeros(len(_STATUS), dtype=torch.int64)
    error: Optional[BaseException] = None
    try:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        xt = to_tensor(x, "x").detach()
        check_float(xt, "x")
        cb = local_codebook.vectors if hasattr(local_codebook, "vectors") else to_tensor(local_codebook, "local_codebook")
        check_matrix(cb, "local_codebook")
        check_float(cb, "local_codebook")
        if cb.shape[0] == 0:
            raise ValueError(f"rank {rank}: empty local_codebook; give every rank at least one row")
        check_finite(cb, "local_codebook")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int (the global id of this rank's first row), got {offset!r}")
        x2d, lead = flatten_queries(xt, cb.shape[1])
        check_finite(x2d, "x")
        status[:] = torch.tensor([1, x2d.shape[0], cb.shape[1], offset, cb.shape[0], _DTYPE_CODES[cb.dtype]])
    except (TypeError, ValueError) as exc:
        error = exc
    check_all(error, group)

    everyone = _all_gather(status, dist, group).cpu()  # (world, slots)
    n, d, dtypes = everyone[:, 1], everyone[:, 2], everyone[:, 5]
    problems = []
    if bool((n != n[0]).any()) or bool((d != d[0]).any()):
        problems.append(f"every rank needs the same queries: (N, d) per rank {list(zip(n.tolist(), d.tolist()))}")
    if bool((dtypes != dtypes[0]).any()):
        names = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}
        problems.append(f"the shards must share one dtype, got {[names[int(c)] for c in dtypes]}")
    tiling = _tiling_problem(everyone[:, 3:5], "codebook")
    if tiling:
        problems.append(tiling)
    if problems:
        raise ValueError("u2.distributed.nearest: " + "; ".join(problems))
    _check_same([x2d], ["x"], dist, group)

    error = None
    packed = torch.zeros((x2d.shape[0] + 1, 2), dtype=torch.float64)
    try:
        local_ids, _ = _search_shard(x2d, cb, metric, backend)
        local_ids = torch.as_tensor(local_ids, device=x2d.device)
        objective = _objective64(x2d, cb, local_ids, metric)
        packed[:-1, 0] = objective.cpu()
        packed[:-1, 1] = (local_ids.cpu() + offset).view(torch.float64)  # int64 bits, reinterpreted
        packed[-1, 0] = 1.0  # this rank's search succeeded
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    gathered = _all_gather(packed, dist, group).cpu()  # (world, N + 1, 2)
    if error is not None:
        raise error
    failed = (gathered[:, -1, 0] != 1.0).nonzero().squeeze(1).tolist()
    if failed:
        raise RuntimeError(f"u2.distributed.nearest: the local search failed on rank(s) {failed}; see their errors")
    objectives = gathered[:, :-1, 0]  # (world, N)
    ids = gathered[:, :-1, 1].contiguous().view(torch.int64)
    best = objectives.min(dim=0).values
    sentinel = torch.iinfo(torch.int64).max
    best_ids = torch.where(objectives == best, ids, torch.full_like(ids, sentinel)).min(dim=0).values
    dists = best if metric != "cos" else 1.0 + best
    return best_ids.to(xt.device).reshape(lead), dists.float().to(xt.device).reshape(lead)


def nearest_data_parallel(x: Any, codebook: Any, group: Any = None, metric: str = "l2", backend: str = "auto",
                          gather: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest codeword, data parallel: each rank its own queries (any count, also 0), the
    whole codebook on every rank (checked to be the same, bit for bit).

    Returns this rank's ``(ids, dists)`` as ``u2.nearest(x, codebook)``; with ``gather`` every
    rank gets the whole job's, its queries concatenated in rank order (two all-gathers of 8 and 4
    bytes per query: the ids and the float32 dists). Bad input on any rank raises on every rank.
    """
    dist = _dist()
    error = None
    try:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        xt = to_tensor(x, "x").detach()
        check_float(xt, "x")
        cb = codebook.vectors if hasattr(codebook, "vectors") else to_tensor(codebook, "codebook")
        check_matrix(cb, "codebook")
        x2d, lead = flatten_queries(xt, cb.shape[1])
        ids, dists = (_search_shard(x2d, cb, metric=metric, backend=backend) if x2d.shape[0]
                      else (torch.empty(0, dtype=torch.int64), torch.empty(0)))
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    check_all(error, group, "search")
    _check_same([cb], ["codebook"], dist, group)
    if not gather:
        return ids.reshape(lead), dists.reshape(lead)
    all_ids, _ = all_gather_varlen(torch.as_tensor(ids).reshape(-1), group)
    all_dists, _ = all_gather_varlen(torch.as_tensor(dists).reshape(-1).float(), group)
    return all_ids, all_dists


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """(2,) int64 hash of the bits and dtype of ``x`` (N, d): integer sums wrap but do not depend
    on the order of summation, so equal tensors hash equally whatever the thread count."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
    bits = x.contiguous().view(ints).long()
    generator = torch.Generator().manual_seed(0x5EED)
    columns = torch.randint(-(2 ** 62), 2 ** 62, (x.shape[1],), dtype=torch.int64, generator=generator).to(x.device)
    rows = torch.arange(1, x.shape[0] + 1, dtype=torch.int64, device=x.device) * 1_000_003
    per_row = (bits * columns).sum(dim=1)
    return torch.stack([(per_row * rows).sum(), torch.tensor(_DTYPE_CODES[x.dtype], device=x.device)]).cpu()


def _objective64(x: torch.Tensor, codebook: torch.Tensor, ids: torch.Tensor, metric: str) -> torch.Tensor:
    """(N,) float64 objective (squared L2, -<x, c>, -cos) of each query's chosen codeword."""
    rows = torch.arange(x.shape[0], device=x.device)
    objective, _ = _certified.pair_objective(x, codebook, rows, ids, metric, dtype=torch.float64)
    return objective


def all_gather_varlen(tensor: torch.Tensor, group: Any = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``tensor`` (m_r, ...) concatenated in rank order, and the (world,) counts m_r.

    Two collectives: the counts, then the rows padded to the largest count (no pickling). The
    trailing shape and the dtype must be the same on every rank.
    """
    dist = _dist()
    counts = _all_gather(torch.tensor([tensor.shape[0]], dtype=torch.int64), dist, group)[:, 0].cpu()
    largest = int(counts.max())
    device = _collective_device(dist, group)
    padded = torch.zeros((largest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[:tensor.shape[0]] = tensor.to(device)
    gathered = _all_gather(padded, dist, group)  # (world, largest, ...)
    keep = torch.cat([torch.arange(int(c), device=device) + r * largest for r, c in enumerate(counts.tolist())])
    return gathered.reshape(-1, *tensor.shape[1:]).index_select(0, keep).to(tensor.device), counts


def all_gather_rows(indices: torch.Tensor, values: torch.Tensor, group: Any = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's row-sparse tensor rows, concatenated in rank order, through tensor collectives.

    Args:
        indices: (m_r,) int64 row ids of this rank (m_r may differ between ranks).
        values: (m_r, *row_shape) rows, the same row shape and dtype on every rank.

    Returns:
        (sum m_r,) indices and (sum m_r, *row_shape) values (see ``all_gather_varlen``).
    """
    if indices.shape[0] != values.shape[0]:
        raise ValueError(f"{indices.shape[0]} indices for {values.shape[0]} rows")
    out_ids, _ = all_gather_varlen(indices, group)
    out_rows, _ = all_gather_varlen(values, group)
    return out_ids, out_rows


class _GatherBatch(torch.autograd.Function):
    """Every rank's rows concatenated in rank order; backward: this rank's rows of the gradient."""

    @staticmethod
    def forward(ctx, x, group, grad_scale):
        dist = _dist()
        rows, counts = all_gather_varlen(x.contiguous(), group)
        ctx.start = int(counts[:dist.get_rank(group)].sum())
        ctx.n, ctx.grad_scale = x.shape[0], grad_scale
        return rows

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start:ctx.start + ctx.n] * ctx.grad_scale, None, None


def gather_batch(x: torch.Tensor, group: Any = None, grad_scale: Optional[float] = None) -> torch.Tensor:
    """Every rank's rows of ``x`` (m_r, ...) concatenated in rank order, differentiable.

    For a loss that every rank computes identically over the whole job's batch (InfoNCE over all
    pairs, L_GEN against a vocab-parallel head): each rank's backward gets the gradient of that
    loss for its own rows, times ``grad_scale`` -- the world size by default, so that the usual
    data-parallel average of the replicated parameters' gradients is the gradient of the global
    loss itself. A float tensor for the gradient; integer rows (targets) gather without one.
    """
    dist = _dist()
    scale = float(dist.get_world_size(group)) if grad_scale is None else float(grad_scale)
    if not x.is_floating_point():
        return all_gather_varlen(x, group)[0]
    return _GatherBatch.apply(x, group, scale)


class _VocabParallelLookup(torch.autograd.Function):
    """weight rows for every rank's ids, the table sharded by rows (see VocabParallelEmbedding)."""

    @staticmethod
    def forward(ctx, weight, ids, offset, num_embeddings, group, grad_scale):
        # weight: (K_r, d) this rank's rows offset .. offset + K_r; ids: (n,) this rank's global ids
        dist = _dist()
        rank = dist.get_rank(group)
        all_ids, counts = all_gather_varlen(ids, group)  # (T,) every rank's ids, in rank order
        owned = (all_ids >= offset) & (all_ids < offset + weight.shape[0])
        device = _collective_device(dist, group)
        rows = torch.zeros((all_ids.shape[0], weight.shape[1]), dtype=weight.dtype, device=device)
        rows[owned.to(device)] = weight.detach()[all_ids[owned] - offset].to(device)
        dist.all_reduce(rows, group=group)  # each row has exactly one owner: the sum is that row
        start = int(counts[:rank].sum())
        ctx.save_for_backward(all_ids, owned)
        ctx.offset, ctx.group, ctx.grad_scale, ctx.weight_shape = offset, group, grad_scale, weight.shape
        return rows[start:start + ids.shape[0]].to(weight.device)

    @staticmethod
    def backward(ctx, grad_rows):
        all_ids, owned = ctx.saved_tensors
        grads, _ = all_gather_varlen(grad_rows.contiguous(), ctx.group)  # (T, d): every rank's rows
        local_ids = all_ids[owned] - ctx.offset
        unique_ids, sums = embedding_backward_torch(grads[owned] * ctx.grad_scale, local_ids)
        grad_weight = torch.sparse_coo_tensor(unique_ids.unsqueeze(0), sums, ctx.weight_shape,
                                              is_coalesced=True)
        return grad_weight, None, None, None, None, None


class VocabParallelEmbedding(nn.Module):
    """A (K, d) embedding table sharded by rows across the ranks of ``group`` (Megatron's
    VocabParallelEmbedding for data-parallel batches): this rank holds rows
    ``offset .. offset + K_r`` as ``self.weight`` and only their optimizer state.

    Forward: ids (...) of this rank's batch -> (..., d) rows, wherever they live. Every rank's ids
    are all-gathered, each owner fills its rows, and one all-reduce gives every rank its rows
    (4 d bytes per id of the whole job, plus the ids). Backward: every rank's output gradient is
    all-gathered and each owner keeps a row-sparse gradient of its own rows (coalesced COO, as
    ``u2.gathered_embedding``), times ``grad_scale`` -- 1 / world by default, the average that
    data-parallel training of per-rank mean losses takes -- so ``u2.SparseRowAdamW`` on
    ``self.weight`` updates exactly the rows a single process would. All ranks must run the same
    number of forward / backward calls (collectives).

    Args:
        num_embeddings: K. embedding_dim: d.
        weight: optional (K, d) full initial table (identical on every rank); this rank copies its
            rows. Default: N(0, 1) rows drawn from a generator seeded by ``seed`` (the same table
            whatever the world size).
        group: process group (default: the world). grad_scale: None (1 / world) or a float.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, weight: Any = None, group: Any = None,
                 grad_scale: Optional[float] = None, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        dist = _dist()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        start, stop = shard_bounds(num_embeddings, world)[rank]
        self.offset = start
        if weight is None:
            table = torch.randn(num_embeddings, embedding_dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)
            local = table[start:stop].clone()
        else:
            table = to_tensor(weight, "weight").detach()
            if tuple(table.shape) != (num_embeddings, embedding_dim):
                raise ValueError(f"weight has shape {tuple(table.shape)}, expected ({num_embeddings}, {embedding_dim})")
            local = table[start:stop].to(dtype, copy=True)
        self.weight = nn.Parameter(local)
        self.grad_scale = 1.0 / world if grad_scale is None else float(grad_scale)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"rows={self.offset}..{self.offset + self.weight.shape[0]}")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., d) rows of the int ``ids`` (...) of this rank (any ids in [0, K), checked on every rank)."""
        error = None
        try:
            if not isinstance(ids, torch.Tensor):
                raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
            check_indices(ids, self.num_embeddings)
        except (TypeError, ValueError) as exc:
            error = exc
        check_all(error, self.group, "ids")
        flat = ids.reshape(-1).long()
        rows = _VocabParallelLookup.apply(self.weight, flat, self.offset, self.num_embeddings, self.group,
                                          self.grad_scale)
        return rows.reshape(*ids.shape, self.embedding_dim)

    @classmethod
    def from_sharded(cls, directory: Any, group: Any = None, name: str = "weight",
                     grad_scale: Optional[float] = None) -> "VocabParallelEmbedding":
        """The table saved by ``save_sharded({name: emb.weight, ...}, emb.offset)`` under any world
        size, resharded for this group: each rank reads only its own rows."""
        dist = _dist()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        header = load_sharded(directory, 0, 0, [name])[name]
        total = _checkpoint_rows(directory)
        start, stop = shard_bounds(total, world)[rank]
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.num_embeddings, module.embedding_dim, module.group, module.offset = total, header.shape[1], group, start
        module.weight = nn.Parameter(load_sharded(directory, start, stop, [name])[name])
        module.grad_scale = 1.0 / world if grad_scale is None else float(grad_scale)
        return module

    def full_weight(self) -> torch.Tensor:
        """(K, d) the whole table on every rank (an all-gather of the shards: for checkpoints, tests)."""
        rows, _ = all_gather_varlen(self.weight.detach(), self.group)
        return rows


def _tiling_problem(spans: torch.Tensor, what: str) -> Optional[str]:
    """Why the ranks' (offset, rows) ``spans`` (world, 2) do not tile [0, K), or None when they do."""
    order = torch.argsort(spans[:, 0])
    starts, sizes = spans[order, 0], spans[order, 1]
    if int(starts[0]) == 0 and not bool((starts[1:] != starts[:-1] + sizes[:-1]).any()):
        return None
    bounds = [(int(s), int(s + k)) for s, k in zip(starts, sizes)]
    return f"the {what} shards must tile [0, K) without gaps or overlaps; rows per rank (sorted): {bounds}"


def _check_tiling(offset: int, rows: int, dist, group, what: str) -> int:
    """Raise (on every rank) unless the ranks' (offset, rows) tile [0, K); returns K."""
    spans = _all_gather(torch.tensor([offset, rows], dtype=torch.int64), dist, group).cpu()
    problem = _tiling_problem(spans, what)
    if problem:
        raise ValueError(f"u2.distributed: {problem}")
    return int(spans[:, 1].sum())


def _check_same(tensors: Sequence[torch.Tensor], names: Sequence[str], dist, group) -> None:
    """Raise (on every rank) unless every tensor is bitwise the same on every rank."""
    prints = _all_gather(torch.cat([_fingerprint(t.reshape(t.shape[0], math.prod(t.shape[1:]))) for t in tensors]),
                         dist, group).cpu()
    for i, name in enumerate(names):
        if not bool((prints[:, 2 * i:2 * i + 2] == prints[0, 2 * i:2 * i + 2]).all()):
            raise ValueError(f"u2.distributed: {name} differs between ranks; every rank must pass the same {name}")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy over a classifier sharded by rows (see large_vocab_cross_entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, offset, group, chunk_size):
        # hidden: (N, h) the same on every rank; weight: (K_r, h) rows offset .. offset + K_r of the
        # classifier; targets: (N,) global ids. Local ids, -1 where the target is another rank's.
        dist = _dist()
        owned = (targets >= offset) & (targets < offset + weight.shape[0])
        local_targets = torch.where(owned, targets - offset, torch.full_like(targets, -1))
        lse, target_logit = lse_and_target_torch(hidden, weight, local_targets, bias, chunk_size)
        everyone = _all_gather(torch.stack([lse, target_logit]), dist, group)  # (world, 2, N)
        lse = torch.logsumexp(everyone[:, 0], dim=0).to(hidden.device)  # the log-sum-exp of all K logits
        target_logit = everyone[:, 1].sum(dim=0).to(hidden.device)  # only the owner's entry is nonzero
        ctx.save_for_backward(hidden, weight, bias, local_targets, lse)
        ctx.group, ctx.chunk_size = group, chunk_size
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, bias, local_targets, lse = ctx.saved_tensors
        dist = _dist()
        grad_hidden, grad_weight, grad_bias = cross_entropy_backward_torch(
            grad_rows, hidden, weight, local_targets, lse, bias, ctx.chunk_size,
            need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1],
            need_bias=bias is not None and ctx.needs_input_grad[2])
        if grad_hidden is not None:
            # every shard's part of d loss / d hidden, summed: the same full gradient on every rank
            device = _collective_device(dist, ctx.group)
            summed = grad_hidden.to(device)
            dist.all_reduce(summed, group=ctx.group)
            grad_hidden = summed.to(hidden.device)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def large_vocab_cross_entropy(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    targets: torch.Tensor,
    offset: int,
    group: Any = None,
    *,
    local_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Cross-entropy over K classes whose classifier is sharded by rows across the ranks (L_GEN
    with the visual head split: cut-cross-entropy's VocabParallelOptions, Megatron's
    vocab_parallel_cross_entropy). Never holds N x K, nor N x K_r, logits on a rank.

    Each rank computes, chunk by chunk, the log-sum-exp of its K_r logits per row and the target
    logit where it owns the target; one all-gather of those 2 N floats gives every rank the
    global log-sum-exp and target logit, so every rank gets the same loss. Backward: each rank its
    shard's weight (and bias) gradient, and the hidden-state gradient summed over the ranks with one
    all-reduce (N x h floats): the same on every rank.

    Args:
        hidden: (N, h) hidden states, the same on every rank (checked).
        local_weight: (K_r, h) rows ``offset .. offset + K_r`` of the (K, h) classifier; together
            the ranks' shards tile [0, K) (checked).
        targets: (N,) int64 global class ids in [0, K), or ignore_index; the same on every rank.
        offset: the global id of this rank's first row. local_bias: optional (K_r,).
        ignore_index, reduction ("mean" | "sum" | "none"), chunk_size: as
            ``u2.large_vocab_cross_entropy``.

    Returns:
        The loss (0-dim, or (N,) for "none", 0 at ignored rows), identical on every rank.

    Raises (on every rank): ValueError / TypeError for shapes, dtypes, non-finite values, targets
    outside [0, K), inputs that differ between ranks or shards that do not tile [0, K).
    """
    dist = _dist()
    error = None
    try:
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")
        for name, t in (("hidden", hidden), ("local_weight", local_weight)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            check_matrix(t, name)
            check_float(t, name)
        if hidden.shape[1] != local_weight.shape[1]:
            raise ValueError(f"hidden has size {hidden.shape[1]} but local_weight rows have {local_weight.shape[1]}")
        if local_weight.shape[0] == 0:
            raise ValueError("empty local_weight: give every rank at least one class")
        if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32) \
                or targets.shape != (hidden.shape[0],):
            raise ValueError(f"targets must be an int tensor of shape ({hidden.shape[0]},)")
        if local_bias is not None and tuple(local_bias.shape) != (local_weight.shape[0],):
            raise ValueError(f"local_bias must have shape ({local_weight.shape[0]},), got {tuple(local_bias.shape)}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        check_finite(hidden.detach(), "hidden")
        check_finite(local_weight.detach(), "local_weight")
    except (TypeError, ValueError) as exc:
        error = exc
    check_all(error, group)
    k = _check_tiling(offset, local_weight.shape[0], dist, group, "classifier")
    _check_same([hidden.detach(), targets.long().unsqueeze(1)], ["hidden", "targets"], dist, group)
    targets = targets.long()
    keep = targets != ignore_index
    bad = keep & ((targets < 0) | (targets >= k))
    if bool(bad.any()):
        raise ValueError(f"targets hold id {int(targets[bad][0])}, outside [0, {k}) (and not ignore_index = {ignore_index})")
    rows = keep.nonzero().squeeze(1)
    row_losses = _VocabParallelCrossEntropy.apply(hidden.index_select(0, rows), local_weight, local_bias,
                                                  targets.index_select(0, rows), offset, group, chunk_size)
    dtype = hidden.dtype
    if reduction == "none":
        out = torch.zeros(hidden.shape[0], dtype=row_losses.dtype, device=hidden.device)
        return out.index_put((rows,), row_losses).to(dtype)
    total = row_losses.sum()
    return (total / rows.numel() if reduction == "mean" else total).to(dtype)


INDEX_NAME = "index.json"
_CHECKPOINT_FORMAT = "unicode2_fast.row_sharded"


def _shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def save_sharded(directory: Any, tensors: Dict[str, torch.Tensor], offset: int, group: Any = None,
                 meta: Optional[Dict[str, Any]] = None) -> None:
    """Save row-sharded tensors: one safetensors file per rank plus an index.

    Args:
        directory: created if needed (on a file system every rank sees).
        tensors: name -> (K_r, ...) this rank's rows ``offset .. offset + K_r`` (every tensor the
            same K_r rows, the same names on every rank), e.g. a VocabParallelEmbedding's weight and
            its SparseRowAdamW moments and row steps.
        offset: the global row of this rank's first row. meta: optional JSON-able dict (rank 0's).

    Each file is written atomically (temporary file, fsync, rename); rank 0 writes ``index.json``
    (files, their row ranges, names, trailing shapes and dtypes, K) last, after every rank's file
    is in place, so a checkpoint without its index is known to be incomplete. Raises on every rank
    for bad input on any rank (names or shapes that differ, shards that do not tile [0, K)).
    """
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    directory = os.fspath(directory)
    error = None
    rows = 0
    layout = ""
    try:
        if not isinstance(tensors, dict) or not tensors:
            raise ValueError("nothing to save: tensors must be a non-empty dict of name -> (K_r, ...) tensor")
        if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors.values()):
            raise ValueError("every value of tensors must be a tensor with a row dimension")
        rows = {name: t.shape[0] for name, t in tensors.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"every tensor must hold the same rows of this rank, got {rows}")
        rows = next(iter(rows.values()))
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        layout = json.dumps({name: [list(t.shape[1:]), str(t.dtype)] for name, t in sorted(tensors.items())})
    except Exception as exc:  # any local failure: every rank raises, none waits in a collective
        error = exc
    check_all(error, group, "checkpoint")
    total = _check_tiling(offset, rows, dist, group, "checkpoint")
    digest = hashlib.sha256(layout.encode()).digest()
    prints = _all_gather(torch.tensor(list(digest), dtype=torch.int64), dist, group).cpu()
    if not bool((prints == prints[0]).all()):
        raise ValueError("u2.distributed.save_sharded: the tensors' names, trailing shapes or dtypes differ between ranks")
    error = None
    try:
        os.makedirs(directory, exist_ok=True)
        if rank == 0:
            # an old index would vouch for a mix of old and new shards if this save is interrupted
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, INDEX_NAME))
    except OSError as exc:
        error = exc
    check_all(error, group, "checkpoint directory")
    error = None
    try:
        path = os.path.join(directory, _shard_name(rank, world))
        payload = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        atomic_write(path, lambda tmp: safetensors.torch.save_file(
            payload, tmp, metadata={"format": _CHECKPOINT_FORMAT, "offset": str(offset), "rows": str(rows)}))
    except OSError as exc:  # a full disk on one rank: every rank raises
        error = exc
    check_all(error, group, "shard write")
    spans = _all_gather(torch.tensor([offset, rows], dtype=torch.int64), dist, group).cpu().tolist()
    if rank == 0:
        shards = sorted(({"file": _shard_name(r, world), "start": s, "stop": s + n} for r, (s, n) in enumerate(spans)),
                        key=lambda shard: shard["start"])  # row order, whatever the ranks' order
        index = {"format": _CHECKPOINT_FORMAT, "version": 1, "num_rows": total,
                 "tensors": json.loads(layout), "meta": meta or {}, "shards": shards}
        atomic_write_text(os.path.join(directory, INDEX_NAME), json.dumps(index, indent=2) + "\n")
    dist.barrier(group=group)


def load_sharded(directory: Any, start: Optional[int] = None, stop: Optional[int] = None,
                 names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """Rows ``start .. stop`` (default: all) of each tensor of a :func:`save_sharded` checkpoint,
    whatever the world size that saved it: only the overlapping rows of each shard file are read.
    Needs no process group.

    Raises:
        FileNotFoundError: no index (an incomplete checkpoint) or a missing shard file.
        ValueError: a foreign or corrupt index, unknown names, or rows outside [0, K).
    """
    directory = os.fspath(directory)
    index_path = os.path.join(directory, INDEX_NAME)
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"no {INDEX_NAME} in {directory}: not a row-sharded checkpoint, or an incomplete one")
    index = load_json(index_path)
    if not isinstance(index, dict) or index.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{index_path} is not a u2.distributed row-sharded index")
    total = int(index["num_rows"])
    start = 0 if start is None else start
    stop = total if stop is None else stop
    if not 0 <= start <= stop <= total:
        raise ValueError(f"rows {start}..{stop} are outside the checkpoint's [0, {total})")
    wanted = list(index["tensors"]) if names is None else list(names)
    unknown = sorted(set(wanted) - set(index["tensors"]))
    if unknown:
        raise ValueError(f"{index_path}: no tensors {unknown} (it holds {sorted(index['tensors'])})")
    parts: Dict[str, list] = {name: [] for name in wanted}
    for shard in sorted(index["shards"], key=lambda shard: shard["start"]):
        lo, hi = max(start, shard["start"]), min(stop, shard["stop"])
        if lo >= hi:
            continue
        path = os.path.join(directory, shard["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing shard file {path} named by {index_path}")
        with safetensors.safe_open(path, framework="pt") as file:
            for name in wanted:
                parts[name].append(file.get_slice(name)[lo - shard["start"]:hi - shard["start"]])
    out = {}
    for name in wanted:
        trailing, dtype = index["tensors"][name]
        out[name] = torch.cat(parts[name]) if parts[name] else \
            torch.empty((0, *trailing), dtype=getattr(torch, dtype.replace("torch.", "")))
    return out


def _checkpoint_rows(directory: Any) -> int:
    """K of a save_sharded checkpoint (from its index)."""
    return int(load_json(os.path.join(os.fspath(directory), INDEX_NAME))["num_rows"])


def shard_bounds(k: int, world: int) -> Sequence[Tuple[int, int]]:
    """(start, stop) row ranges of ``world`` near-equal contiguous shards of K rows (the first
    K % world shards one row longer), the split ``nearest`` expects by default."""
    if world < 1 or k < world:
        raise ValueError(f"cannot split K = {k} rows into {world} non-empty shards")
    base, extra = divmod(k, world)
    bounds, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


# ---------------------------------------------------------------------------------------------
# two-stage k-means over features sharded across the ranks
# ---------------------------------------------------------------------------------------------


def _local_features(features: Any) -> torch.Tensor:
    """This rank's (m, d) fp32 rows: a tensor, a NumPy array or a .npy path (memory-mapped)."""
    import numpy as np

    if isinstance(features, (str, os.PathLike)):
        path = os.fspath(features)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"features file not found: {path}")
        features = np.load(path, mmap_mode="r")
    if isinstance(features, np.ndarray):
        if not np.issubdtype(features.dtype, np.floating):
            raise TypeError(f"features must be floating point, got {features.dtype}")
        features = torch.from_numpy(np.ascontiguousarray(features))
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a tensor, a NumPy array or a .npy path, got {type(features).__name__}")
    if not features.is_floating_point() or features.dim() != 2:
        raise ValueError(f"features must be a 2-D float tensor (m, d), got {features.dtype} {tuple(features.shape)}")
    rows = features.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(rows).all()):
        bad = int((~torch.isfinite(rows).all(dim=1)).nonzero()[0])
        raise ValueError(f"features row {bad} (of this rank) holds NaN or Inf")
    return rows


def build_codebook(features: Any, k: int, n_coarse: Optional[int] = None, *, niter: int = 20, seed: int = 0,
                   max_points_per_centroid: int = 256, fine_batch_bytes: int = 1 << 30, group: Any = None) -> Any:
    """Two-stage k-means over feature rows sharded across the ranks: each rank passes its own
    rows (a tensor, a NumPy array or its own .npy file); together they are the job's rows in rank
    order. Every rank returns the same Codebook: that of ``u2.build_codebook`` on all the rows
    with ``allocation="size"`` and the same seed, up to float summation order (tested: identical
    ids and centroids on 2-3 gloo ranks against the single-process build).

    1. Coarse sample: the same seeded hash keys of the global row index as the single-process
       build; each rank offers its smallest keys, one all-gather picks the job's smallest, and the
       sample (at most max_points_per_centroid x n_coarse rows) trains the coarse stage on every
       rank alike.
    2. Assignment: each rank assigns its own rows; the cell sizes are all-reduced.
    3. Fine stage: each cell is trained on the rank that owns it (round robin over the cells
       with codewords) from its sample rows -- the same rows, in the same order, as the single
       process draws (smallest fine keys per cell; each rank offers its candidates) -- gathered
       batch by batch (``fine_batch_bytes`` of rows; every rank receives each batch, so the
       traffic is world x the sample); the trained centroids are all-gathered in cell order.
    Every collective moves tensors; bad input or a failing cell on any rank raises on every rank.
    The coarse stage runs on rank 0 and its centroids are broadcast, so every rank assigns with
    the same ones whatever its thread count.

    Not here (yet): allocation "distortion" / "auto", checkpoints, CUDA feature tensors.
    """
    import numpy as np

    from . import _features, _lloyd
    from .codebook import Codebook
    from .kmeans import allocate_codewords, train_cell

    dist = _dist()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    error = None
    try:
        local = _local_features(features)
        for name, value, minimum in (("k", k, 1), ("niter", niter, 1), ("seed", seed, 0),
                                     ("max_points_per_centroid", max_points_per_centroid, 1),
                                     ("fine_batch_bytes", fine_batch_bytes, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if n_coarse is not None and (isinstance(n_coarse, bool) or not isinstance(n_coarse, (int, np.integer))
                                     or not 1 <= n_coarse <= k):
            raise ValueError(f"n_coarse must be an integer in [1, k={k}], got {n_coarse!r}")
    except (TypeError, ValueError, FileNotFoundError) as exc:
        error = exc
    check_all(error, group, "features")
    n_coarse = min(k, max(1, round(k ** 0.5))) if n_coarse is None else int(n_coarse)
    shapes = _all_gather(torch.tensor([local.shape[0], local.shape[1]], dtype=torch.int64), dist, group).cpu()
    counts, dims = shapes[:, 0], shapes[:, 1]
    error = None
    if bool((dims != dims[0]).any()):
        error = ValueError(f"the ranks' features differ in dimension: {dims.tolist()}")
    elif int(counts.sum()) < k:
        error = ValueError(f"k={k} exceeds the job's {int(counts.sum())} feature rows")
    check_all(error, group, "features")
    n_rows, dim = int(counts.sum()), int(dims[0])
    offset, m = int(counts[:rank].sum()), local.shape[0]

    # 1. coarse sample and stage: the job's smallest coarse keys, by global row index
    size = min(n_rows, max_points_per_centroid * n_coarse)
    keys = _features._row_keys(offset, offset + m, seed, _features._STREAM_COARSE_SAMPLE)
    mine = torch.topk(keys, min(size, m), largest=False).indices if m else keys.new_empty(0, dtype=torch.int64)
    all_keys, _ = all_gather_varlen(keys[mine], group)
    all_ids, _ = all_gather_varlen(mine + offset, group)
    all_rows, _ = all_gather_varlen(local[mine], group)
    chosen = torch.topk(all_keys, size, largest=False).indices
    chosen = chosen[torch.argsort(all_ids[chosen])]
    sample = all_rows[chosen].contiguous()
    error, coarse = None, torch.empty((n_coarse, dim), dtype=torch.float32)
    if rank == 0:  # one rank trains the coarse stage (the sample is the same everywhere); all use its centroids
        try:
            coarse, _ = _lloyd.kmeans(sample, n_coarse, niter,
                                      _features.derive_seed(seed, _features.STREAM_COARSE_INIT), "coarse stage")
        except ValueError as exc:  # e.g. fewer distinct rows than cells
            error = exc
    check_all(error, group, "coarse stage")
    coarse = coarse.float().contiguous().to(_collective_device(dist, group))
    dist.broadcast(coarse, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    coarse = coarse.cpu()
    del sample, all_rows

    # 2. assignment of every rank's own rows
    coarse_ids = torch.empty(m, dtype=torch.int64)
    step = max(1, (64 << 20) // (4 * max(1, dim)))
    for start in range(0, m, step):
        coarse_ids[start:start + step] = _lloyd.fast_assign(local[start:start + step], coarse)[0].to("cpu", torch.int64)
    cell_sizes = torch.bincount(coarse_ids, minlength=n_coarse).to(_collective_device(dist, group))
    dist.all_reduce(cell_sizes, group=group)
    cell_sizes = cell_sizes.cpu()
    k_cell = allocate_codewords(cell_sizes.tolist(), k)

    # 3. fine samples: per cell the rows with the smallest fine keys (cell-major, by key; equal
    # truncated keys by row index), exactly the single-process plan over n_coarse + 1 cells
    take = torch.zeros(n_coarse, dtype=torch.int64)
    for cell in k_cell.nonzero().squeeze(1).tolist():
        take[cell] = min(int(cell_sizes[cell]), max_points_per_centroid * int(k_cell[cell]))
    key_bits = 63 - max(1, n_coarse.bit_length())
    fine = _features._row_keys(offset, offset + m, seed, _features._STREAM_FINE_SAMPLE)
    unsigned = (fine.numpy().view(np.uint64) ^ np.uint64(1 << 63)) >> np.uint64(64 - key_bits)
    composite = (coarse_ids << key_bits) | torch.from_numpy(unsigned.view(np.int64))
    order = torch.sort(composite, stable=True).indices
    cells = composite[order] >> key_bits
    local_sizes = torch.bincount(coarse_ids, minlength=n_coarse)
    starts = torch.cumsum(local_sizes, 0) - local_sizes
    offer = order[(torch.arange(m) - starts[cells]) < take[cells]]  # this rank's candidates
    cand_keys, _ = all_gather_varlen(composite[offer], group)
    cand_rows, _ = all_gather_varlen(offer + offset, group)
    by_row = torch.argsort(cand_rows)
    cand_keys, cand_rows = cand_keys[by_row], cand_rows[by_row]
    by_key = torch.sort(cand_keys, stable=True).indices  # ties: row order, as the single-process sort
    cand_keys, cand_rows = cand_keys[by_key], cand_rows[by_key]
    cand_cells = cand_keys >> key_bits
    cand_sizes = torch.bincount(cand_cells, minlength=n_coarse)
    cand_starts = torch.cumsum(cand_sizes, 0) - cand_sizes
    keep = (torch.arange(cand_rows.shape[0]) - cand_starts[cand_cells]) < take[cand_cells]
    sample_rows = cand_rows[keep]  # in sample position order
    positions = torch.zeros(n_coarse + 1, dtype=torch.int64)
    positions[1:] = torch.cumsum(take, 0)

    # 4. fine stage: cells batched by sample bytes, gathered, trained by their owners
    work = k_cell.nonzero().squeeze(1).tolist()
    owner = {cell: i % world for i, cell in enumerate(work)}
    batch_rows = max(1, fine_batch_bytes // (4 * dim))
    batches, filled = [[]], 0
    for cell in work:
        if batches[-1] and filled + int(take[cell]) > batch_rows:
            batches.append([])
            filled = 0
        batches[-1].append(cell)
        filled += int(take[cell])
    trained = {}
    for batch in batches:
        lo, hi = int(positions[batch[0]]), int(positions[batch[-1] + 1])
        rows = sample_rows[lo:hi]
        held = ((rows >= offset) & (rows < offset + m)).nonzero().squeeze(1)
        got_pos, _ = all_gather_varlen(held, group)
        got_rows, _ = all_gather_varlen(local[rows[held] - offset], group)
        samples = torch.empty((hi - lo, dim), dtype=torch.float32)
        samples[got_pos] = got_rows
        error = None
        try:
            for cell in batch:
                if owner[cell] == rank:
                    a, b = int(positions[cell]) - lo, int(positions[cell + 1]) - lo
                    trained[cell] = train_cell(samples[a:b], int(k_cell[cell]), niter,
                                               _features.derive_seed(seed, _features.STREAM_CELL_INIT, cell),
                                               f"coarse cell {cell}")
        except ValueError as exc:  # a cell with fewer distinct rows than codewords: named, on every rank
            error = exc
        check_all(error, group, "fine stage")
    mine_cells = [cell for cell in work if owner[cell] == rank]
    local_vectors = (torch.cat([trained[c] for c in mine_cells]) if mine_cells
                     else torch.empty((0, dim), dtype=torch.float32))
    gathered, _ = all_gather_varlen(local_vectors.float(), group)
    codeword_start = torch.zeros(n_coarse + 1, dtype=torch.int64)
    codeword_start[1:] = torch.cumsum(k_cell, 0)
    vectors = torch.empty((k, dim), dtype=torch.float32)
    at = 0
    for r in range(world):  # rank r's cells, in cell order, one after the other
        for cell in (c for c in work if owner[c] == r):
            n_codes = int(k_cell[cell])
            vectors[int(codeword_start[cell]):int(codeword_start[cell]) + n_codes] = gathered[at:at + n_codes]
            at += n_codes
    meta = {"coarse_ids": torch.repeat_interleave(torch.arange(n_coarse), k_cell), "coarse_centroids": coarse.cpu(),
            "cell_sizes": cell_sizes, "n_coarse": n_coarse, "k": k, "niter": niter, "seed": seed,
            "max_points_per_centroid": max_points_per_centroid, "n_features": n_rows, "allocation": "size",
            "holdout_rows": 0, "holdout_mse": {}}
    return Codebook(vectors, meta=meta)


# ---------------------------------------------------------------------------------------------
# a hierarchical index sharded by coarse cell
# ---------------------------------------------------------------------------------------------


class ShardedHierarchicalIndex:
    """``u2.HierarchicalIndex`` over a codebook sharded across the ranks by coarse cell.

    Every rank holds the (replicated, small) coarse centroids and the codewords of its own rows
    ``offset .. offset + K_r`` (a cell may span two ranks; ``from_codebook`` cuts at cell
    boundaries). Approximate search ranks the cells against the whole codebook's cell sizes, so
    every rank probes the same nprobe cells a single index would; each rank scans those it holds,
    and one all-gather of (fp32 score, global id, float64 objective) per query and rank picks the
    single index's answer (lowest id on equal score) -- that of ``HierarchicalIndex.search(...,
    backend="torch")``: the shards scan with the torch path (on CUDA a single index defaults to
    its Triton scan, whose fp32 scores may order near ties differently). Exact search is
    ``u2.distributed.nearest`` over the shards: the ids of ``u2.nearest`` on the whole codebook.

    Args:
        local_codebook: (K_r, d) this rank's rows. offset: the global id of its first row.
        coarse_centroids: (n_coarse, d), the same on every rank. local_coarse_ids: (K_r,) the cell
            of each local row. metric: "l2" | "ip" | "cos". group: the process group.
    """

    def __init__(self, local_codebook: Any, offset: int, coarse_centroids: Any, local_coarse_ids: Any, *,
                 metric: str = "l2", group: Any = None) -> None:
        from .hierarchical import HierarchicalIndex

        dist = _dist()
        error = None
        try:
            self.local = HierarchicalIndex(local_codebook, coarse_centroids, local_coarse_ids, metric=metric)
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        except (TypeError, ValueError) as exc:
            error = exc
        check_all(error, group, "index")
        self.offset, self.group, self.metric = offset, group, metric
        self.rows = self.local.ntotal
        _check_tiling(offset, self.rows, dist, group, "codebook")
        centroids = self.local.coarse_centroids.double()
        _check_same([centroids], ["coarse_centroids"], dist, group)
        sizes = self.local.cell_sizes.to(_collective_device(dist, group)).clone()
        dist.all_reduce(sizes, group=group)
        self.cell_sizes = sizes.cpu()
        self._codebook = (local_codebook.vectors if hasattr(local_codebook, "vectors")
                          else to_tensor(local_codebook, "local_codebook"))

    @classmethod
    def from_codebook(cls, codebook: Any, *, metric: str = "l2", group: Any = None) -> "ShardedHierarchicalIndex":
        """This rank's shard of a two-stage Codebook (``u2.build_codebook``'s, rows sorted by cell):
        contiguous runs of whole cells, near-equal in rows."""
        dist = _dist()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        vectors, cells = codebook.vectors, torch.as_tensor(codebook.meta["coarse_ids"]).long()
        if bool((cells[1:] < cells[:-1]).any()):
            raise ValueError("the codebook's rows are not sorted by coarse cell (as u2.build_codebook writes them)")
        k = vectors.shape[0]
        # cut at the cell boundary nearest to each even split, keeping every shard non-empty
        boundaries = torch.cat([torch.tensor([0]), (cells[1:] != cells[:-1]).nonzero().squeeze(1) + 1,
                                torch.tensor([k])])
        inner = boundaries[(boundaries > 0) & (boundaries < k)]
        cuts = [0]
        for r in range(1, world):
            target = round(r * k / world)
            # after the cut, enough inner boundaries must remain for the world - r - 1 later cuts
            room = inner[(inner > cuts[-1])]
            choice = room[:room.numel() - (world - r - 1)] if room.numel() > world - r - 1 else room[:0]
            cuts.append(int(choice[(choice - target).abs().argmin()]) if choice.numel() else cuts[-1])
        cuts.append(k)
        if any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"cannot cut {int(cells.max()) + 1} cells into {world} non-empty shards")
        lo, hi = cuts[rank], cuts[rank + 1]
        return cls(vectors[lo:hi], lo, codebook.meta["coarse_centroids"], cells[lo:hi], metric=metric, group=group)

    def search(self, x: Any, nprobe: Optional[int] = None, *, exact: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids, dists)`` identical on every rank, as ``HierarchicalIndex.search`` on the whole
        codebook: approximate with ``nprobe`` cells (default min(8, n_coarse)), or exact."""
        from .hierarchical import DEFAULT_NPROBE

        if exact:
            return nearest(x, self._codebook, self.offset, self.group, self.metric)
        dist = _dist()
        error = None
        try:
            xt = to_tensor(x, "x").detach()
            check_float(xt, "x")
            x2d, lead = flatten_queries(xt, self.local.dim)
            check_finite(x2d, "x")
            if self.metric == "cos":
                check_no_zero_rows(x2d, "x")
            n_coarse = self.local.n_coarse
            nprobe = min(DEFAULT_NPROBE, n_coarse) if nprobe is None else nprobe
            if isinstance(nprobe, bool) or not isinstance(nprobe, int) or not 1 <= nprobe <= n_coarse:
                raise ValueError(f"nprobe must be an int in [1, {n_coarse}], got {nprobe!r}")
        except (TypeError, ValueError) as exc:
            error = exc
        check_all(error, self.group, "x")
        _check_same([x2d], ["x"], dist, self.group)
        probes = self.local.probe_cells(x2d, nprobe, self.cell_sizes)
        ids, score, objective = self.local.scan_cells(x2d, probes)
        packed = torch.stack([score.double().cpu(), objective.cpu(),
                              torch.where(ids >= 0, ids + self.offset, ids).cpu().view(torch.float64)], dim=1)
        gathered = _all_gather(packed, dist, self.group).cpu()  # (world, N, 3)
        scores, objectives = gathered[..., 0], gathered[..., 1]
        global_ids = gathered[..., 2].contiguous().view(torch.int64)
        best = scores.min(dim=0).values
        sentinel = torch.iinfo(torch.int64).max
        candidates = torch.where((scores == best) & (global_ids >= 0), global_ids, torch.full_like(global_ids, sentinel))
        pick = candidates.argmin(dim=0)
        out_ids = global_ids.gather(0, pick.unsqueeze(0)).squeeze(0)
        out_obj = objectives.gather(0, pick.unsqueeze(0)).squeeze(0)
        dists = out_obj if self.metric != "cos" else 1.0 + out_obj
        return out_ids.to(xt.device).reshape(lead), dists.float().to(xt.device).reshape(lead)
